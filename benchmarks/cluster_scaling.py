"""Grouping faces by identity as the archive grows: today's all-pairs methods vs the kNN graph
(FAISS) + Leiden, at 10k, 100k and 1M faces, in one run.

The faces are synthetic people whose within- and between-person distances match what the default
encoder gives on the shared photos (fitted there and printed; defaults when they are absent):
person centres and each face's offset are Gaussian, person sizes 2-20 faces. Each (method, size)
runs in a process of its own: wall time, peak memory (max RSS), BCubed F1 and purity against the
synthetic truth. All-pairs methods run only where their n x n work fits; the table says why not.

    python benchmarks/cluster_scaling.py [--sizes 10000,100000,1000000] [--methods leiden,infomap] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

DIM, THRESHOLD, CUT_SHARE = 128, 0.6, 0.85
DEFAULT_WITHIN, DEFAULT_BETWEEN = 0.42, 0.88  # dlib ResNet on photos: fitted below when the set is there
ALL_PAIRS_MAX = {"average linkage (exact, old default <= 20k)": 20_000, "Chinese whispers (old default > 20k)": 10_000}
NEW = "kNN graph (FAISS, k=20) + Leiden (new default)"
GRAPH_ALTERNATIVES = ["kNN graph (FAISS, k=20) + Infomap", "kNN graph (FAISS, k=20) + average linkage per component"]


def fit(faces: Path) -> tuple[float, float, str]:
    """Mean within-person and between-person distances of the default encoder on labelled photos."""
    if not faces.is_dir():
        return DEFAULT_WITHIN, DEFAULT_BETWEEN, f"defaults (no photos at {faces})"
    from cluster_quality import labelled_embeddings

    embeddings, people, _ = labelled_embeddings(faces)
    people = np.array(people)
    d = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
    same = people[:, None] == people[None]
    off = ~np.eye(len(people), dtype=bool)
    within, between = float(d[same & off].mean()), float(d[~same].mean())
    return within, between, f"fitted on {len(people)} faces of {len(set(people))} people in {faces}"


def synthetic(n: int, within: float, between: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n faces of people with 2-20 faces each: E|a-b| is ~sqrt(2) sigma in 128-d, so the sigmas
    follow from the fitted means."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 21, n // 2)
    sizes = sizes[np.cumsum(sizes) <= n]
    truth = np.repeat(np.arange(len(sizes)), sizes)
    truth = np.concatenate([truth, np.full(n - len(truth), len(sizes))])  # the remainder: one more person
    sigma_w = within / np.sqrt(2)
    sigma_c = np.sqrt(max(between ** 2 / 2 - sigma_w ** 2, 1e-6))
    centres = rng.normal(size=(truth.max() + 1, DIM)).astype(np.float32) * np.float32(sigma_c / np.sqrt(DIM))
    faces = centres[truth] + rng.normal(size=(n, DIM)).astype(np.float32) * np.float32(sigma_w / np.sqrt(DIM))
    return faces, truth


def run_one(method: str, n: int, within: float, between: float) -> dict:
    """In this (child) process: cluster n synthetic faces with `method`; time, peak RSS, scores."""
    from ray_faceid.eval.clustering import clustering_scores
    from ray_faceid.face.spec import EncoderSpec

    spec = EncoderSpec(name="synthetic", dim=DIM, version="1", license="-", metric="euclidean", threshold=THRESHOLD)
    faces, truth = synthetic(n, within, between)
    cut = CUT_SHARE * THRESHOLD
    started = time.perf_counter()
    if method.startswith("average linkage"):
        from ray_faceid.data.clustering import cluster_faces

        labels = cluster_faces(faces, spec, CUT_SHARE, "average")
    elif method.startswith("Chinese whispers"):
        from ray_faceid.data.clustering import chinese_whispers

        labels = chinese_whispers(faces, spec, cut)
    elif method.startswith("kNN graph (FAISS, k=20) + Infomap"):
        from _graph_alternatives import infomap_clusters

        from ray_faceid.data.knn_graph import knn_graph

        labels = infomap_clusters(*knn_graph(faces, spec), cut)
    elif method.startswith("kNN graph (FAISS, k=20) + average linkage"):
        from _graph_alternatives import component_average_linkage

        from ray_faceid.data.knn_graph import knn_graph

        labels = component_average_linkage(faces, spec, *knn_graph(faces, spec), CUT_SHARE)
    else:
        from ray_faceid.data.knn_graph import graph_clusters, knn_graph

        labels = graph_clusters(*knn_graph(faces, spec), cut)
    seconds = time.perf_counter() - started
    scores = clustering_scores(labels, truth)
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "f1": scores["bcubed_f1"], "purity": scores["purity"], "people": scores["people"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--faces", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="", help="Comma-separated parts of method names to run (default: all).")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.one:
        method, n, within, between = json.loads(args.one)
        print(json.dumps(run_one(method, n, within, between)))
        return
    within, between, source = fit(Path(args.faces))
    lines = [f"### cluster_scaling — {time.strftime('%Y-%m-%d')} — {machine_line()}", "",
             f"Synthetic people, distances {source}: within a person {within:.3f} on average, between people "
             f"{between:.3f} (encoder threshold {THRESHOLD}, cut {CUT_SHARE * THRESHOLD:.2f}); 2-20 faces per person.", "",
             "| method | faces | seconds | peak memory (GB) | BCubed F1 | purity |", "|---|---|---|---|---|---|"]
    wanted = [w.strip().lower() for w in args.methods.split(",") if w.strip()]
    methods = [m for m in (*ALL_PAIRS_MAX, NEW, *GRAPH_ALTERNATIVES) if not wanted or any(w in m.lower() for w in wanted)]
    for n in (int(s) for s in args.sizes.split(",")):
        for method in methods:
            limit = ALL_PAIRS_MAX.get(method)
            if limit is not None and n > limit:
                need = n * (n - 1) / 2 * 8 / 2**30
                why = (f"not run: {need:,.0f} GB of pairwise distances" if method.startswith("average") else
                       f"not run: {n * n / 2:.1e} pairs on one core (25k took 159 s, growing with n^2)")
                lines.append(f"| {method} | {n:,} | {why} | | | |")
                continue
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps([method, n, within, between])],
                                  capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                lines.append(f"| {method} | {n:,} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            lines.append(f"| {method} | {n:,} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['f1']:.4f} | "
                         f"{r['purity']:.4f} |")
            print(lines[-1], flush=True)
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
