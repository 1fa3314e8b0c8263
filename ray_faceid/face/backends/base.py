"""The protocols a face backend implements: detect, locate landmarks, embed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ray_faceid.face.landmarks import Landmarks, LandmarkScheme
from ray_faceid.face.spec import EncoderSpec


@dataclass
class Detection:
    bbox: tuple[float, float, float, float]
    score: float
    landmarks: Landmarks | None = None
    """Set by detectors that predict key points themselves (SCRFD)."""


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, in that image's pixels."""


class Landmarker(Protocol):
    scheme: LandmarkScheme

    def locate(self, image: np.ndarray, bbox: tuple[float, float, float, float]) -> Landmarks: ...


class Encoder(Protocol):
    spec: EncoderSpec

    def embed(self, images: list[np.ndarray], landmarks: list[list[Landmarks]]) -> list[np.ndarray]:
        """For each image, an (n_faces x dim) float32 array of the faces given by their landmarks."""


@dataclass
class FaceBackend:
    """A backend's parts. Detectors and landmarkers come as factories: dlib's are not thread-safe,
    so each analyzing thread builds its own (they are small); the encoder is shared."""

    name: str
    encoder: Encoder
    make_detector: Callable[[], Detector]
    make_landmarker: Callable[[], Landmarker] | None = None
    """None when the detector already gives landmarks."""
    make_fallback_detector: Callable[[], Detector] | None = None
    """A slower, higher-recall detector tried where the main one finds nothing."""
    make_small_face_detector: Callable[[], Detector] | None = None
    """A detector of faces down to ~20 px, run on photos without a dominant face (face/detect.py)."""
    license_note: str = ""
