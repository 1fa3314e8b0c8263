"""`ray-faceid render` (catalog re-rendering, a Ray Data job) and `ray-faceid eval`."""
from __future__ import annotations

from typing import Optional

import typer

from ray_faceid.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_SOME_FAILED,
    MODEL_HELP,
    BackendOpt,
    FluxTextEncodersOpt,
    FluxTransformerWeightsOpt,
    IdentityNetOpt,
    IdentityNetScaleOpt,
    ImageEncoderOpt,
    StallFailOpt,
    StallWarnOpt,
    StepCacheOpt,
    console,
    identitynet_scale_of,
    print_json,
    user_errors,
)
from ray_faceid.cli.data import summary_table

RegistryOpt = typer.Option("./faceid_registry", "--registry", help="Identity registry store (folder or URI).")
TenantOpt = typer.Option("default", "--tenant")
FIRST_ERRORS = 5


def eval_table(report: dict, title: str):
    """The eval metrics of each encoder, one row per encoder."""
    from rich.table import Table

    table = Table(title=title, caption="found: images with every person's face found; sim: cosine similarity of "
                  "the faces matched to their person; leak: the highest to another person of the image")
    for column in ("encoder", "images", "found", "sim mean", "sim p10", "multi", "leak"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, m in report["encoders"].items():
        cells = [m[k] for k in ("detection_rate", "similarity_mean", "similarity_p10")]
        table.add_row(name, str(m["images"]), *("-" if v is None else f"{v:.3f}" for v in cells),
                      str(m["multi_identity_images"]), "-" if m["leakage_max"] is None else f"{m['leakage_max']:.3f}")
    return table


def render(
    catalog: str = typer.Argument(..., help="JSONL or Parquet catalog: one row per image to make."),
    out: str = typer.Argument(..., help="Output folder or URI: images/, manifest.parquet, render_summary.json."),
    model: str = typer.Option("tiny", "--model", help=MODEL_HELP),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Shared identity adapter (as generate's --adapter); "
                                          "without it an UNTRAINED one on the UNet families, none on FLUX (rows "
                                          "naming people are refused)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=200, help="For rows without their own; "
                                        "default: the model's (30, or 4 for an untrained smoke base)."),
    size: Optional[str] = typer.Option(None, "--size", help="WxH for rows without their own; default: the model's "
                                       "native size (512x512 for SD 1.x)."),
    feather: float = typer.Option(4.0, "--feather", min=0.0, max=64.0, help="Inpaint rows without their own: the last "
                                  "N px inside the mask's edge blend into the photo (0: a hard edge)."),
    unet_batch: int = typer.Option(1, "--unet-batch", min=1, help="Rows denoised together (1: byte-stable per row)."),
    backend: str = BackendOpt,
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Render actors (default: one per free GPU, or 1)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local cluster."),
    resume: bool = typer.Option(False, "--resume", help="Accepted for symmetry: every run skips rows already rendered."),
    imr: Optional[str] = typer.Option(None, "--imr", help="Trained IMR: rows' `expression` moves the identity tokens."),
    flow: Optional[str] = typer.Option(None, "--flow", help="Trained attribute flow: for rows' `edits`."),
    image_encoder: Optional[str] = ImageEncoderOpt,
    face_backend: str = typer.Option("dlib", "--face-backend", help="Face stack whose embeddings of the rows' people "
                                     "make their tokens and score the outputs: dlib (default) or insightface (needs "
                                     "--insightface-root). A published IP-Adapter-FaceID or InstantID file reads each "
                                     "person's stored ArcFace embeddings whatever the stack (`identities embed` adds "
                                     "them)."),
    insightface_root: Optional[str] = typer.Option(None, "--insightface-root", help="Folder of an insightface pack "
                                                   "(buffalo_l for FaceID, antelopev2 for InstantID and PuLID-FLUX)."),
    identitynet: Optional[str] = IdentityNetOpt,
    identitynet_scale: Optional[float] = IdentityNetScaleOpt,
    step_cache: float = StepCacheOpt,
    flux_text_encoders: str = FluxTextEncodersOpt,
    flux_transformer_weights: str = FluxTransformerWeightsOpt,
    as_json: bool = typer.Option(False, "--json"),
    stall_warn: float = StallWarnOpt,
    stall_fail: float = StallFailOpt,
):
    """Render every catalog row that has no output for its current key; score each output."""
    from ray_faceid.config import RenderConfig
    from ray_faceid.data.render import run_render

    with user_errors():
        from ray_faceid.cli.faces import face_stack
        from ray_faceid.config import SCORING_FACE

        face = SCORING_FACE.model_copy(update={"backend": face_stack(face_backend, insightface_root),
                                               "insightface_root": insightface_root})
        config = RenderConfig(face=face, steps=steps, size=size, feather=feather, unet_batch=unet_batch, workers=workers,
                              backend=backend,
                              precision=precision, stall_warn_s=stall_warn, stall_fail_s=stall_fail,
                              identitynet=identitynet,
                              identitynet_scale=identitynet_scale_of(identitynet, identitynet_scale),
                              flux_step_cache=step_cache, flux_text_encoders=flux_text_encoders,
                              flux_transformer_weights=flux_transformer_weights)
        summary = run_render(catalog, out, model, registry, adapter, config, tenant, address, imr=imr, flow=flow,
                             image_encoder=image_encoder)
    if as_json:
        print_json(summary)
    else:
        # A figure with nothing to measure (no rate for a cached run, no similarity without identity) is left out.
        console.print(summary_table(f"render {catalog} -> {out}", {k: v for k, v in summary.items()
                                                                     if k not in ("errors", "inputs") and v is not None}))
    raise typer.Exit(render_exit_code(summary, catalog))


def render_exit_code(summary: dict, catalog: str) -> int:
    """0: every row has its image; 3: some rows failed (the first errors on stderr; every one in
    manifest.parquet); 2: not one row of the catalog could be read."""
    errors = list(summary["errors"].items())
    for row_id, error in errors[:FIRST_ERRORS]:
        typer.echo(f"failed {row_id}: {error}", err=True)
    if len(errors) > FIRST_ERRORS:
        typer.echo(f"... and {len(errors) - FIRST_ERRORS} more (manifest.parquet has every error)", err=True)
    if summary["rows"] and summary["unreadable"] == summary["rows"]:
        typer.echo(f"error (bad_input): no row of {catalog} is a JSON object: is it a JSONL or Parquet catalog?",
                   err=True)
        return EXIT_BAD_INPUT
    if errors:
        typer.echo(f"{len(errors)} of {summary['rows']} rows failed", err=True)
        return EXIT_SOME_FAILED
    return 0


def evaluate(
    images: str = typer.Argument(..., help="A render output (with manifest.parquet) or a folder of images."),
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
    identities: Optional[str] = typer.Option(None, "--identities", help="ID[,ID]: who every image shows (folder input)."),
    second_onnx: Optional[str] = typer.Option(None, "--second-encoder-onnx", help="An independent ArcFace-shaped ONNX model."),
    second_insightface: Optional[str] = typer.Option(None, "--second-insightface", help="An insightface model pack folder."),
    no_second: bool = typer.Option(False, "--no-second", help="Score with the conditioning encoder only (default: "
                                   "SFace as the independent second, where the sface extra is installed)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where eval.json and contact_sheet.png go (default: IMAGES)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Identity similarity, detection rate and leakage of generated images, plus a contact sheet."""
    from ray_faceid.config import SCORING_FACE
    from ray_faceid.eval.run import default_second_face
    from ray_faceid.eval.run import evaluate as run_eval
    from ray_faceid.registry import Registry

    with user_errors():
        second, note = None, None
        if second_onnx:
            second = SCORING_FACE.model_copy(update={"recognizer_onnx": second_onnx})
        elif second_insightface:
            second = SCORING_FACE.model_copy(update={"backend": "insightface", "insightface_root": second_insightface})
        elif not no_second:
            second, note = default_second_face()
        wanted = [i.strip() for i in identities.split(",")] if identities else None
        report = run_eval(images, Registry(registry), tenant, wanted, second_face=second, out=out)
    if note:
        typer.echo(note, err=True)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "rows"})
        return
    console.print(eval_table(report, f"eval {images}"))
    render = report.get("render", {})
    if render.get("failed_rows"):
        typer.echo(f"{render['failed_rows']} catalog rows failed in the render and are not scored "
                   "(manifest.parquet has their errors)")
    if render.get("untrained_base"):
        typer.echo("an untrained smoke-test base made these images: faces are rarely found and the scores say "
                   "nothing of identity; render with a real base (--model) to measure it")
    typer.echo("encoders: " + ", ".join(f"{n} = {m['spec']}" for n, m in report["encoders"].items()))
    typer.echo(f"contact sheet: {report['contact_sheet']}")
