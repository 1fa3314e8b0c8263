"""The embedded default: dlib's HOG/MMOD detectors, shape predictors and 128-d ResNet.

Weights come from the `face-recognition-models` wheel. That package imports `pkg_resources`
(gone from recent setuptools), so its files are located with importlib instead of imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.backends.base import Detection, FaceBackend
from ray_faceid.face.landmarks import DLIB5, IBUG68, Landmarks
from ray_faceid.face.spec import EncoderSpec

log = logging.getLogger(__name__)

RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LICENSE_NOTE = (
    "dlib detector, 5-point landmarks and ResNet recogniser: public domain (Davis King). "
    "The 68-point landmark model was trained on iBUG 300-W: non-commercial use only."
)


def _dlib():
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib-bin is a core dependency
        raise BackendUnavailable("dlib is not installed: pip install dlib-bin") from exc
    return dlib


def model_path(filename: str) -> Path:
    """Path of a weight file shipped by face-recognition-models."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("dlib weights missing: pip install face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise BackendUnavailable(f"dlib weight file {filename} missing from face-recognition-models at {path.parent}")
    return path


@lru_cache(maxsize=None)
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def dlib_encoder_spec() -> EncoderSpec:
    path = model_path(RECOGNIZER_FILE)
    return EncoderSpec(
        name="dlib_resnet",
        dim=128,
        version=f"{path.stem}@{_file_digest(path)}",
        license="public domain (dlib)",
        metric="euclidean",
        # dlib's published operating point: 99.38% on LFW at distance 0.6.
        threshold=0.6,
    )


def _rect(bbox):
    dlib = _dlib()
    x0, y0, x1, y1 = (int(round(v)) for v in bbox)
    return dlib.rectangle(x0, y0, x1, y1)


class HogDetector:
    """dlib's frontal HOG + linear SVM detector; run on whatever resolution it is given."""

    def __init__(self):
        self._detector = _dlib().get_frontal_face_detector()

    def detect(self, image: np.ndarray) -> list[Detection]:
        rects, scores, _ = self._detector.run(image, 0, 0.0)
        return [Detection((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]


class MmodDetector:
    """dlib's MMOD CNN detector: better recall on hard poses and occlusion, slow on CPU."""

    def __init__(self):
        self._detector = _dlib().cnn_face_detection_model_v1(str(model_path("mmod_human_face_detector.dat")))

    def detect(self, image: np.ndarray) -> list[Detection]:
        found = self._detector(image, 0)
        return [
            Detection((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence))
            for d in found
        ]


class ShapeLandmarker:
    def __init__(self, points: int = 5):
        filename = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}[points]
        self.scheme = DLIB5 if points == 5 else IBUG68
        self._predictor = _dlib().shape_predictor(str(model_path(filename)))

    def locate(self, image: np.ndarray, bbox) -> Landmarks:
        shape = self._predictor(image, _rect(bbox))
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return Landmarks(self.scheme, pts)


class DlibEncoder:
    """The 128-d ResNet. It aligns faces itself (dlib's face chip, 150x150, padding 0.25):
    that is the exact preprocessing it was trained with."""

    def __init__(self, num_jitters: int = 0):
        self._model = _dlib().face_recognition_model_v1(str(model_path(RECOGNIZER_FILE)))
        self.spec = dlib_encoder_spec()
        self.num_jitters = num_jitters

    def _shape(self, lm: Landmarks):
        dlib = _dlib()
        pts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in lm.points])
        x0, y0 = lm.points.min(axis=0)
        x1, y1 = lm.points.max(axis=0)
        return dlib.full_object_detection(_rect((x0, y0, x1, y1)), pts)

    def embed(self, images: list[np.ndarray], landmarks: list[list[Landmarks]]) -> list[np.ndarray]:
        dlib = _dlib()
        batch_imgs, batch_shapes, owners = [], [], []
        for i, (img, lms) in enumerate(zip(images, landmarks)):
            if lms:
                batch_imgs.append(img)
                batch_shapes.append(dlib.full_object_detections([self._shape(lm) for lm in lms]))
                owners.append(i)
        out = [np.zeros((0, self.spec.dim), np.float32) for _ in images]
        if batch_imgs:
            vectors = self._model.compute_face_descriptor(batch_imgs, batch_shapes, self.num_jitters)
            for i, vecs in zip(owners, vectors):
                out[i] = np.array([np.array(v) for v in vecs], dtype=np.float32)
        return out


class HogFramedMtcnn:
    """MTCNN's faces with boxes framed as dlib's HOG frames them (MTCNN's box shifted down 7% and
    grown 6%: the median over faces both found in the shared photos), so that dlib's landmark
    predictor, trained on HOG boxes, locates the points as it does for HOG's own faces."""

    def __init__(self, min_face: float):
        from ray_faceid.face.backends.mtcnn import MtcnnDetector

        self._mtcnn = MtcnnDetector(min_face)

    def detect(self, image: np.ndarray, min_face: float | None = None) -> list[Detection]:
        out = []
        for d in self._mtcnn.detect(image, min_face):
            x0, y0, x1, y1 = d.bbox
            half, cx, cy = 1.06 * (x1 - x0) / 2, (x0 + x1) / 2, (y0 + y1) / 2 + 0.07 * (x1 - x0)
            out.append(Detection((cx - half, cy - half, cx + half, cy + half), d.score))
        return out


def small_face_detector(min_face: float):
    """The small-face pass where its weights are installed; None (said once) where they are not."""
    from ray_faceid.face.backends.mtcnn import weights_folder

    try:
        weights_folder()
    except BackendUnavailable as exc:
        if not _SAID_NO_SMALL_FACES:
            _SAID_NO_SMALL_FACES.append(True)
            log.warning("small faces (under ~80 px) will be missed in group photos: %s", exc.message)
        return None
    return lambda: HogFramedMtcnn(min_face)


_SAID_NO_SMALL_FACES: list = []


def build_dlib_backend(
    detector: str = "hog",
    landmark_points: int = 5,
    cnn_fallback: bool = True,
    num_jitters: int = 0,
    encoder_runtime: str = "torch",
    small_faces: bool = True,
    small_face_px: float = 20.0,
):
    encoder = DlibEncoder(num_jitters) if encoder_runtime == "dlib" else PortedDlibEncoder(num_jitters, runtime=encoder_runtime)
    return FaceBackend(
        name=f"dlib-{detector}",
        encoder=encoder,
        make_detector=MmodDetector if detector == "cnn" else HogDetector,
        make_landmarker=lambda: ShapeLandmarker(landmark_points),
        make_fallback_detector=MmodDetector if (detector == "hog" and cnn_fallback) else None,
        make_small_face_detector=small_face_detector(small_face_px) if (detector == "hog" and small_faces) else None,
        license_note=LICENSE_NOTE,
    )


class PortedDlibEncoder(DlibEncoder):
    """The same ResNet ported to torch (weights read from the same file): identical embeddings
    (same EncoderSpec), computed in batches on `runtime`: torch (all CPU cores, or CUDA when
    present), onnxruntime or tensorrt (engines built once into the engine cache)."""

    def __init__(self, num_jitters: int = 0, device: str | None = None, runtime: str = "torch", cache=None):
        from ray_faceid.engines.face_encoder import face_encoder_engine
        from ray_faceid.face.backends.dlib_dat import read_dlib_resnet
        from ray_faceid.face.backends.dlib_resnet_torch import DlibResNet

        if num_jitters:
            raise BackendUnavailable("num_jitters needs the dlib encoder runtime (encoder_runtime='dlib')")
        self.spec = dlib_encoder_spec()
        self.num_jitters = 0
        net = DlibResNet(read_dlib_resnet(model_path(RECOGNIZER_FILE).read_bytes()))
        self.chip_size = net.chip_size
        self.engine = face_encoder_engine(net, net.chip_size, self.spec.version, runtime, cache, device)

    def chips(self, image: np.ndarray, landmarks: list[Landmarks]) -> list[np.ndarray]:
        """dlib's own face-chip alignment (150 px, padding 0.25): what the network was trained on."""
        dlib = _dlib()
        shapes = dlib.full_object_detections([self._shape(lm) for lm in landmarks])
        return list(dlib.get_face_chips(image, shapes, self.chip_size, 0.25))

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        return self.engine(chips)

    def embed(self, images: list[np.ndarray], landmarks: list[list[Landmarks]]) -> list[np.ndarray]:
        chips, counts = [], []
        for img, lms in zip(images, landmarks):
            counts.append(len(lms))
            if lms:
                chips.extend(self.chips(img, lms))
        vectors = self.embed_chips(np.stack(chips) if chips else np.zeros((0, 150, 150, 3), np.uint8))
        return list(np.split(vectors, np.cumsum(counts)[:-1]))
