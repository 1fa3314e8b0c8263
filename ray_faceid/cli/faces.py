"""`ray-faceid faces analyze|verify`: the face stack on images and on a pairs file."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from ray_faceid.cli.common import EXIT_BAD_INPUT, console, print_json, report_error, user_errors
from ray_faceid.config import DetectionConfig, FaceConfig
from ray_faceid.errors import BadInput, FaceIdError

app = typer.Typer(help="Face analysis: detect, landmarks, align, embed, attributes, quality, verification.",
                  no_args_is_help=True)

BackendOpt = typer.Option("dlib", "--backend", help="dlib (embedded default) or insightface (needs --insightface-root).")
RootOpt = typer.Option(None, "--insightface-root", help="Folder with an insightface model pack (non-commercial licence).")
FallbackOpt = typer.Option(True, "--cnn-fallback/--no-cnn-fallback", help="Retry with dlib's CNN where HOG finds nothing.")


def face_config(backend: str, insightface_root: Optional[str], cnn_fallback: bool,
                policy: Literal["largest", "all"] = "largest") -> FaceConfig:
    if backend not in ("dlib", "insightface"):
        raise BadInput(f"--backend must be dlib or insightface, not {backend!r}")
    return FaceConfig(
        backend=backend,
        insightface_root=insightface_root,
        detection=DetectionConfig(cnn_fallback=cnn_fallback, policy=policy),
    )


def face_stack(face_backend: str, insightface_root: Optional[str], needs_pack: bool = True) -> str:
    """The backend --face-backend and --insightface-root name together: a pack given is a pack to use;
    insightface without one is refused unless nothing will be read with it (`needs_pack` False)."""
    if face_backend not in ("dlib", "insightface"):
        raise BadInput(f"--face-backend must be dlib or insightface, not {face_backend!r}")
    if insightface_root:
        return "insightface"
    if face_backend == "insightface" and needs_pack:
        raise BadInput("--face-backend insightface needs --insightface-root PACK (a folder of its .onnx files, e.g. "
                       "buffalo_l for IP-Adapter-FaceID, antelopev2 for InstantID and PuLID-FLUX)")
    return face_backend


def faces_table(name: str, faces, wide: bool = False) -> Table:
    """One row per face; the default columns fit 80 characters, `wide` adds the full box, roll, the
    mouth and eye opening and the sharpness."""
    table = Table(title=f"{name}: {len(faces)} face(s)")
    columns = (("#", "box x0,y0,x1,y1", "yaw", "pitch", "roll", "smile", "mouth", "eyes", "face px", "sharpness",
                "quality") if wide else ("#", "at x,y", "face px", "yaw", "pitch", "smile", "quality"))
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    fmt = lambda v, digits=1: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    for i, f in enumerate(faces):
        a, q = f.attributes, f.quality
        if wide:
            table.add_row(str(i), ",".join(f"{v:.0f}" for v in f.bbox), fmt(a["yaw"]), fmt(a["pitch"]), fmt(a["roll"]),
                          fmt(a["smile"], 2), fmt(a.get("mouth_open"), 2), fmt(a.get("eyes_open"), 2),
                          f"{q['face_px']:.0f}", f"{q['sharpness']:.0f}", f"{q['score']:.2f}")
        else:
            table.add_row(str(i), f"{f.bbox[0]:.0f},{f.bbox[1]:.0f}", f"{q['face_px']:.0f}", fmt(a["yaw"]),
                          fmt(a["pitch"]), fmt(a["smile"], 2), f"{q['score']:.2f}")
    return table


@app.command()
def analyze(
    images: list[str] = typer.Argument(..., help="Image paths or fsspec URIs."),
    all_faces: bool = typer.Option(True, "--all/--largest", help="Report every face, or only the largest."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Include embeddings in --json output."),
    wide: bool = typer.Option(False, "--wide", help="Every column (full box, roll, mouth, eyes, sharpness)."),
    backend: str = BackendOpt,
    insightface_root: Optional[str] = RootOpt,
    cnn_fallback: bool = FallbackOpt,
):
    """Detect and describe the faces in each image. Exit code 2 if any image is unusable."""
    from ray_faceid.face.analyzer import FaceAnalyzer

    with user_errors():
        analyzer = FaceAnalyzer(face_config(backend, insightface_root, cnn_fallback, "all" if all_faces else "largest"))
    results = analyzer.analyze_batch(images, return_errors=True)
    report = []
    for name, found in zip(images, results):
        if isinstance(found, FaceIdError):
            report.append({"image": name, "error": found.message, "code": found.code})
            if not as_json:
                report_error(found)
            continue
        report.append({"image": name, "faces": [f.to_dict(with_embedding=embeddings) for f in found]})
        if not as_json:
            # --wide asks for every column: let it run past the terminal rather than cut numbers.
            shown = Console(width=max(console.width, 140)) if wide else console
            shown.print(faces_table(name if wide else name.rsplit("/", 1)[-1], found, wide))
    if as_json:
        print_json({"encoder": analyzer.spec.model_dump(), "images": report})
    if any("error" in r for r in report):
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def verify(
    pairs: Path = typer.Option(..., "--pairs", help="CSV with columns image_a,image_b,same (same is 0 or 1)."),
    root: Path = typer.Option(..., "--root", help="Folder the image paths in the pairs file are relative to."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    backend: str = BackendOpt,
    insightface_root: Optional[str] = RootOpt,
    cnn_fallback: bool = FallbackOpt,
):
    """Accuracy at the encoder's own threshold, ROC AUC, pairs lost to missed faces, images/s."""
    from ray_faceid.eval.verification import evaluate_pairs, read_pairs
    from ray_faceid.face.analyzer import FaceAnalyzer

    with user_errors():
        if not pairs.is_file():
            raise BadInput(f"pairs file {pairs} does not exist")
        if not root.is_dir():
            raise BadInput(f"--root {root} is not a folder")
        rows = read_pairs(pairs)
        analyzer = FaceAnalyzer(face_config(backend, insightface_root, cnn_fallback))

    def embed(paths):
        return [None if isinstance(f, FaceIdError) or not f else f[0].embedding
                for f in analyzer.analyze_batch(paths, return_errors=True)]

    report = evaluate_pairs(embed, rows, root, analyzer.spec.key(), analyzer.spec.distance, analyzer.threshold)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(title=f"verification on {pairs.name} ({report.encoder})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in (
        ("pairs", f"{report.pairs}"),
        ("accuracy at threshold", f"{report.accuracy:.4f} (threshold {report.threshold})"),
        ("ROC AUC", f"{report.roc_auc:.4f}"),
        ("pairs with no face (counted wrong)", f"{report.no_face_pairs}"),
        ("images", f"{report.images}"),
        ("images/s", f"{report.images_per_s:.2f}"),
    ):
        table.add_row(label, value)
    console.print(table)
    if report.images_without_face:
        console.print("no face found in: " + ", ".join(report.images_without_face))
