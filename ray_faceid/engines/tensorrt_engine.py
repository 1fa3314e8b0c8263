"""TensorRT: build a plan from an ONNX graph, run it on torch CUDA tensors, refit named weights.

Written for strongly typed networks (always on in TensorRT 11, whose builder has no FP16/BF16
flags left; opt-in since 10.0): an engine's precision is its ONNX graph's, so a half-precision
engine is built from a graph exported in fp16 or bf16. Plans are refittable: per-identity weights
inside the UNet's layers are swapped by refit, never by a rebuild. TensorRT is imported only here,
lazily; it lives in the `tensorrt` extra (NVIDIA's index) and needs a GPU.
`benchmarks/gpu_check.py` exercises this path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ray_faceid.engines.base import ADDED_INPUT_NAMES, INPUT_NAMES, EngineShape
from ray_faceid.errors import BackendUnavailable

INSTALL = ("TensorRT is not installed: pip install 'ray_faceid[tensorrt]' --extra-index-url https://pypi.nvidia.com "
           "(on a machine with an NVIDIA GPU and driver)")

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(INSTALL) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime or torch here")
    return trt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.UINT8: torch.uint8, trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
             trt.DataType.BOOL: torch.bool}
    if dtype not in table:
        raise BackendUnavailable(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


def unet_profile(shape: EngineShape) -> Profile:
    """min/opt/max shapes of the UNet's batched inputs (the timestep is a scalar)."""
    profile = {}
    for name, value in shape.example().items():
        if name != "timestep":
            rest = tuple(value.shape[1:])
            profile[name] = tuple((b, *rest) for b in shape.batch)
    return profile


def build_plan(onnx_path: Path, profile: Profile, plan_path: Path, *, refittable: bool = True, tf32: bool = True,
               timing_cache: Path | None = None) -> Path:
    """Build a plan for the shapes in `profile` (input name -> min, opt, max). `tf32=False` keeps
    fp32 graphs in full fp32 (the recogniser, whose embeddings must match dlib's)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


class TensorRTRunner:
    """One deserialized plan: named torch tensors in, named CUDA tensors out, on torch's stream."""

    def __init__(self, plan_path: str | Path):
        trt = import_tensorrt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{plan_path} is not a TensorRT engine for this GPU / TensorRT version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {n: inputs[n].to("cuda", self.dtypes[n]).contiguous() for n in self.inputs}  # alive until done
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda", dtype=self.dtypes[name])
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()  # ordered after the ops that made the inputs
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendUnavailable("TensorRT execution failed (see the TensorRT log above)")
        stream.synchronize()  # the feeds may be freed after this
        return outputs

    def refit(self, weights: dict[str, torch.Tensor]) -> int:
        """Replace weights by their ONNX initializer names, in the engine's own dtypes; returns
        how many were refitted."""
        trt = self.trt
        refitter = trt.Refitter(self.engine, self.logger)
        held = []  # device copies must outlive refit_cuda_engine
        for name, tensor in weights.items():
            prototype = refitter.get_weights_prototype(name)
            if prototype.size < 0:
                raise BackendUnavailable(f"engine has no refittable weight {name!r}; rebuild it")
            value = tensor.detach().to("cuda", _torch_dtype(trt, prototype.dtype)).contiguous()
            held.append(value)
            if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, value.data_ptr(), value.numel()),
                                              trt.TensorLocation.DEVICE):
                raise BackendUnavailable(f"TensorRT rejected new weights for {name!r} (shape or dtype)")
        if not refitter.refit_cuda_engine():
            raise BackendUnavailable("TensorRT refit failed; rebuild the engine")
        return len(weights)


class TensorRTUNetEngine:
    backend = "tensorrt"

    def __init__(self, plan_path: str | Path):
        self.runner = TensorRTRunner(plan_path)

    def refit(self, onnx_weights: dict[str, torch.Tensor]) -> int:
        return self.runner.refit(onnx_weights)

    @torch.no_grad()
    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks, text_embeds=None,
                 time_ids=None):
        values = (sample, timestep.float().reshape(()), text_tokens, identity_tokens, identity_scale, region_masks,
                  text_embeds, time_ids)
        feed = {n: v for n, v in zip(INPUT_NAMES + ADDED_INPUT_NAMES, values) if v is not None}
        out = self.runner.run(feed)["noise_pred"]
        return out.to(sample.device, sample.dtype)
