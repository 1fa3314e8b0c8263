"""Face sketches: what a tombstone keeps of an erased person's face, so that the same face enrolled
again is recognised, without keeping the face itself.

A sketch is 512 sign bits of the person's mean embedding (unit length) projected on fixed random
hyperplanes (random-hyperplane hashing). A tombstone stores them masked with a key derived from the
registry's secret (tombstones.py): without the secret the stored bits say nothing of the face and
two registries' sketches cannot be compared; with it they give back the embedding's direction
roughly, so a sketch is still biometric data (the README says what is kept and why). The planes are
fixed per encoder, not secret, so that rotating the secret re-masks every sketch.

Matching. A bit differs between two faces with probability angle / pi, independently per plane, so
the count of differing bits is binomial. An enrollment is compared with every erased face of its
tenant; the point is set so that a face the encoder itself calls another person (its angle at or
beyond the encoder's same-person threshold) is refused with probability at most ALPHA over all the
sketches compared: it tightens as erased people accumulate (a one-against-many check at a fixed
point refused more unrelated people the more were erased). A match refuses an enrollment until a
new consent reference is given; `benchmarks/face_sketch_refusals.py` measures both kinds of error
at 10, 100 and 1,000 erased people.
"""
from __future__ import annotations

import hashlib
import hmac
import math
from functools import lru_cache

import numpy as np

from ray_faceid.face.spec import EncoderSpec

BITS = 512
ALPHA = 0.05  # refusal chance, over all sketches compared, of a face at the encoder's same-person line


@lru_cache(maxsize=8)
def planes(spec_key: str, dim: int) -> np.ndarray:
    """The encoder's fixed hyperplanes (public: the mask, not the planes, carries the secret)."""
    seed = hashlib.sha256(f"ray_faceid face sketch v2\0{spec_key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(seed[:8], "big")).standard_normal((BITS, dim))


def legacy_planes(secret: bytes, spec: EncoderSpec) -> np.ndarray:
    """The planes sketches were drawn on before they were masked (tombstones of key scheme hmac-sha256)."""
    seed = hmac.new(secret, f"face-sketch\0{spec.key()}".encode(), hashlib.sha256).digest()
    return np.random.default_rng(int.from_bytes(seed[:8], "big")).standard_normal((BITS, spec.dim))


def _centre(embeddings: np.ndarray, dim: int) -> np.ndarray | None:
    """The unit mean direction of a person's embeddings; None where there is none (wrong width,
    NaN, zero vectors): such a face is neither sketched nor matched."""
    vectors = np.asarray(embeddings, np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != dim or not len(vectors) or not np.isfinite(vectors).all():
        return None
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms < 1e-9).any():
        return None
    mean = (vectors / norms).mean(axis=0)
    length = float(np.linalg.norm(mean))
    return mean / length if length > 1e-9 else None


def sketch(embeddings: np.ndarray, spec: EncoderSpec, on: np.ndarray | None = None) -> bytes | None:
    """The sketch (64 bytes, unmasked) of a person's embeddings (one face or several), or None where
    they have no usable direction. `on`: other planes (legacy tombstones)."""
    centre = _centre(embeddings, spec.dim)
    if centre is None:
        return None
    return np.packbits((planes(spec.key(), spec.dim) if on is None else on) @ centre > 0).tobytes()


def same_person_angle(spec: EncoderSpec, norm: float = 1.0) -> float:
    """The angle between two embeddings of length `norm` at the encoder's same-person threshold (a
    Euclidean threshold applies to raw vectors: dlib's are about 1.3-1.6 long)."""
    if spec.metric == "cosine":
        return math.acos(max(-1.0, min(1.0, 1.0 - spec.threshold)))
    return 2 * math.asin(min(1.0, spec.threshold / (2 * max(norm, 1e-12))))


@lru_cache(maxsize=4096)
def max_differing_bits(angle: float, compared: int, alpha: float = ALPHA) -> int:
    """The most bits a match may differ in, with `compared` sketches checked: the largest count that
    a face at `angle` reaches with probability at most alpha / compared (-1: nothing matches)."""
    from scipy.stats import binom

    p = min(max(angle / math.pi, 1e-9), 1.0)
    t = int(binom.ppf(alpha / max(compared, 1), BITS, p))
    while t >= 0 and binom.cdf(t, BITS, p) > alpha / max(compared, 1):
        t -= 1
    return t


class Probe:
    """A new enrollment's face, sketched once and compared with every stored sketch."""

    def __init__(self, embeddings: np.ndarray, spec: EncoderSpec, on: np.ndarray | None = None):
        bits = sketch(embeddings, spec, on)
        self.bits = None if bits is None else np.unpackbits(np.frombuffer(bits, np.uint8))
        norm = float(np.linalg.norm(np.asarray(embeddings, np.float64), axis=-1).mean()) if bits else 1.0
        self.angle = same_person_angle(spec, norm)

    def differing(self, stored: bytes) -> int | None:
        """How many bits a stored (unmasked) sketch differs in; None when this face has no sketch
        (ValueError for a damaged one)."""
        if self.bits is None:
            return None
        other = np.unpackbits(np.frombuffer(stored, np.uint8))
        if other.shape != self.bits.shape:
            raise ValueError(f"a sketch of {other.size} bits, not {self.bits.size}")
        return int(np.count_nonzero(other != self.bits))

    def matches(self, stored: bytes, compared: int) -> bool:
        """Whether this face verifies against a stored (unmasked) sketch, `compared` sketches being
        checked in all."""
        differing = self.differing(stored)
        return differing is not None and differing <= max_differing_bits(self.angle, compared)
