"""Face verification on a pairs file (image_a,image_b,same): accuracy at the encoder's own
threshold, ROC AUC, pairs lost to missed detections, and throughput.

The threshold is never fitted on the pairs being scored; a pair where either image has no face
(or cannot be decoded) counts as wrong, and as the least similar pair for the AUC.
"""
from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import mannwhitneyu

from ray_faceid.errors import BadInput, FaceIdError


@dataclass
class Pair:
    image_a: str
    image_b: str
    same: bool


@dataclass
class VerificationReport:
    encoder: str
    threshold: float
    pairs: int
    accuracy: float
    roc_auc: float
    no_face_pairs: int
    images: int
    images_without_face: list[str]
    seconds: float
    images_per_s: float
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def read_pairs(path: str | Path) -> list[Pair]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image_a", "image_b", "same"} - set(reader.fieldnames or [])
        if missing:
            raise BadInput(f"{path}: pairs file lacks column(s) {sorted(missing)}; expected image_a,image_b,same")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if row["same"] not in ("0", "1"):
                raise BadInput(f"{path}:{line}: 'same' must be 0 or 1, got {row['same']!r}")
            pairs.append(Pair(row["image_a"], row["image_b"], row["same"] == "1"))
    return pairs


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher = more likely positive)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def evaluate_pairs(
    embed: Callable[[list[str]], list[np.ndarray | None]],
    pairs: list[Pair],
    root: str | Path,
    encoder: str,
    metric_distance: Callable[[np.ndarray, np.ndarray], float],
    threshold: float,
    batch_size: int = 64,
) -> VerificationReport:
    """Score `pairs`. `embed(paths)` returns one embedding per path, None where no face was found;
    it may raise FaceIdError for an unusable file, which is recorded and counted as no face."""
    images = sorted({p.image_a for p in pairs} | {p.image_b for p in pairs})
    embeddings: dict[str, np.ndarray | None] = {}
    errors: dict[str, str] = {}
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        paths = [str(Path(root) / name) for name in chunk]
        try:
            vecs = embed(paths)
        except FaceIdError:
            vecs = []
            for name, path in zip(chunk, paths):
                try:
                    vecs.extend(embed([path]))
                except FaceIdError as exc:
                    errors[name] = exc.message
                    vecs.append(None)
        embeddings.update(zip(chunk, vecs))
    seconds = time.perf_counter() - start

    distances = np.full(len(pairs), np.inf)
    for k, p in enumerate(pairs):
        a, b = embeddings[p.image_a], embeddings[p.image_b]
        if a is not None and b is not None:
            distances[k] = metric_distance(a, b)
    same = np.array([p.same for p in pairs])
    found = np.isfinite(distances)
    correct = found & ((distances <= threshold) == same)
    finite_max = distances[found].max() if found.any() else 0.0
    scores = -np.where(found, distances, finite_max + 1.0)
    return VerificationReport(
        encoder=encoder,
        threshold=threshold,
        pairs=len(pairs),
        accuracy=float(correct.mean()) if len(pairs) else float("nan"),
        roc_auc=roc_auc(scores, same),
        no_face_pairs=int((~found).sum()),
        images=len(images),
        images_without_face=sorted(n for n, v in embeddings.items() if v is None),
        seconds=seconds,
        images_per_s=len(images) / seconds if seconds > 0 else float("inf"),
        errors=errors,
    )
