"""Pick and build the UNet engine for a pipeline: `auto` = torch.compile (Inductor + CUDA graphs)
on CUDA, else ONNX Runtime when installed, else torch; TensorRT when asked for. Built files come
from the EngineCache."""
from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import json
import logging
from typing import Literal

import torch

from ray_faceid.engines.base import DTYPES, EngineShape, UNetEngine
from ray_faceid.engines.cache import EngineCache, EngineKey
from ray_faceid.errors import BadInput

log = logging.getLogger(__name__)
BUILDING_AHEAD = contextvars.ContextVar("building_ahead", default=False)
"""True inside `ray-faceid compile`: an export there is the point, not a request's delay to warn of."""

Backend = Literal["auto", "torch", "torch.compile", "onnxruntime", "tensorrt"]
BACKENDS = ("auto", "torch", "torch.compile", "onnxruntime", "tensorrt")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    if torch.cuda.is_available():  # TensorRT only when asked for: it cannot be built where we test
        return "torch.compile"
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        return "onnxruntime"
    return "torch"


def require_backend(backend: str) -> str:
    """The backend resolved, its runtime checked: a missing one is an error before any model loads."""
    from ray_faceid.errors import BackendUnavailable

    backend = resolve_backend(backend)
    if backend == "tensorrt":
        from ray_faceid.engines.tensorrt_engine import import_tensorrt

        import_tensorrt()
    if backend == "onnxruntime" and (importlib.util.find_spec("onnxruntime") is None
                                     or importlib.util.find_spec("onnx") is None):
        raise BackendUnavailable("the onnxruntime backend needs onnxruntime and onnx: pip install 'ray_faceid[onnx]'")
    return backend


def adapter_structure(adapter) -> str:
    """What an engine of the adapter depends on: not its training steps, nor the face encoder (the
    engine takes tokens; `compile` loads a published file without one, a replica with its own)."""
    config = {k: v for k, v in adapter.config_dict().items() if k not in ("trained_steps", "encoder")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def processor_weights_by_onnx_name(adapter, delta: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's in-layer weights under the names they carry in the exported graph; with a
    person's `delta` (keys as in `adapter.processors`), the sum, in new tensors."""
    out = {}
    delta = delta or {}
    for layer in adapter.layers:  # "<attention module>.processor"
        key = layer.replace(".", "__")
        for name, tensor in adapter.processors[key].state_dict().items():
            own = delta.get(f"{key}.{name}")
            out[f"unet.{layer}.{name}"] = tensor if own is None else tensor + own.to(tensor.device, tensor.dtype)
    return out


def unet_engine(base, adapter, shape: EngineShape, backend: str = "auto", precision: str = "fp32",
                cache: EngineCache | None = None) -> UNetEngine:
    """`shape.control`: InstantID, its IdentityNet (`adapter.identitynet`) exported into the graph."""
    backend = resolve_backend(backend)
    if backend == "torch":
        from ray_faceid.engines.torch_engine import TorchUNetEngine

        return TorchUNetEngine(base.unet)
    if backend == "torch.compile":
        from ray_faceid.engines.compiled_engine import CompiledUNetEngine

        return CompiledUNetEngine(base.unet)
    from ray_faceid.engines.onnx_export import OPSET, export_unet

    if backend == "tensorrt":  # before the export: say what is missing without minutes of work first
        from ray_faceid.engines.tensorrt_engine import import_tensorrt

        import_tensorrt()
    cache = cache or EngineCache()
    if backend == "onnxruntime":
        precision = "fp32"  # ONNX Runtime on CPU runs the fp32 graph; TensorRT graphs carry their precision
    identitynet = adapter.identitynet if shape.control else None
    if identitynet is not None and backend == "tensorrt":
        raise BadInput("InstantID's IdentityNet is not in TensorRT plans yet: use --backend onnxruntime, torch.compile "
                       "or torch")
    structure = adapter_structure(adapter)
    if identitynet is not None:  # its weights and scale are in the graph
        structure = f"{structure}+identitynet {identitynet.sha256[:16]} x{identitynet.scale}"
    common = dict(model_hash=base.model_hash(), adapter_structure=structure, batch=shape.batch,
                  latent=shape.latent, identities=shape.identities, tokens=shape.tokens)
    weights = processor_weights_by_onnx_name(adapter)
    # ONNX Runtime takes the in-layer weights as inputs; TensorRT keeps them as refittable weights.
    weight_inputs = backend == "onnxruntime"
    onnx_key = EngineKey(backend="onnx", weight_inputs=weight_inputs, precision=precision,
                         runtime_version=f"opset{OPSET}", **common)

    def export(folder):
        if BUILDING_AHEAD.get():
            log.info("exporting the UNet's ONNX graph for latent %sx%s into %s (tens of seconds)",
                     shape.latent[1], shape.latent[0], cache.root)
        else:
            log.warning("the UNet's ONNX graph for latent %sx%s is not in the engine cache at %s: exporting it (tens "
                        "of seconds; `ray-faceid compile` builds it ahead)", shape.latent[1], shape.latent[0], cache.root)
        return export_unet(base.unet, shape, folder / "unet.onnx", DTYPES[precision], weights if weight_inputs else (),
                           identitynet)

    def onnx_graph():
        return cache.get_or_build(onnx_key, "unet.onnx", export)

    if backend == "onnxruntime":
        from ray_faceid.engines.onnxruntime_engine import OnnxRuntimeUNetEngine

        engine = OnnxRuntimeUNetEngine(onnx_graph())
        engine.refit(weights)  # the cached graph's defaults may be another adapter's
        return engine
    from ray_faceid.engines.base import device_tag
    from ray_faceid.engines.tensorrt_engine import TensorRTUNetEngine, build_plan, import_tensorrt, unet_profile

    trt = import_tensorrt()
    plan_key = EngineKey(backend="tensorrt", precision=precision, device=device_tag(), runtime_version=trt.__version__,
                         **common)
    # The graph is exported only when the plan must be built: a cached plan serves every adapter
    # of this structure (its weights come by refit), so a new identity costs no export.
    plan = cache.get_or_build(plan_key, "unet.plan", lambda folder: build_plan(
        onnx_graph(), unet_profile(shape), folder / "unet.plan", timing_cache=cache.root / "timing.cache"))
    engine = TensorRTUNetEngine(plan)
    engine.refit(weights)  # this adapter's weights, whatever the plan was built with
    return engine
