"""`ray-faceid stand-ins DIR`: tiny stand-ins of the published identity files (their authors' key
layouts, random weights) for the tiny bases, and the generate command that tries each."""
from __future__ import annotations

import typer

from ray_faceid.cli.common import console, user_errors


def stand_ins(folder: str = typer.Argument(..., help="Where to write them (a new or empty folder).")):
    """Write tiny stand-ins of every published identity file ray_faceid reads (IP-Adapter-FaceID,
    PlusV2, Portrait, InstantID, XLabs' FLUX IP-Adapter, a CLIP image encoder folder) and embeddings
    for them: each path runs offline in one command before you bring the real files (random weights:
    the images are noise-like; the layouts, loading and every path are the real ones)."""
    from pathlib import Path

    from ray_faceid.errors import BadInput
    from ray_faceid.quiet import model_loading
    from ray_faceid.stand_ins import write_stand_ins

    model_loading()  # the weight-writing bars off: this command prints what it wrote

    with user_errors():
        root = Path(folder)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BadInput(f"{folder}: not an empty folder; give a new one")
        for what, arguments in write_stand_ins(root):
            console.print(f"[bold]{what}[/bold]\n  ray-faceid generate {arguments} --prompt \"a portrait photo\" "
                          "--out out.png", soft_wrap=True, highlight=False)
