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
    from ray_faceid.identity.stand_ins import write_stand_ins
    from ray_faceid.quiet import model_loading

    model_loading()  # the weight-writing bars off: this command prints what it wrote

    with user_errors():
        root = Path(folder)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BadInput(f"{folder}: not an empty folder; give a new one")
        existed = root.is_dir()
        try:
            made = write_stand_ins(root)
        except OSError as exc:  # a file in the way, no permission, a full disk: one line, what it wrote removed
            import shutil

            for written in (list(root.iterdir()) if existed else [root]) if root.is_dir() else []:
                if written.is_dir():
                    shutil.rmtree(written, ignore_errors=True)
                else:
                    written.unlink(missing_ok=True)
            raise BadInput(f"{folder}: cannot write there ({exc.strerror or exc}); give another folder") from None
        import re
        import shlex
        import sys

        # The program as the user ran it (.venv/bin/ray-faceid without an activated venv), else its name.
        program = shlex.quote(sys.argv[0]) if Path(sys.argv[0]).name == "ray-faceid" else "ray-faceid"
        for what, arguments in made:
            out = re.sub(r"[^a-z0-9]+", "-", what.lower().split(" (")[0]).strip("-")  # one image per command
            console.print(what, style="bold", markup=False, highlight=False)
            console.print(f"  {program} generate {arguments} --prompt 'a portrait photo' --out {out}.png",
                          soft_wrap=True, markup=False, highlight=False)
        onnx = root / "tiny_arcface_512.onnx"
        if onnx.is_file():  # enrolled people get the embeddings the stand-ins take from a random ArcFace-shaped net
            console.print("An enrolled person (e.g. enrolled with the default dlib stack) with these files",
                          style="bold", markup=False, highlight=False)
            console.print(f"  {program} identities embed NAME --recognizer-onnx {shlex.quote(str(onnx))}\n"
                          f"  {program} generate --model tiny --adapter "
                          f"{shlex.quote(str(root / 'ip-adapter-faceid_sd15.bin'))} --identity NAME --prompt "
                          "'a portrait photo' --out name.png", soft_wrap=True, markup=False, highlight=False)
