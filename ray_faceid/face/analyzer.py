"""FaceAnalyzer: decode -> detect -> landmarks -> align -> embed -> attributes and quality."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_faceid.config import FaceConfig
from ray_faceid.errors import BadImage, FaceIdError
from ray_faceid.face.align import ARCFACE_112, align
from ray_faceid.face.attributes import face_attributes
from ray_faceid.face.backends import Detector, FaceBackend, Landmarker, build_backend
from ray_faceid.face.decode import ImageSource, decode_image
from ray_faceid.face.detect import detect_faces
from ray_faceid.face.face import Face
from ray_faceid.face.quality import face_quality
from ray_faceid.face.spec import EncoderSpec


@dataclass
class _ThreadParts:
    detector: Detector
    landmarker: Landmarker | None
    fallback: Detector | None
    small: Detector | None = None


class FaceAnalyzer:
    """Loads the backend's models once; then analyzes images one at a time or in batches."""

    def __init__(self, config: FaceConfig | None = None, backend: FaceBackend | None = None):
        self.config = config or FaceConfig()
        self.backend = backend or build_backend(self.config)
        threads = self.config.threads or os.cpu_count() or 1
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="face") if threads > 1 else None

    @property
    def spec(self) -> EncoderSpec:
        return self.backend.encoder.spec

    @property
    def threshold(self) -> float:
        """Same-person distance threshold: the encoder's own unless the config overrides it."""
        override = self.config.verify_threshold
        return self.spec.threshold if override is None else override

    def load(self, image: ImageSource | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise BadImage(f"arrays must be H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
            return np.ascontiguousarray(image)
        return decode_image(image, self.config.decode)

    def _parts(self) -> _ThreadParts:
        parts = getattr(self._local, "parts", None)
        if parts is None:
            b = self.backend
            parts = self._local.parts = _ThreadParts(
                b.make_detector(),
                b.make_landmarker() if b.make_landmarker else None,
                b.make_fallback_detector() if b.make_fallback_detector else None,
                b.make_small_face_detector() if b.make_small_face_detector else None,
            )
        return parts

    def _locate(self, image: np.ndarray) -> list[Face]:
        parts = self._parts()
        detections = detect_faces(image, parts.detector, self.config.detection, parts.fallback, parts.small)
        if self.config.detection.policy == "largest":
            detections = detections[:1]
        faces = []
        for d in detections:
            lm = d.landmarks if d.landmarks is not None else parts.landmarker.locate(image, d.bbox)
            faces.append(Face(bbox=d.bbox, score=d.score, landmarks=lm))
        return faces

    def _describe(self, image: np.ndarray, face: Face) -> None:
        face.aligned, _ = align(image, face.landmarks, ARCFACE_112)
        face.attributes = face_attributes(face.landmarks)
        face.quality = face_quality(face.width, face.aligned, face.attributes["yaw"], face.attributes["pitch"])

    def _load_and_locate(self, image: ImageSource | np.ndarray) -> tuple[np.ndarray, list[Face]] | FaceIdError:
        try:
            array = self.load(image)
            return array, self._locate(array)
        except FaceIdError as exc:
            return exc

    def analyze_batch(
        self, images: list[ImageSource | np.ndarray], return_errors: bool = False
    ) -> list[list[Face] | FaceIdError]:
        """Faces of each image. Threads decode and detect (dlib's detector releases the GIL), then
        one encoder batch embeds every face. An unusable image raises its BadImage, or with
        `return_errors` takes the error's place in the result."""
        if self._pool is not None and len(images) > 1:
            located = list(self._pool.map(self._load_and_locate, images))
        else:
            located = [self._load_and_locate(img) for img in images]
        errors = [item for item in located if isinstance(item, FaceIdError)]
        if errors and not return_errors:
            raise errors[0]
        good = [item for item in located if not isinstance(item, FaceIdError)]
        vectors = self.backend.encoder.embed([arr for arr, _ in good], [[f.landmarks for f in faces] for _, faces in good])
        for (array, faces), vecs in zip(good, vectors):
            for face, vec in zip(faces, vecs):
                face.embedding = vec
                face.spec = self.spec
                self._describe(array, face)
        return [item if isinstance(item, FaceIdError) else item[1] for item in located]

    def analyze(self, image: ImageSource | np.ndarray) -> list[Face]:
        """Faces in one image (largest first; one face unless the policy is 'all')."""
        return self.analyze_batch([image])[0]

    def distance(self, a: Face | np.ndarray, b: Face | np.ndarray) -> float:
        for f in (a, b):
            if isinstance(f, Face) and f.spec is not None:
                self.spec.check_compatible(f.spec)
        ea = a.embedding if isinstance(a, Face) else a
        eb = b.embedding if isinstance(b, Face) else b
        return float(self.spec.distance(ea, eb))

    def verify(self, a: Face | np.ndarray, b: Face | np.ndarray) -> tuple[bool, float]:
        """(same person?, distance) at this analyzer's threshold."""
        d = self.distance(a, b)
        return d <= self.threshold, d


def sample_images() -> list[Path]:
    """Real photos that ship with insightface (t1.jpg: 6 people; Tom_Hanks_54745.png), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "images"
    return [folder / n for n in ("t1.jpg", "Tom_Hanks_54745.png") if (folder / n).is_file()]
