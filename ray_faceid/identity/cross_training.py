"""Cross-training batches (CrossFaceID): the identity comes from shot A, the target image,
keypoints, face mask and caption from shot B of the same person, A != B.

Shots are rows of the ingest job's faces table, already loaded: an embedding, the aligned
target crop (H x W x 3 uint8, the loose diffusion template), its landmarks in crop pixels and a
caption. Assembling checks the pairing rules so a bad pair is refused, never learned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ray_faceid.errors import BadInput


@dataclass
class Shot:
    face_id: str
    person: str
    embedding: np.ndarray
    image: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    """(K, 2) points in `image` pixels; their bounding box (grown) is the face mask."""
    caption: str = ""
    expression: list[float] | None = None
    """The shot's expression code (expression.code_from_attributes)."""
    quality: float = 1.0


@dataclass
class CrossBatch:
    id_embeddings: torch.Tensor  # B, D (from A)
    pixels: torch.Tensor  # B, 3, H, W in [-1, 1] (from B)
    face_masks: torch.Tensor  # B, 1, H, W in {0, 1} (from B)
    captions: list[str]  # of B
    expressions: torch.Tensor | None  # B, E of B
    people: list[str]
    target_embeddings: torch.Tensor | None = None  # B, D of B (the IMR's target tokens)
    image_features: torch.Tensor | None = None  # B, S, H: CLIP features of A's faces (FaceID-Plus's second input)
    photo_embeddings: torch.Tensor | None = None  # B, R, D: each of A's photos its own (FaceID-Portrait's tokens)
    keypoints: torch.Tensor | None = None  # B, 5, 2: B's five points in pixels (InstantID's IdentityNet reads them)


def face_mask(landmarks: np.ndarray, height: int, width: int, grow: float = 0.6) -> np.ndarray:
    """A box around the landmarks grown by `grow` of its size on each side (forehead, hair, chin)."""
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    gx, gy = (x1 - x0) * grow, (y1 - y0) * grow
    mask = np.zeros((height, width), np.float32)
    r0, r1 = int(max(0, y0 - 1.4 * gy)), int(min(height, y1 + gy))
    c0, c1 = int(max(0, x0 - gx)), int(min(width, x1 + gx))
    mask[r0:r1, c0:c1] = 1.0
    return mask


def assemble_cross_batch(pairs: list[tuple[Shot, Shot]]) -> CrossBatch:
    for a, b in pairs:
        if a.person != b.person:
            raise BadInput(f"cross pair {a.face_id} / {b.face_id} crosses people ({a.person} vs {b.person})")
        if a.face_id == b.face_id:
            raise BadInput(f"cross pair uses shot {a.face_id} as both identity and target")
        if b.image is None or b.landmarks is None:
            raise BadInput(f"target shot {b.face_id} has no image or landmarks")
    pixels, masks = [], []
    for _, b in pairs:
        h, w = b.image.shape[:2]
        pixels.append(torch.tensor(b.image, dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1)
        masks.append(torch.from_numpy(face_mask(b.landmarks, h, w))[None])
    expressions = None
    if all(b.expression is not None for _, b in pairs):
        expressions = torch.tensor([b.expression for _, b in pairs], dtype=torch.float32)
    return CrossBatch(
        id_embeddings=torch.tensor(np.stack([a.embedding for a, _ in pairs]), dtype=torch.float32),
        pixels=torch.stack(pixels),
        face_masks=torch.stack(masks),
        captions=[b.caption for _, b in pairs],
        expressions=expressions,
        people=[a.person for a, _ in pairs],
        target_embeddings=torch.tensor(np.stack([b.embedding for _, b in pairs]), dtype=torch.float32),
    )
