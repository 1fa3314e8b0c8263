"""`ray-faceid ingest` and `ray-faceid pairs`: the Ray Data jobs."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from ray_faceid.cli.common import StallFailOpt, StallWarnOpt, console, err_console, user_errors
from ray_faceid.data.clustering import DEFAULT_CUT_SHARE
from ray_faceid.quiet import verbose

# What the identity figures of render and eval count (their JSON keys stay): an image of two people
# with one found is not "detected", yet its one match has a similarity.
LABELS = {"detection_rate": "images with every person's face found",
          "similarity_mean": "similarity mean (cosine, of the faces matched)",
          "similarity_p10": "similarity p10 (of the faces matched)",
          "leakage_max": "leakage max (cosine to another person of the image)"}


def summary_table(title: str, summary: dict) -> Table:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) if key != "encoder_spec" else value.get("name")
        table.add_row(LABELS.get(key, key.replace("_", " ")), str(value))
    return table


def ingest(
    src: str = typer.Argument(..., help="Photo archive: a folder or any fsspec URI (s3://, gs://, ...)."),
    dst: str = typer.Argument(..., help="Output folder or URI for the tables and crops."),
    labels: str = typer.Option("folders", "--labels", help="folders | cluster | none: how identities are found."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local cluster."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Analyzer actors (default: one per free CPU or GPU)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per batch."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped run: skip files already recorded."),
    min_shots: int = typer.Option(2, "--min-shots", min=2, help="Distinct shots an identity needs for pairs."),
    recognizer_onnx: Optional[str] = typer.Option(
        None, "--recognizer-onnx", help="An ArcFace-shaped ONNX recogniser (N x 3 x 112 x 112 -> N x D) of your own "
        "to embed faces with, instead of dlib's 128-d ResNet (better on people dlib confuses)."),
    recognizer: str = typer.Option("own", "--recognizer", help="own (dlib's ResNet) | sface (OpenCV Zoo's SFace, "
                                   "Apache-2.0, the sface extra): the recogniser that embeds the faces."),
    landmarks: str = typer.Option("dlib5", "--landmarks", help="dlib5 | dlib68. dlib68 also measures smile, mouth "
                                  "and eye opening (labels for the attribute flow), but its weights were trained on "
                                  "iBUG 300-W: non-commercial use only."),
    stall_warn: float = StallWarnOpt,
    stall_fail: float = StallFailOpt,
):
    """Detect, align, embed and score every face of an archive; then identities and cross-training pairs."""
    from ray_faceid.config import FaceConfig, IngestConfig
    from ray_faceid.data.ingest import run_ingest
    from ray_faceid.data.pairs import build_pairs

    with user_errors():
        # From IngestConfig's own face stack: a bare FaceConfig keeps only the largest face of each photo.
        face = IngestConfig().face.model_copy(update={"recognizer_onnx": recognizer_onnx, "recognizer": recognizer,
                                                   "landmarks": landmarks})
        config = IngestConfig(workers=workers, batch_size=batch_size, stall_warn_s=stall_warn, stall_fail_s=stall_fail,
                              face=FaceConfig.model_validate(face.model_dump()))
        summary = run_ingest(src, dst, config, labels=labels, resume=resume, address=address)
        not_used = summary.pop("not_used", [])
        stats = summary.pop("ray_data_stats", None)
        if verbose():
            err_console.print(stats)
        console.print(summary_table(f"ingest {src} -> {dst}", summary))
        for row in not_used:
            typer.echo(f"not used {row['uri']}: {row['status']}: {row['reason']}", err=True)
        if len(not_used) < sum(v for k, v in summary["status_counts"].items() if k != "ok"):
            typer.echo(f"... every file and its status: {dst}/images.parquet", err=True)
        if labels != "none":
            print_pairs("identities and pairs", build_pairs(dst, labels, min_shots))


def pairs(
    dst: str = typer.Argument(..., help="An ingest output folder or URI."),
    labels: Optional[str] = typer.Option(None, "--labels", help="folders | cluster (default: as ingested)."),
    min_shots: int = typer.Option(2, "--min-shots", min=2),
    max_pairs: int = typer.Option(100, "--max-pairs", min=1, help="Pairs per identity at most."),
    cut: float = typer.Option(
        DEFAULT_CUT_SHARE, "--cut", min=0.05, max=2.0, help="--labels cluster: the grouping's cut, as a share of the "
        "encoder's same-person threshold (lower: purer clusters, more people split in two)."),
    include_flagged: bool = typer.Option(False, "--include-flagged", help="Also make pairs from clusters flagged as "
                                         "not cohesive."),
    recluster: bool = typer.Option(False, "--recluster", help="--labels cluster: group every face again (new "
                                   "cluster numbers) instead of growing the identities of the last run with the "
                                   "faces added since (`ingest --resume`)."),
    evaluate_clustering: bool = typer.Option(
        False, "--evaluate-clustering", help="On an archive ingested with --labels folders: cluster (implies --labels cluster) "
        "and score the clusters against the folders (purity, BCubed P/R/F1), printed and written to summary.json."),
):
    """(Re)build identities.parquet and pairs.parquet from an ingest output."""
    from ray_faceid.data.pairs import build_pairs

    with user_errors():
        result = build_pairs(dst, labels, min_shots, max_pairs, cut_share=cut, include_flagged=include_flagged,
                             evaluate_clustering=evaluate_clustering, recluster=recluster)
        print_pairs(f"identities and pairs in {dst}", result)


def print_pairs(title: str, result: dict) -> None:
    """The pairs summary, then each flagged identity with why (stderr): the operator sees who is left out."""
    flagged = result.pop("flagged", {})
    console.print(summary_table(title, result))
    for name, reason in flagged.items():
        typer.echo(f"flagged {name}: {reason} (no pairs; enroll-dataset skips it)", err=True)
