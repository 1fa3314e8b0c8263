"""Recognisers on labelled photos: dlib's ResNet (the default), OpenCV Zoo's SFace, and the two
fused (the mean of each one's distance over its own threshold, same person at 1.0), in one run.

Verification: pairs.csv at each recogniser's own threshold (accuracy, ROC AUC). Clustering: the
largest face of every photo in the identity folders, kNN graph + Leiden at the default cut
(purity, BCubed F1 against the folder names). Both recognisers see the same detected faces.

    python benchmarks/recognizers.py [--faces ../shared/data/faces] [--no-record]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, photo_set_arguments, report  # noqa: E402
from cluster_quality import NOT_PEOPLE  # noqa: E402

from ray_faceid.config import FaceConfig  # noqa: E402
from ray_faceid.data.clustering import DEFAULT_CUT_SHARE  # noqa: E402
from ray_faceid.data.knn_graph import K, graph_clusters  # noqa: E402
from ray_faceid.eval.clustering import clustering_scores  # noqa: E402
from ray_faceid.eval.verification import read_pairs, roc_auc  # noqa: E402
from ray_faceid.face.analyzer import FaceAnalyzer  # noqa: E402

PHOTO = (".jpg", ".jpeg", ".png", ".webp")


def largest_faces(analyzer: FaceAnalyzer, paths: list[Path]) -> tuple[dict[Path, np.ndarray], float]:
    """Each photo's largest face embedding (photos without a face left out), and faces per second."""
    start, found = time.perf_counter(), {}
    for path in paths:
        faces = analyzer.analyze(str(path))
        if faces:
            found[path] = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])).embedding
    return found, len(found) / (time.perf_counter() - start)


def scaled_distances(analyzer: FaceAnalyzer, vectors: np.ndarray) -> np.ndarray:
    """All-pairs distances over the recogniser's own threshold (1.0 = its same-person line)."""
    spec = analyzer.spec
    return spec.distance(vectors[:, None], vectors[None]) / analyzer.threshold


def knn_clusters(distances: np.ndarray, cut: float) -> np.ndarray:
    """kNN graph + Leiden (the ingest default) on a precomputed distance matrix."""
    d = distances.copy()
    np.fill_diagonal(d, np.inf)
    neighbours = np.argsort(d, axis=1)[:, : min(K, len(d) - 1)]
    return graph_clusters(neighbours, np.take_along_axis(d, neighbours, axis=1), cut)


def main() -> None:
    args = photo_set_arguments(__doc__.splitlines()[0])
    root = Path(args.faces)
    if not (root / "pairs.csv").is_file():
        sys.exit(f"no labelled photos with pairs.csv at {root}: pass --faces DIR")
    pairs = read_pairs(root / "pairs.csv")
    people_photos = sorted(p for d in root.iterdir() if d.is_dir() and d.name not in NOT_PEOPLE
                           for p in d.iterdir() if p.suffix.lower() in PHOTO)
    photos = sorted(set(people_photos) | {root / p.image_a for p in pairs} | {root / p.image_b for p in pairs})
    analyzers = {"dlib ResNet (default)": FaceAnalyzer(), "SFace": FaceAnalyzer(FaceConfig(recognizer="sface"))}
    found, rates = {}, {}
    for name, analyzer in analyzers.items():
        found[name], rates[name] = largest_faces(analyzer, photos)
    common = sorted(set.intersection(*(set(f) for f in found.values())))
    index = {p: i for i, p in enumerate(common)}
    scaled = {name: scaled_distances(a, np.stack([found[name][p] for p in common])) for name, a in analyzers.items()}
    scaled["dlib + SFace fused (mean of scaled distances)"] = sum(scaled.values()) / len(scaled)

    scored = [p for p in pairs if root / p.image_a in index and root / p.image_b in index]
    same = np.array([p.same for p in scored])
    a = np.array([index[root / p.image_a] for p in scored])
    b = np.array([index[root / p.image_b] for p in scored])
    clustered = [index[p] for p in people_photos if p in index]
    truth = [p.parent.name for p in people_photos if p in index]
    lines = [f"### recognizers — {time.strftime('%Y-%m-%d')} — {machine_line()}", "",
             f"{root}: {len(scored)} of {len(pairs)} pairs (both photos with a face for every recogniser), "
             f"{len(clustered)} faces of {len(set(truth))} people clustered (kNN graph + Leiden, cut "
             f"{DEFAULT_CUT_SHARE} of the threshold). Distances are over each recogniser's own threshold "
             f"({', '.join(f'{n}: {a.threshold:.3f} {a.spec.metric}' for n, a in analyzers.items())}).", "",
             "| recogniser | pair accuracy | ROC AUC | best-threshold accuracy | purity | BCubed F1 | clusters | faces/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in scaled.items():
        pair_d = d[a, b]
        accuracy = float(((pair_d <= 1.0) == same).mean())
        best = max(float(((pair_d <= t) == same).mean()) for t in np.unique(pair_d))
        scores = clustering_scores(list(knn_clusters(d[np.ix_(clustered, clustered)], DEFAULT_CUT_SHARE)), truth)
        rate = f"{rates[name]:.1f}" if name in rates else "both"
        lines.append(f"| {name} | {accuracy:.3f} | {roc_auc(-pair_d, same):.4f} | {best:.3f} | {scores['purity']:.3f} "
                     f"| {scores['bcubed_f1']:.3f} | {scores['clusters']} | {rate} |")
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
