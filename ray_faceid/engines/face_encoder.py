"""The FaceEncoderEngine protocol and its runtimes for the ported dlib ResNet (the embedded default
recogniser): torch (CPU threads or CUDA), ONNX Runtime, TensorRT.

Every runtime computes the same function on dlib's 150 px face chips, so all share dlib's
EncoderSpec. The TensorRT plan is built in fp32 with TF32 off: embeddings are compared against a
fixed threshold (0.6) and must match dlib's, so this engine trades the fp16 speed-up for parity.
"""
from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ray_faceid.engines.cache import EngineCache, EngineKey
from ray_faceid.errors import BackendUnavailable

BATCH = (1, 64, 256)  # min, opt, max chips per call of a built engine
RUNTIMES = ("torch", "onnxruntime", "tensorrt")


class FaceEncoderEngine(Protocol):
    backend: str

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """N x 150 x 150 x 3 uint8 RGB chips (dlib's alignment) -> N x 128 float32 embeddings."""
        ...


def _in_batches(fn, chips: np.ndarray, size: int) -> np.ndarray:
    out = [fn(chips[i : i + size]) for i in range(0, len(chips), size)]
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


class TorchFaceEncoderEngine:
    backend = "torch"

    def __init__(self, net: torch.nn.Module, device: str | torch.device | None = None, batch_size: int = 64):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.eval().to(self.device)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # the cuDNN flags below are process-wide

    def _run(self, chips: np.ndarray) -> np.ndarray:
        # cuDNN would use TF32 for these fp32 convolutions on Ampere+, which moves embeddings
        # past the 1e-3 that keeps them dlib's; full fp32 is cheap for a network this small.
        with self._lock, torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return self.net(torch.from_numpy(np.ascontiguousarray(chips)).to(self.device)).float().cpu().numpy()

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return _in_batches(self._run, chips, self.batch_size)


def export_face_encoder(net: torch.nn.Module, chip_size: int, path: str | Path) -> Path:
    """The recogniser as an ONNX graph with a dynamic batch, checked with onnx.checker."""
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs the onnx extra: pip install 'ray_faceid[onnx]'") from exc
    path = Path(path)
    example = torch.zeros(2, chip_size, chip_size, 3, dtype=torch.uint8)
    # The TorchScript exporter: this network is plain convolutions, and it keeps uint8 input as is.
    # Its warnings are about the residual padding's shapes, fixed by the chip size: expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(copy.deepcopy(net).eval().cpu(), (example,), str(path), dynamo=False, input_names=["chips"],
                          output_names=["embeddings"], dynamic_axes={"chips": {0: "n"}, "embeddings": {0: "n"}})
    onnx.checker.check_model(str(path))
    return path


class OnnxRuntimeFaceEncoderEngine:
    backend = "onnxruntime"

    def __init__(self, path: str | Path, batch_size: int = 256):
        from ray_faceid.engines.onnxruntime_engine import onnxruntime_session

        self.session = onnxruntime_session(path)
        self.batch_size = batch_size

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        run = lambda part: self.session.run(["embeddings"], {"chips": np.ascontiguousarray(part)})[0]  # noqa: E731
        return _in_batches(run, chips, self.batch_size).astype(np.float32)


class TensorRTFaceEncoderEngine:
    backend = "tensorrt"

    def __init__(self, plan_path: str | Path):
        from ray_faceid.engines.tensorrt_engine import TensorRTRunner

        self.runner = TensorRTRunner(plan_path)

    def _run(self, chips: np.ndarray) -> np.ndarray:
        out = self.runner.run({"chips": torch.from_numpy(np.ascontiguousarray(chips))})["embeddings"]
        return out.float().cpu().numpy()

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        return _in_batches(self._run, chips, BATCH[2])


def face_encoder_engine(net: torch.nn.Module, chip_size: int, model_hash: str, runtime: str = "torch",
                        cache: EngineCache | None = None, device: str | None = None) -> FaceEncoderEngine:
    """The recogniser on `runtime`; exported graphs and built plans come from the EngineCache,
    keyed by the weight file's hash (`model_hash`) and, for TensorRT, the GPU and version."""
    if runtime not in RUNTIMES:
        raise BackendUnavailable(f"recogniser runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "torch":
        return TorchFaceEncoderEngine(net, device)
    if runtime == "tensorrt":  # before the export: say what is missing first
        from ray_faceid.engines.tensorrt_engine import import_tensorrt

        import_tensorrt()
    cache = cache or EngineCache()
    common = dict(graph="face_encoder", model_hash=model_hash, batch=BATCH)
    onnx_key = EngineKey(backend="onnx", runtime_version="torchscript-exporter", **common)
    onnx_path = cache.get_or_build(onnx_key, "face_encoder.onnx",
                                   lambda folder: export_face_encoder(net, chip_size, folder / "face_encoder.onnx"))
    if runtime == "onnxruntime":
        return OnnxRuntimeFaceEncoderEngine(onnx_path)
    from ray_faceid.engines.base import device_tag
    from ray_faceid.engines.tensorrt_engine import build_plan, import_tensorrt

    trt = import_tensorrt()
    plan_key = EngineKey(backend="tensorrt", device=device_tag(), runtime_version=trt.__version__, **common)
    profile = {"chips": tuple((n, chip_size, chip_size, 3) for n in BATCH)}
    plan = cache.get_or_build(plan_key, "face_encoder.plan", lambda folder: build_plan(
        onnx_path, profile, folder / "face_encoder.plan", refittable=False, tf32=False,
        timing_cache=cache.root / "timing.cache"))
    return TensorRTFaceEncoderEngine(plan)
