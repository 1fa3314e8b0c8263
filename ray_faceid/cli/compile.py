"""`ray-faceid compile`: build the UNet engine (ONNX graph, or TensorRT plan) ahead of time into
an engine cache, so replicas and render actors load it instead of building it."""
from __future__ import annotations

from typing import Optional

import typer

from ray_faceid.cli.common import console, user_errors
from ray_faceid.errors import BadInput


def _triple(text: str) -> tuple[int, int, int]:
    try:
        low, opt, high = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise BadInput(f"--batch must look like MIN:OPT:MAX, got {text!r}") from exc
    if not 1 <= low <= opt <= high:
        raise BadInput(f"--batch {text}: need 1 <= MIN <= OPT <= MAX")
    return low, opt, high


def compile_engine(
    out: str = typer.Option(..., "--out", help="Engine cache folder (replicas point RAY_FACEID_CACHE's engines here)."),
    backend: str = typer.Option("onnx", "--backend", help="onnx | tensorrt."),
    model: str = typer.Option("tiny", "--model", help="tiny | a diffusers folder | an fsspec URI | a hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Identity adapter URI (default: an untrained one)."),
    batch: str = typer.Option("1:2:8", "--batch", help="MIN:OPT:MAX rows (classifier-free guidance doubles rows)."),
    size: str = typer.Option("512x512", "--size", help="Image WxH the engine serves."),
    identities: int = typer.Option(1, "--identities", min=1, max=4, help="Identities per image."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto | fp32 | fp16 | bf16: the TensorRT graph's precision (auto: fp16); ONNX Runtime "
        "graphs are fp32.",
    ),
):
    """Export the UNet with identity inputs to ONNX, and build a TensorRT plan from it."""
    from ray_faceid.engines.base import DTYPES, EngineShape
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.engines.select import unet_engine
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import parse_size
    from ray_faceid.pipelines.models import load_base

    with user_errors():
        if backend not in ("onnx", "tensorrt"):
            raise BadInput(f"--backend must be onnx or tensorrt, not {backend!r}")
        if precision not in ("auto", *DTYPES):
            raise BadInput(f"--precision must be auto, fp32, fp16 or bf16, not {precision!r}")
        if backend == "onnx" and precision not in ("auto", "fp32"):
            raise BadInput(f"--precision {precision} is for TensorRT plans: ONNX Runtime runs fp32 graphs; drop it or "
                           "use --backend tensorrt")
        precision = precision if precision != "auto" else ("fp16" if backend == "tensorrt" else "fp32")
        width, height = parse_size(size, "--size")
        base = load_base(model)
        spec = FaceAnalyzer().spec
        shared = IdentityAdapter.load(adapter, base.unet, spec) if adapter else IdentityAdapter.for_unet(base.unet, spec)
        shared.install(base.unet)
        f = base.vae_scale_factor
        if width % f or height % f:
            raise BadInput(f"--size {size}: each side must be a multiple of {f} for this model")
        shape = EngineShape(batch=_triple(batch), latent=(height // f, width // f), identities=identities,
                            tokens=shared.options.num_tokens, text_length=base.tokenizer.model_max_length,
                            channels=base.unet.config.in_channels, cross_dim=base.cross_attention_dim)
        cache = EngineCache(out)
        unet_engine(base, shared, shape, "onnxruntime" if backend == "onnx" else "tensorrt", precision, cache)
    for entry in sorted(cache.root.iterdir()):
        if entry.is_dir():
            console.print(f"{entry}: {', '.join(sorted(p.name for p in entry.iterdir()))}")
