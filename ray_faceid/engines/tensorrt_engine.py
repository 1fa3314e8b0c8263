"""The TensorRT engine: built from the ONNX graph (optimisation profile over the batch, fp16 or
bf16, a timing cache), refittable so per-identity layer weights are applied by refit instead of a
rebuild, and run on torch CUDA tensors. TensorRT is imported only here, lazily; it lives in the
`tensorrt` extra (NVIDIA's index) and needs a GPU. `benchmarks/gpu_check.py` exercises this path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ray_faceid.engines.base import INPUT_NAMES, EngineShape
from ray_faceid.errors import BackendUnavailable

INSTALL = ("TensorRT is not installed: pip install 'ray_faceid[tensorrt]' --extra-index-url https://pypi.nvidia.com "
           "(on a machine with an NVIDIA GPU and driver)")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(INSTALL) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime or torch here")
    return trt


def device_tag() -> str:
    """GPU name and compute capability: a TensorRT plan only runs where it was built."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm_{major}{minor}"


def build_plan(onnx_path: Path, shape: EngineShape, plan_path: Path, precision: str = "fp16",
               timing_cache: Path | None = None) -> Path:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)  # identity weights in layers change by refit, not rebuild
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, value in shape.example().items():
        if name == "timestep":
            profile.set_shape(name, (), (), ())
            continue
        rest = tuple(value.shape[1:])
        profile.set_shape(name, (shape.batch[0], *rest), (shape.batch[1], *rest), (shape.batch[2], *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


class TensorRTUNetEngine:
    backend = "tensorrt"

    def __init__(self, plan_path: str | Path):
        trt = import_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{plan_path} is not a TensorRT engine for this GPU / TensorRT version")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def refit(self, onnx_weights: dict[str, "torch.Tensor"]) -> int:
        """Replace named weights (ONNX initializer names) in place; returns how many were refitted."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        for name, tensor in onnx_weights.items():
            array = tensor.detach().float().cpu().numpy()
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise BackendUnavailable(f"engine has no refittable weight {name!r}")
        if not refitter.refit_cuda_engine():
            raise BackendUnavailable("TensorRT refit failed; rebuild the engine")
        return len(onnx_weights)

    @torch.no_grad()
    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks):
        values = dict(zip(INPUT_NAMES, (sample, timestep.float().reshape(()), text_tokens, identity_tokens,
                                         identity_scale, region_masks)))
        dtype = sample.dtype
        inputs = {n: v.to("cuda", torch.float32).contiguous() for n, v in values.items()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("noise_pred")), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address("noise_pred", out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.to(dtype)
