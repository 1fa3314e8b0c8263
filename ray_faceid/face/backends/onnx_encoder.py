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
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a model's graph warnings (one line per initializer) are not the user's
        try:
            self._session = ort.InferenceSession(data, options, providers=providers or ort.get_available_providers())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise BackendUnavailable(f"{uri}: not an ONNX model onnxruntime can load "
                                     f"({str(exc).splitlines()[0][:160]})") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise BackendUnavailable(f"{uri}: takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an "
                                     "ArcFace-shaped recogniser takes one, N x 3 x 112 x 112")
        inp = inputs[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3 or tuple(inp.shape[2:]) != (112, 112):
            raise BackendUnavailable(f"{uri}: input shape {inp.shape} is not N x 3 x 112 x 112 (ArcFace-shaped)")
        self._input = inp.name
        # A model exported at a fixed batch (often 1) is run crop by crop at that batch.
        self._batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        rows = self._batch or 1
        # Probe once: the declared output shape may be symbolic, and a model that gives no N x D is no recogniser.
        try:
            probe = self._session.run(None, {self._input: np.zeros((rows, 3, 112, 112), np.float32)})[0]
        except Exception as exc:  # noqa: BLE001 - as above
            raise BackendUnavailable(f"{uri}: failed on an aligned crop ({str(exc).splitlines()[0][:160]}): give an "
                                     "ArcFace-shaped recogniser") from None
        if probe.ndim != 2 or probe.shape[0] != rows:
            raise BackendUnavailable(f"{uri}: gives outputs of shape {list(probe.shape)} for {rows} crop(s); a "
                                     "recogniser gives one embedding per crop (N x D)")
        dim = int(probe.shape[1])
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
        if self._batch is None:
            return self._session.run(None, {self._input: blob})[0].astype(np.float32)
        out = []
        for start in range(0, len(blob), self._batch):  # the model's fixed batch, the last one padded
            part = blob[start:start + self._batch]
            padded = np.concatenate([part, np.zeros((self._batch - len(part), *part.shape[1:]), np.float32)])
            out.append(self._session.run(None, {self._input: padded})[0][:len(part)])
        return np.concatenate(out).astype(np.float32)
