"""Recognisers that embed ArcFace-aligned 112x112 crops: the alignment step they share."""
from __future__ import annotations

import numpy as np

from ray_faceid.face.align import ARCFACE_112, align
from ray_faceid.face.landmarks import Landmarks


class CropEncoder:
    """Subclasses give `spec` and `embed_crops` (N x 112 x 112 x 3 RGB uint8 -> N x D)."""

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images: list[np.ndarray], landmarks: list[list[Landmarks]]) -> list[np.ndarray]:
        crops, counts = [], []
        for img, lms in zip(images, landmarks):
            counts.append(len(lms))
            crops.extend(align(img, lm, ARCFACE_112)[0] for lm in lms)
        vectors = self.embed_crops(np.stack(crops) if crops else np.zeros((0, 112, 112, 3), np.uint8))
        return list(np.split(vectors, np.cumsum(counts)[:-1]))
