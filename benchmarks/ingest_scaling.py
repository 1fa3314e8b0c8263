"""Ray Data ingest vs a plain single-process loop over FaceAnalyzer, same images, one run.

(a) a loop over the images with FaceAnalyzer on one core (one thread, one torch thread);
(b) the ingest job on a local Ray cluster with 1 and 2 analyzer actors (one CPU each).
Both use the default face settings (CNN fallback on) and write no crops, so both do the same work.
Target on 2 cores: 2 actors >= 1.7x the loop.

    python benchmarks/ingest_scaling.py [--faces ../shared/data/faces] [--no-record]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

from ray_faceid import storage  # noqa: E402
from ray_faceid.config import DetectionConfig, FaceConfig, IngestConfig  # noqa: E402

DEFAULT_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
FACE = FaceConfig(threads=1, detection=DetectionConfig(policy="all"))


def plain_loop(uris: list[str]) -> float:
    import torch

    from ray_faceid.face.analyzer import FaceAnalyzer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    analyzer = FaceAnalyzer(FACE)
    start = time.perf_counter()
    for uri in uris:
        analyzer.analyze_batch([storage.read_bytes(uri)], return_errors=True)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return seconds


def ray_run(src: str, workers: int) -> tuple[float, str]:
    from ray_faceid.data.ingest import run_ingest

    config = IngestConfig(workers=workers, batch_size=8, write_crops=False, num_gpus_per_worker=0, face=FACE)
    with tempfile.TemporaryDirectory() as dst:
        start = time.perf_counter()
        summary = run_ingest(src, dst, config, labels="none")
        return time.perf_counter() - start, summary["ray_data_stats"]


def stage_seconds(stats: str) -> float:
    found = re.search(r"MapBatches\(AnalyzeImages\):.*? in ([0-9.]+)s", stats)
    return float(found.group(1)) if found else float("nan")


def stage_lines(stats: str) -> list[str]:
    keep = [line.strip() for line in stats.splitlines() if re.search(r"Operator|Remote wall time|Remote cpu time", line)]
    return keep[:6]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not args.faces.is_dir():
        sys.exit(f"no photo folder at {args.faces}")
    from ray_faceid.data.cluster import init_ray

    uris = list(storage.list_files(str(args.faces), IngestConfig().extensions))
    init_ray(num_cpus=2)
    ray_run(str(args.faces / "obama"), 2)  # start-up: workers, model files in the page cache
    loop = plain_loop(uris)
    rows = [("plain loop, 1 process, 1 thread", loop, "")]
    for workers in (1, 2):
        seconds, stats = ray_run(str(args.faces), workers)
        rows.append((f"Ray Data ingest, {workers} actor(s)", seconds, stats))
    lines = [
        f"### ingest_scaling — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"{len(uris)} files of {args.faces.name}/ (identities, groups, non-faces), default face settings, no crops.",
        "End to end: listing, actor start-up (models load once per actor), analysis, writing the tables, on a",
        "started cluster. Analysis stage: the map_batches operator's wall time from ds.stats().",
        "",
        "| pipeline | end-to-end s | images/s | vs loop | analysis stage s | stage vs loop |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds, stats in rows:
        stage = stage_seconds(stats) if stats else seconds
        lines.append(f"| {name} | {seconds:.1f} | {len(uris) / seconds:.2f} | {loop / seconds:.2f}x | "
                     f"{stage:.1f} | {loop / stage:.2f}x |")
    lines += ["", "Per-stage breakdown (ds.stats(), 2 actors):", "", "```", *stage_lines(rows[-1][2]), "```"]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
