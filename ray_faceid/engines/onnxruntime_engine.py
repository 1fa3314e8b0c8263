"""The ONNX Runtime engine (CPU, or CUDA where onnxruntime-gpu is installed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ray_faceid.engines.base import ADDED_INPUT_NAMES, INPUT_NAMES
from ray_faceid.errors import BackendUnavailable


def onnxruntime_session(path: str | Path, threads: int = 0, quiet: bool = False):
    """An InferenceSession on CUDA where onnxruntime-gpu has it, else on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable("ONNX Runtime is not installed: pip install 'ray_faceid[onnx]'") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxRuntimeUNetEngine:
    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0):
        # quiet: the unoptimised graph's CastLike nodes would each log a warning
        self.session = onnxruntime_session(path, threads, quiet=True)
        self.weight_inputs = {i.name for i in self.session.get_overridable_initializers()}
        self.weights: dict[str, np.ndarray] = {}  # fed with every call; the graph's defaults otherwise

    def refit(self, weights: dict[str, torch.Tensor]) -> int:
        """Run with these in-layer weights (ONNX initializer names) from now on: another identity's
        adapter with the same graph. Returns how many were set."""
        unknown = set(weights) - self.weight_inputs
        if unknown:
            raise BackendUnavailable(f"this graph does not take weight {sorted(unknown)[0]!r} as an input; rebuild it")
        self.weights = {n: t.detach().cpu().float().numpy() for n, t in weights.items()}
        return len(weights)

    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks, text_embeds=None,
                 time_ids=None, control_image=None):
        values = (sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks, text_embeds, time_ids,
                  control_image)
        feed = {n: v.detach().cpu().float().numpy() if n != "timestep" else np.asarray(float(v), np.float32)
                for n, v in zip(INPUT_NAMES + ADDED_INPUT_NAMES + ["control_image"], values) if v is not None}
        (out,) = self.session.run(["noise_pred"], {**feed, **self.weights})
        return torch.from_numpy(out).to(sample.device, sample.dtype)
