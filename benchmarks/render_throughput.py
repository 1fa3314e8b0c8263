"""Catalog render: the Ray Data job (2 actors) vs a plain loop over the same Renderer, in one run.

Real identities enrolled from the photo set, tiny components on CPU. Also the cost of scoring
(the face stack on each output) as a share of a row's time, measured in the plain loop.

    python benchmarks/render_throughput.py [--rows 24] [--size 64] [--steps 8] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from personalize_throughput import FACES, enroll_people  # noqa: E402


def catalog_rows(ids: list[str], count: int) -> list[dict]:
    rows = []
    for k in range(count):
        people = [ids[k % len(ids)], ids[(k + 1) % len(ids)]] if k % 4 == 3 else [ids[k % len(ids)]]
        rows.append({"id": f"row-{k:04d}", "identities": people, "prompt": "a portrait photo of a person", "seed": k})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not FACES.is_dir():
        sys.exit(f"real photo set not found at {FACES} (set RAY_FACEID_FACES)")

    import numpy as np

    from ray_faceid.config import RenderConfig
    from ray_faceid.data.catalog import parse_row
    from ray_faceid.data.cluster import init_ray
    from ray_faceid.data.render import run_render
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.eval.identity import score_output
    from ray_faceid.pipelines.generate import GenerationItem
    from ray_faceid.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="bench_render_"))
    registry = Registry(str(work / "registry"))
    enroll_people(registry, ["default"], 4)
    ids = [m["id"] for m in registry.list("default")]
    rows = catalog_rows(ids, args.rows)
    (work / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RenderConfig(steps=args.steps, size=f"{args.size}x{args.size}", workers=2, batch_size=4)

    # Plain loop: one process, the same Renderer pieces, generation and scoring timed apart.
    renderer = Renderer(config, "tiny", None, registry.store, "default", str(work / "loop"))
    generate_s = score_s = 0.0
    started = time.perf_counter()
    for k, row in enumerate(rows):
        parsed = parse_row(json.dumps(row), k)
        t0 = time.perf_counter()
        result = renderer.pipeline.generate_items([GenerationItem(parsed.prompt, renderer.conditions(parsed), "", parsed.seed)],
                                                  args.steps, config.guidance, args.size, args.size)
        t1 = time.perf_counter()
        faces = renderer.analyzer.analyze(np.asarray(result.images[0]))
        score_output(faces, {i.id: renderer.identity(i.id)["embeddings"] for i in parsed.identities})
        score_s += time.perf_counter() - t1
        generate_s += t1 - t0
    loop_s = time.perf_counter() - started

    init_ray(num_cpus=os.cpu_count())
    job = run_render(str(work / "catalog.jsonl"), str(work / "job"), "tiny", registry.store, config=config)
    assert job["rendered"] == len(rows), job["errors"]

    loop_rate = len(rows) / loop_s
    lines = [
        f"### render_throughput — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"{len(rows)} catalog rows (a quarter with two identities), 4 real enrolled identities, tiny components "
        f"on CPU, {args.size}x{args.size}, {args.steps} steps, every output scored by the face stack.",
        "",
        "| design | seconds | rows/s | vs plain loop |",
        "|---|---|---|---|",
        f"| plain loop, 1 process (models already loaded) | {loop_s:.1f} | {loop_rate:.2f} | 1.00x |",
        f"| Ray Data render job, 2 actors (start-up included) | {job['seconds']:.1f} | {job['rows_per_s']:.2f} | "
        f"{job['rows_per_s'] / loop_rate:.2f}x |",
        "",
        f"Scoring (detect + embed + match each output) is {100 * score_s / (generate_s + score_s):.0f}% of a row's "
        f"time in the plain loop ({score_s / len(rows) * 1000:.0f} ms of {(generate_s + score_s) / len(rows) * 1000:.0f} ms).",
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
