"""Face: everything the face stack measured about one face in one image."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ray_faceid.face.landmarks import Landmarks
from ray_faceid.face.spec import EncoderSpec


@dataclass
class Face:
    bbox: tuple[float, float, float, float]
    """x0, y0, x1, y1 in the pixels of the decoded (EXIF-rotated) image."""
    score: float
    """Detector confidence (backend-specific scale)."""
    landmarks: Landmarks
    embedding: np.ndarray | None = None
    spec: EncoderSpec | None = None
    attributes: dict[str, float | None] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    aligned: np.ndarray | None = None
    """112x112 RGB crop on the ArcFace template."""

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    def to_dict(self, with_embedding: bool = False) -> dict:
        out = {
            "bbox": [round(float(v), 1) for v in self.bbox],
            "score": round(float(self.score), 4),
            "landmarks": self.landmarks.to_dict(),
            "attributes": {k: (None if v is None else round(float(v), 4)) for k, v in self.attributes.items()},
            "quality": {k: round(float(v), 4) for k, v in self.quality.items()},
            "encoder": self.spec.key() if self.spec else None,
        }
        if with_embedding and self.embedding is not None:
            out["embedding"] = [float(v) for v in self.embedding]
        return out
