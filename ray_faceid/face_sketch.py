"""Face sketches: what a tombstone keeps of an erased person's face, so that the same face enrolled
again without a name is recognised, without keeping the face itself.

A sketch is 512 sign bits of the person's mean embedding (unit length) projected on hyperplanes
drawn from the registry's secret (BioHashing: revocable, a new secret gives unrelated sketches).
Each bit says only on which side of a secret hyperplane the face lies: without the secret the bits
say nothing of the face and two registries' sketches cannot be compared; with it they give back the
embedding's direction roughly, so a sketch is still biometric data (the README says what is kept and
why). The share of differing bits estimates the angle between two faces (random-hyperplane hashing:
a bit differs with probability angle / pi), compared with a stricter point than the encoder's own
same-person threshold: a match refuses an enrollment until the operator gives a consent reference,
so a false match costs more than a miss.
"""
from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np

from ray_faceid.face.spec import EncoderSpec

BITS = 512
# Share of the encoder's threshold a sketch must come within. Measured on the shared photos' dlib
# embeddings (half a person's photos sketched, the other half enrolled; 5 secrets): 0.05% of other
# people refused, 4% of the same people missed (at 0.8: 0.2% and 3%).
STRICT = 0.75


def _planes(secret: bytes, spec: EncoderSpec) -> np.ndarray:
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


def sketch(embeddings: np.ndarray, spec: EncoderSpec, secret: bytes) -> str | None:
    """The sketch (hex) of a person's embeddings (one face or several), or None where they have no
    usable direction."""
    centre = _centre(embeddings, spec.dim)
    return None if centre is None else np.packbits(_planes(secret, spec) @ centre > 0).tobytes().hex()


def same_person_angle(spec: EncoderSpec, norm: float = 1.0) -> float:
    """The angle between two embeddings of length `norm` at STRICT times the encoder's threshold
    (a Euclidean threshold applies to raw vectors: dlib's are about 1.3-1.6 long)."""
    if spec.metric == "cosine":
        return math.acos(max(-1.0, min(1.0, 1.0 - STRICT * spec.threshold)))
    return 2 * math.asin(min(1.0, STRICT * spec.threshold / (2 * max(norm, 1e-12))))


class Probe:
    """A new enrollment's face, sketched once and compared with every stored sketch."""

    def __init__(self, embeddings: np.ndarray, spec: EncoderSpec, secret: bytes):
        bits = sketch(embeddings, spec, secret)
        self.bits = None if bits is None else np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))
        norm = float(np.linalg.norm(np.asarray(embeddings, np.float64), axis=-1).mean()) if bits else 1.0
        self.angle = same_person_angle(spec, norm)

    def matches(self, stored: str) -> bool:
        """Whether this face verifies against the person a stored sketch was made from (ValueError
        for a damaged sketch)."""
        if self.bits is None:
            return False
        other = np.unpackbits(np.frombuffer(bytes.fromhex(stored), np.uint8))
        if other.shape != self.bits.shape:
            raise ValueError(f"a sketch of {other.size} bits, not {self.bits.size}")
        return math.pi * float(np.mean(other != self.bits)) <= self.angle
