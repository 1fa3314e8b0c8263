"""Identity metrics on images: similarity to a reference identity, detection rate, and multi-ID
leakage. Later stages use them to score generated images.

Similarity is the cosine similarity of embeddings (in [-1, 1], whatever the encoder's metric);
`same` applies the encoder's own distance threshold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ray_faceid.errors import FaceIdError
from ray_faceid.face.face import Face
from ray_faceid.face.spec import EncoderSpec, cosine_similarity


@dataclass
class ImageScore:
    image: str
    face_found: bool
    similarity: float | None = None
    distance: float | None = None
    same: bool | None = None
    error: str | None = None


@dataclass
class IdentityReport:
    images: int
    detection_rate: float
    mean_similarity: float | None
    p10_similarity: float | None
    same_rate: float
    per_image: list[ImageScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def reference_embedding(embeddings: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """One embedding for an identity: the (quality-)weighted mean of its references."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    w = np.ones(len(embeddings)) if weights is None else np.clip(np.asarray(weights, dtype=np.float64), 1e-6, None)
    return (embeddings * w[:, None]).sum(axis=0) / w.sum()


def score_face(face: Face | None, reference: np.ndarray, spec: EncoderSpec, threshold: float, name: str) -> ImageScore:
    if face is None or face.embedding is None:
        return ImageScore(image=name, face_found=False)
    if face.spec is not None:
        spec.check_compatible(face.spec)
    dist = float(spec.distance(face.embedding, reference))
    return ImageScore(
        image=name,
        face_found=True,
        similarity=float(cosine_similarity(face.embedding, reference)),
        distance=dist,
        same=dist <= threshold,
    )


def identity_similarity(analyzer, images: list, reference: np.ndarray, names: list[str] | None = None) -> IdentityReport:
    """Score the largest face of each image against `reference` (one embedding, or several to average)."""
    ref = reference_embedding(reference)
    names = names or [str(i) if isinstance(i, str) else f"image {k}" for k, i in enumerate(images)]
    scores = []
    for image, name in zip(images, names):
        try:
            faces = analyzer.analyze(image)
        except FaceIdError as exc:
            scores.append(ImageScore(image=name, face_found=False, error=exc.message))
            continue
        scores.append(score_face(faces[0] if faces else None, ref, analyzer.spec, analyzer.threshold, name))
    return summarize(scores)


def summarize(scores: list[ImageScore]) -> IdentityReport:
    sims = np.array([s.similarity for s in scores if s.similarity is not None])
    n = len(scores)
    return IdentityReport(
        images=n,
        detection_rate=sum(s.face_found for s in scores) / n if n else 0.0,
        mean_similarity=float(sims.mean()) if sims.size else None,
        p10_similarity=float(np.percentile(sims, 10)) if sims.size else None,
        same_rate=sum(bool(s.same) for s in scores) / n if n else 0.0,
        per_image=scores,
    )


def detection_rate(analyzer, images: list) -> float:
    """Share of images in which at least one face is found (unusable images count as misses)."""
    found = 0
    for image in images:
        try:
            found += bool(analyzer.analyze(image))
        except FaceIdError:
            pass
    return found / len(images) if images else 0.0


@dataclass
class LeakageScore:
    identity: str
    face_found: bool
    matched_similarity: float | None
    """Similarity of the face assigned to this identity."""
    wrong_similarity: float | None
    """Highest similarity of that face to any other target identity: high means the faces blended."""
    face: int | None = None
    """Index (in the faces given) of the face assigned to this identity."""


def leakage(faces: list[Face], identities: dict[str, np.ndarray]) -> list[LeakageScore]:
    """Match detected faces to target identities (Hungarian assignment on similarity) and report,
    for each identity, how close its face is to it and to the others."""
    names = list(identities)
    refs = np.stack([reference_embedding(identities[n]) for n in names])
    where = [i for i, f in enumerate(faces) if f.embedding is not None]
    usable = [faces[i] for i in where]
    if not usable:
        return [LeakageScore(n, False, None, None) for n in names]
    sim = np.array([[float(cosine_similarity(f.embedding, r)) for r in refs] for f in usable])
    from scipy.optimize import linear_sum_assignment  # SciPy loads here, not in every replica's start

    rows, cols = linear_sum_assignment(-sim)
    out = {n: LeakageScore(n, False, None, None) for n in names}
    for r, c in zip(rows, cols):
        others = np.delete(sim[r], c)
        out[names[c]] = LeakageScore(
            names[c], True, float(sim[r, c]), float(others.max()) if others.size else None, where[r]
        )
    return [out[n] for n in names]


def score_output(faces: list[Face], references: dict[str, np.ndarray]) -> dict:
    """Scores of one generated image against the identities it should show (faces matched to
    identities by Hungarian assignment).

    similarity: mean over the identities of the matched face's cosine similarity (None if none found);
    leakage: the highest similarity of a matched face to another of the image's identities."""
    matched = leakage(faces, references) if references else []
    sims = [m.matched_similarity for m in matched if m.matched_similarity is not None]
    wrong = [m.wrong_similarity for m in matched if m.wrong_similarity is not None]
    return {
        "faces": len(faces),
        "face_found": all(m.face_found for m in matched) if matched else bool(faces),
        "similarity": float(np.mean(sims)) if sims else None,
        "leakage": float(max(wrong)) if wrong else None,
        "identities": [asdict(m) for m in matched],
    }
