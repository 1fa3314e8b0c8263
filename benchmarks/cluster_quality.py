"""Clustering quality on labelled photos: Chinese whispers at the verification threshold (the old
method) vs average linkage and vs the kNN graph clustered by Leiden (the default), Infomap and
average linkage per connected component, over a range of cuts, in one run.

Faces: the largest face of every photo in the identity folders of ../shared/data/faces (or
--faces DIR), embedded by the default face stack; the folder names are the truth.

    python benchmarks/cluster_quality.py [--faces DIR] [--no-record]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

from ray_faceid.data.clustering import DEFAULT_CUT_SHARE, chinese_whispers, cluster_faces  # noqa: E402
from ray_faceid.eval.clustering import clustering_scores  # noqa: E402

NOT_PEOPLE = {"group", "nonface", "original_pairs"}
CUTS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)


def labelled_embeddings(root: Path):
    from ray_faceid.face.analyzer import FaceAnalyzer

    analyzer = FaceAnalyzer()
    embeddings, people = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_PEOPLE):
        for photo in sorted(folder.iterdir()):
            if photo.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
                continue
            faces = analyzer.analyze(str(photo))
            if faces:
                largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                embeddings.append(largest.embedding)
                people.append(folder.name)
    return np.array(embeddings), people, analyzer.spec


def row(name: str, scores: dict) -> str:
    return (f"| {name} | {scores['clusters']} | {scores['purity']:.3f} | {scores['bcubed_precision']:.3f} | "
            f"{scores['bcubed_recall']:.3f} | {scores['bcubed_f1']:.3f} | {scores['clusters_per_person_mean']:.2f} | "
            f"{scores['people_per_cluster_max']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not Path(args.faces).is_dir():
        sys.exit(f"no labelled photos at {args.faces}: pass --faces DIR (one folder per person)")
    embeddings, people, spec = labelled_embeddings(Path(args.faces))
    lines = [f"### cluster_quality — {time.strftime('%Y-%m-%d')} — {machine_line()}", "",
             f"{len(people)} faces of {len(set(people))} people ({args.faces}), encoder {spec.key()}, "
             f"threshold {spec.threshold}; cut = share of the threshold.", "",
             "| method | clusters | purity | BCubed P | BCubed R | BCubed F1 | clusters / person | worst people / cluster |",
             "|---|---|---|---|---|---|---|---|"]
    lines.append(row("Chinese whispers at the threshold (old default)",
                     clustering_scores(list(chinese_whispers(embeddings, spec, spec.threshold)), people)))
    for cut in CUTS:
        name = f"average linkage, cut {cut}" + (" (default before kNN + Leiden)" if cut == DEFAULT_CUT_SHARE else "")
        lines.append(row(name, clustering_scores(list(cluster_faces(embeddings, spec, cut, "average")), people)))
    from _graph_alternatives import component_average_linkage, infomap_clusters

    from ray_faceid.data.knn_graph import graph_clusters, knn_graph

    graph = knn_graph(embeddings, spec)
    for cut in (0.8, DEFAULT_CUT_SHARE, 0.9, 1.0):
        name = f"kNN graph + Leiden, cut {cut}" + (" (default)" if cut == DEFAULT_CUT_SHARE else "")
        lines.append(row(name, clustering_scores(list(graph_clusters(*graph, cut * spec.threshold)), people)))
    for cut in (0.8, DEFAULT_CUT_SHARE, 0.9, 1.0):
        lines.append(row(f"kNN graph + Infomap, cut {cut}",
                         clustering_scores(list(infomap_clusters(*graph, cut * spec.threshold)), people)))
    for cut in (0.8, DEFAULT_CUT_SHARE, 0.9, 1.0):
        lines.append(row(f"kNN graph + average linkage per component, cut {cut}",
                         clustering_scores(list(component_average_linkage(embeddings, spec, *graph, cut)), people)))
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
