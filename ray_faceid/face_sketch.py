"""Face sketches: what a tombstone keeps of an erased person's face, so that the same face enrolled
again without a name (or under another one) is recognised, without keeping the face.

A sketch is 512 sign bits of the person's mean embedding (unit length) projected on hyperplanes
drawn from the registry's secret (BioHashing: revocable, a new secret gives unrelated sketches).
Each bit says only on which side of a secret hyperplane the face lies, so the embedding cannot be
rebuilt from it, and without the secret two registries' sketches cannot be compared. The share of
differing bits estimates the angle between two faces (random-hyperplane hashing: a bit differs with
probability angle / pi), which is compared with a stricter point than the encoder's own same-person
threshold: a match refuses an enrollment until the operator gives a new consent reference, so a
false match costs more than a miss. With the secret, the bits give back the direction of the mean
embedding only roughly; the README says what is kept and why.
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


def _centre(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, np.float64).reshape(-1, np.shape(embeddings)[-1])
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    mean = vectors.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def sketch(embeddings: np.ndarray, spec: EncoderSpec, secret: bytes) -> str:
    """The sketch (hex) of a person's embeddings: one face or several."""
    return np.packbits(_planes(secret, spec) @ _centre(embeddings) > 0).tobytes().hex()


def same_person_angle(spec: EncoderSpec, norm: float = 1.0) -> float:
    """The angle between two embeddings of length `norm` at STRICT times the encoder's threshold
    (a Euclidean threshold applies to raw vectors: dlib's are about 1.3-1.6 long)."""
    if spec.metric == "cosine":
        return math.acos(max(-1.0, min(1.0, 1.0 - STRICT * spec.threshold)))
    return 2 * math.asin(min(1.0, STRICT * spec.threshold / (2 * max(norm, 1e-12))))


def estimated_angle(stored: str, embeddings: np.ndarray, spec: EncoderSpec, secret: bytes) -> float:
    a = np.unpackbits(np.frombuffer(bytes.fromhex(stored), np.uint8))
    b = np.unpackbits(np.frombuffer(bytes.fromhex(sketch(embeddings, spec, secret)), np.uint8))
    return math.pi * float(np.mean(a != b))


def matches(stored: str, embeddings: np.ndarray, spec: EncoderSpec, secret: bytes) -> bool:
    """Whether `embeddings` verify against the person a stored sketch was made from."""
    norm = float(np.linalg.norm(np.asarray(embeddings, np.float64).reshape(-1, spec.dim), axis=1).mean())
    return estimated_angle(stored, embeddings, spec, secret) <= same_person_angle(spec, norm)
