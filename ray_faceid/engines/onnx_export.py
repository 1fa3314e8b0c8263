"""Export the UNet, identity processors installed, to ONNX with identity as graph inputs.

Dynamic batch; the latent size and the identity layout (M identities x T tokens) are fixed per
graph: one graph per size and identity count you serve. Graphs over 2 GB (SD-sized UNets in fp32)
are written with external data. The result is checked with `onnx.checker` (by path, so external
data is checked too). The exporter's own optimiser is off: it folds weight transposes into new,
unnamed constants, and TensorRT refit finds weights by their parameter names. ONNX Runtime and
TensorRT fold constants themselves.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from ray_faceid import quiet
from ray_faceid.engines.base import EngineShape, UNetCall
from ray_faceid.errors import BackendUnavailable

OPSET = 18


def export_unet(unet, shape: EngineShape, path: str | Path, dtype: torch.dtype = torch.float32,
                weight_inputs: Iterable[str] = (), identitynet=None) -> Path:
    """`dtype` is the graph's precision: fp16 / bf16 graphs make half-precision TensorRT engines
    (strongly typed). The module is copied, never cast in place, when its dtype differs.
    `weight_inputs` (initializer names) become graph inputs too, their values the defaults: ONNX
    Runtime then takes another identity's in-layer weights with each call, with no new graph.
    `identitynet`: InstantID's, exported into the same graph (the keypoint image an input; shape.control)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's dependency)
    except ImportError as exc:
        raise BackendUnavailable("ONNX export needs the onnx extra: pip install 'ray_faceid[onnx]'") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(unet.parameters())
    if param.dtype != dtype:
        unet = copy.deepcopy(unet).to(dtype)
    if identitynet is not None and identitynet.model.dtype != dtype:
        identitynet = copy.copy(identitynet)
        identitynet.model = copy.deepcopy(identitynet.model).to(dtype)
    if (identitynet is not None) != shape.control or (shape.control and not shape.pooled_dim):
        # By position: the keypoint image follows SDXL's added conditioning (UNetCall's signature).
        raise BackendUnavailable("an ONNX graph with IdentityNet is made for InstantID on SDXL only")
    example = shape.example(device=param.device, dtype=dtype)
    batch = torch.export.Dim("batch", min=shape.batch[0], max=max(shape.batch[2], 2))
    names = shape.input_names
    dynamic = tuple(None if name == "timestep" else {0: batch} for name in names)
    call = UNetCall(unet, identitynet=identitynet).eval()
    large = sum(p.numel() * p.element_size() for p in call.parameters()) > 1.8 * 2**30
    # torch.export-based exporter: it keeps the batch symbolic through diffusers' reshapes (the
    # TorchScript tracer bakes it in) and keeps parameter names, which TensorRT refit uses.
    with torch.no_grad(), quiet.onnx_export():
        torch.onnx.export(call, tuple(example[n] for n in names), str(path), input_names=names,
                          output_names=["noise_pred"], dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True,
                          external_data=large, verbose=False, optimize=False)
    if weight_inputs:
        _as_inputs(path, set(weight_inputs))
    onnx.checker.check_model(str(path))
    return path


def _as_inputs(path: Path, names: set[str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external data files stay as they are
    initializers = {t.name: t for t in model.graph.initializer}
    missing = names - set(initializers)
    if missing:
        raise BackendUnavailable(f"the exported graph lost the names of weights {sorted(missing)[:3]}")
    for name in sorted(names):
        tensor = initializers[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    onnx.save(model, str(path))
