"""`ray-faceid demo`: the main job on the embedded default (local, offline)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ray_faceid.cli.common import console, report_error, user_errors
from ray_faceid.errors import FaceIdError, NotFound


def demo(
    photos: Optional[Path] = typer.Option(None, "--photos", help="Folder of photos; default: the ones insightface ships."),
):
    """Analyze real photos with the embedded default face stack and print every face found."""
    from ray_faceid import storage
    from ray_faceid.cli.faces import faces_table
    from ray_faceid.config import DetectionConfig, FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer, sample_images

    with user_errors():
        if photos is None:
            images = [str(p) for p in sample_images()]
            if not images:
                raise NotFound("no sample photos: install the insightface extra or pass --photos DIR")
        else:
            images = list(storage.list_files(str(photos), (".jpg", ".jpeg", ".png", ".webp")))
        analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    console.print(f"face encoder: {analyzer.spec.key()} ({analyzer.spec.license}); {len(images)} photo(s)")
    total = 0
    for name, found in zip(images, analyzer.analyze_batch(images, return_errors=True)):
        if isinstance(found, FaceIdError):
            report_error(found, prefix="skipped")
            continue
        total += len(found)
        console.print(faces_table(Path(name).name, found))
    console.print(f"{total} face(s) in {len(images)} photo(s)")
