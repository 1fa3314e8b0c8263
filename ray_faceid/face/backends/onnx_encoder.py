"""Any ArcFace-shaped ONNX recogniser: N x 3 x 112 x 112 (RGB, (x - 127.5) / 127.5) -> N x D."""
from __future__ import annotations

import hashlib

import numpy as np

from ray_faceid import storage
from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.backends.crop_encoder import CropEncoder
from ray_faceid.face.spec import EncoderSpec

# Cosine distance; similarity 0.32 is a common operating point for ArcFace-R100-class models.
ARCFACE_COSINE_THRESHOLD = 0.68


class OnnxArcFaceEncoder(CropEncoder):
    def __init__(self, uri: str, name: str = "arcface_onnx", license: str = "as stated by the model's publisher",
                 threshold: float = ARCFACE_COSINE_THRESHOLD, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("an ONNX recogniser needs onnxruntime: pip install 'ray_faceid[onnx]'") from exc
        data = storage.read_bytes(uri)
        self._session = ort.InferenceSession(data, providers=providers or ort.get_available_providers())
        inp = self._session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3 or tuple(inp.shape[2:]) != (112, 112):
            raise BackendUnavailable(f"{uri}: input shape {inp.shape} is not N x 3 x 112 x 112 (ArcFace-shaped)")
        self._input = inp.name
        dim = self._session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            dim = int(self._session.run(None, {self._input: np.zeros((1, 3, 112, 112), np.float32)})[0].shape[-1])
        self.spec = EncoderSpec(
            name=name,
            dim=dim,
            version=f"{uri.rsplit('/', 1)[-1]}@{hashlib.sha256(data).hexdigest()[:12]}",
            license=license,
            metric="cosine",
            threshold=threshold,
        )

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embeddings of aligned 112x112 RGB uint8 crops (N x 112 x 112 x 3)."""
        if len(crops) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        blob = (crops.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
        return self._session.run(None, {self._input: blob})[0].astype(np.float32)
