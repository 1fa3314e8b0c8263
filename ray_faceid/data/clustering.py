"""Grouping faces by identity without chaining people together.

Chinese whispers at the verification threshold joins two groups through ONE close pair, so on an
archive where the encoder places some people close together (the 128-d dlib ResNet does, for
example, with East Asian faces) a chain of close pairs merges several people into one cluster.
Average linkage joins two groups only when their faces are close ON AVERAGE: one stray close pair
is not enough. The cut is a share of the encoder's own same-person threshold (`DEFAULT_CUT_SHARE`,
chosen where purity and BCubed F1 stay flat across cuts on the shared photo set; see
benchmarks/cluster_quality.py for the curve).

Every cluster gets a cohesion figure: the mean and the largest distance of its members to its
centre (the mean of its unit-normalised embeddings for cosine encoders, of its embeddings
otherwise), in the encoder's metric. A cluster whose farthest member does not verify against the
centre is flagged, and left out of cross-training pairs unless asked for.

The default groups faces as Leiden communities of their k-nearest-neighbour graph at the cut (FAISS
+ Leiden, knn_graph.py): time and memory grow with n, and on the shared photos it scores higher
than exact average linkage at the same cut (BCubed F1 0.990 vs 0.964, both purity 1.000:
benchmarks/BENCHMARKS.md, cluster_quality), so average linkage is kept only on request
(`method="average"`, up to `MAX_EXACT` faces: it needs the n x n distances). The cohesion flag
catches what still chains.

Faces of one photo are different people. Given each face's photo, the kNN graph has no edge
between two faces of one photo (a group photo's faces look alike: small, same light, same lens),
and a cluster that still holds two is split (`separate_same_photo`); `same_photo_identities`
counts what would break this, for the clustering report.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from ray_faceid.errors import BadInput
from ray_faceid.face.spec import EncoderSpec

log = logging.getLogger(__name__)
DEFAULT_CUT_SHARE = 0.85
MAX_EXACT = 20_000


@dataclass(frozen=True)
class Cohesion:
    centre_distance_mean: float
    centre_distance_max: float
    flagged: bool
    """The farthest member does not verify against the centre (distance above the encoder's threshold)."""


def _vectors(embeddings: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    vecs = np.asarray(embeddings, dtype=np.float64)
    if spec.metric == "cosine":
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    return vecs


def cluster_faces(embeddings: np.ndarray, spec: EncoderSpec, cut_share: float = DEFAULT_CUT_SHARE,
                  method: str = "graph", photos: Sequence[Hashable] | None = None) -> np.ndarray:
    """(n, D) embeddings -> (n,) cluster numbers 0..k-1, numbered by first appearance. `method`:
    "graph" (kNN graph + Leiden, any size) or "average" (exact average linkage, up to MAX_EXACT).
    `photos`: each face's photo; two faces of one photo never share a cluster."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=int)
    if n == 1:
        return np.zeros(1, dtype=int)
    cut = cut_share * spec.threshold
    if method == "average" and n > MAX_EXACT:
        raise BadInput(f"{n} faces: exact average linkage needs {n * (n - 1) / 2 * 8 / 2**30:.0f} GB of distances; "
                       "use the default kNN-graph grouping")
    if method == "graph":
        from ray_faceid.data.knn_graph import graph_clusters, knn_graph

        raw = graph_clusters(*knn_graph(embeddings, spec), cut, photos=photos)
    elif method == "average":
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import pdist

        condensed = pdist(_vectors(embeddings, spec), "cosine" if spec.metric == "cosine" else "euclidean")
        raw = fcluster(linkage(condensed, method="average"), t=cut, criterion="distance")
    else:
        raise BadInput(f"clustering method must be graph or average, not {method!r}")
    if photos is not None:
        raw = separate_same_photo(raw, embeddings, photos, spec)
    _, first = np.unique(raw, return_index=True)
    order = {label: rank for rank, label in enumerate(raw[np.sort(first)])}
    return np.array([order[label] for label in raw])


def same_photo_identities(labels: Sequence[Hashable], photos: Sequence[Hashable]) -> int:
    """How many identities hold two faces of one photo (a correct grouping has none)."""
    seen: set = set()
    broken: set = set()
    for label, photo in zip(labels, photos):
        if (label, photo) in seen:
            broken.add(label)
        seen.add((label, photo))
    return len(broken)


def separate_same_photo(labels: np.ndarray, embeddings: np.ndarray, photos: Sequence[Hashable],
                        spec: EncoderSpec) -> np.ndarray:
    """Split every cluster holding two faces of one photo: the faces of its most crowded photo each
    start a part, and every other member, nearest the cluster's centre first, joins the part it is
    nearest on average among those without a face of its photo (a new part when all have one).
    The grouping decided who belongs together; this only keeps one photo's people apart."""
    labels = np.asarray(labels).copy()
    if len(labels) == 0:
        return labels
    photo = np.unique(np.asarray(photos, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)
    pairs, counts = np.unique(labels.astype(np.int64) * (int(photo.max()) + 1) + photo, return_counts=True)
    crowded_labels = np.unique(pairs[counts > 1] // (int(photo.max()) + 1))  # only these need work: O(n log n)
    fresh = int(labels.max()) + 1
    for label in crowded_labels:
        idx = np.flatnonzero(labels == label)
        vecs = {int(i): v for i, v in zip(idx, _vectors(np.asarray(embeddings)[idx], spec))}
        by_photo: dict = {}
        for i in idx:
            by_photo.setdefault(photos[i], []).append(int(i))
        if len(by_photo) == len(idx):
            continue
        crowded = max(by_photo.values(), key=len)
        parts = [([i], {photos[i]}) for i in crowded]
        centre = np.mean(list(vecs.values()), axis=0)
        rest = [int(i) for i in idx if i not in crowded]
        rest.sort(key=lambda i: float(spec.distance(vecs[i], centre)))
        for i in rest:
            allowed = [p for p in parts if photos[i] not in p[1]]
            if not allowed:
                parts.append(([i], {photos[i]}))
                continue
            part = min(allowed, key=lambda p: float(np.mean(spec.distance(np.stack([vecs[j] for j in p[0]]),
                                                                          vecs[i][None, :]))))
            part[0].append(i)
            part[1].add(photos[i])
        for members, _ in parts[1:]:
            labels[members] = fresh
            fresh += 1
    return labels


def chinese_whispers(embeddings: np.ndarray, spec: EncoderSpec, threshold: float) -> np.ndarray:
    """dlib's Chinese whispers with an edge wherever two faces are closer than `threshold`."""
    import dlib

    vecs = _vectors(embeddings, spec)
    if spec.metric == "cosine":  # on unit vectors, cosine distance d <=> euclidean sqrt(2 d)
        threshold = float(np.sqrt(2 * threshold))
    return np.array(dlib.chinese_whispers_clustering([dlib.vector(v.tolist()) for v in vecs], threshold))


def cohesion(embeddings: np.ndarray, spec: EncoderSpec) -> Cohesion:
    """How tight one cluster is around its centre, in the encoder's metric."""
    vecs = _vectors(embeddings, spec)
    centre = vecs.mean(axis=0)
    distances = np.asarray(spec.distance(vecs, centre[None, :]), dtype=np.float64).reshape(-1)
    return Cohesion(float(distances.mean()), float(distances.max()), bool(distances.max() > spec.threshold))
