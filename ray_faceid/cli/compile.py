"""`ray-faceid compile`: build the UNet engine (ONNX graph, TensorRT plan, or torch.compile's
Inductor artifacts) ahead of time into an engine cache, so replicas and render actors load it
instead of building it."""
from __future__ import annotations

from typing import Optional

import typer

from ray_faceid.cli.common import (
    IdentityNetOpt,
    IdentityNetScaleOpt,
    console,
    err_console,
    identitynet_scale_of,
    user_errors,
)
from ray_faceid.errors import BadInput


def _max_rows(text: str) -> int:
    """--batch: MAX rows, or the older MIN:OPT:MAX form (checked; only MAX counts)."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError as exc:
        raise BadInput(f"--batch must be MAX rows (or MIN:OPT:MAX), got {text!r}") from exc
    if len(values) not in (1, 3) or not 1 <= values[0] <= values[len(values) // 2] <= values[-1]:
        raise BadInput(f"--batch {text}: give MAX rows (1 or more), or MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return values[-1]


def compile_engine(
    out: Optional[str] = typer.Option(None, "--out", help="Engine cache folder; default: the one commands and "
                                      "replicas look in, $RAY_FACEID_CACHE/engines (~/.cache/ray_faceid/engines). "
                                      "Another folder named engines is found where RAY_FACEID_CACHE is its parent."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="onnx (or onnxruntime) | tensorrt | torch.compile (Inductor artifacts for this "
        "machine's device: compile on the kind of GPU that will serve). Default: onnx; on FLUX torch.compile (what "
        "its replicas run on GPUs)."),
    model: str = typer.Option("tiny", "--model", help="tiny | tiny-flux | a diffusers folder (SD 1.x, 2.x, SDXL or "
                              "FLUX.1 dev / schnell) | an fsspec URI | a hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Identity adapter URI (default: an untrained one; "
                                          "FLUX: none, engines for images without identity)."),
    batch: Optional[str] = typer.Option(None, "--batch", help="The most UNet rows a call runs (default 8; "
                              "classifier-free guidance doubles rows: 8 = 4 images); FLUX: the most images a call runs "
                              "(default 16, a Serve replica's generator_batch_size x limits.max_images). Engines are "
                              "built for the "
                              "batch buckets requests look up "
                              "(ONNX Runtime: one graph for any batch; TensorRT and torch.compile: each bucket up to "
                              "MAX). The older MIN:OPT:MAX form is accepted; only MAX counts."),
    size: Optional[str] = typer.Option(None, "--size", help="Image WxH the engine serves; default: the model's "
                                       "native size (512x512 for SD 1.x)."),
    identities: int = typer.Option(1, "--identities", min=1, max=4, help="Identities per image."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto | fp32 | fp16 | bf16: the TensorRT graph's precision (auto: fp16); ONNX Runtime "
        "graphs are fp32; torch.compile: auto is fp16 on CUDA (FLUX: bf16), fp32 on CPU.",
    ),
    flux_transformer_weights: str = typer.Option("same", "--flux-transformer-weights", help="FLUX: same | fp8 | "
                                                 "fp8_matmul, as the Serve config that will look the artifacts up says."),
    identitynet: Optional[str] = IdentityNetOpt,
    identitynet_scale: Optional[float] = IdentityNetScaleOpt,
    photos: str = typer.Option("1", "--photos", help="FaceID-Portrait: photos per person to build for, e.g. 1,3 (each "
                               "count its own token count), as warm_up_photos in the Serve config."),
    step_cache: bool = typer.Option(False, "--step-cache", help="FLUX on torch.compile: compile the step cache's two "
                                    "parts instead of the whole transformer, for the runs and replicas that set a step "
                                    "cache (--step-cache T, flux_step_cache: any threshold compiles the same code)."),
):
    """Build the denoiser's engines ahead of time (a UNet, or FLUX's transformer): ONNX graphs, TensorRT plans,
    or torch.compile's artifacts."""
    from ray_faceid.engines.base import DTYPES
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.pipelines.generate import parse_size

    with user_errors():
        from ray_faceid.engines.select import require_backend
        from ray_faceid.pipelines.model_ref import resolve_model

        ref = resolve_model(model, flux=True)  # configs only: FLUX compiles its transformer, not a UNet
        backend = "onnx" if backend == "onnxruntime" else backend  # the runtime's name, as --backend elsewhere
        if backend is None:
            backend = "torch.compile" if ref.family == "flux" else "onnx"
        if backend not in ("onnx", "tensorrt", "torch.compile"):
            raise BadInput(f"--backend must be onnx, tensorrt or torch.compile, not {backend!r}")
        if ref.family == "flux" and backend == "tensorrt":
            raise BadInput("--backend tensorrt: FLUX's transformer has no TensorRT engine yet; use torch.compile, "
                           "or onnx (its ONNX graph, which ONNX Runtime runs)")
        require_backend("onnxruntime" if backend == "onnx" else backend)  # before the model loads
        if precision not in ("auto", *DTYPES):
            raise BadInput(f"--precision must be auto, fp32, fp16 or bf16, not {precision!r}")
        if backend == "onnx" and precision not in ("auto", "fp32"):
            other = "torch.compile" if ref.family == "flux" else "tensorrt"  # FLUX has no TensorRT engine
            raise BadInput(f"--precision {precision}: ONNX Runtime runs fp32 graphs; drop it or use --backend {other}")
        if step_cache and (ref.family != "flux" or backend != "torch.compile"):
            raise BadInput("--step-cache compiles FLUX's transformer in two parts for torch.compile: give a FLUX "
                           "--model and --backend torch.compile (FLUX's ONNX graph runs no step cache)")
        max_rows = _max_rows(batch or "8")
        width, height = parse_size(size, "--size") if size else (None, None)
        cache = EngineCache(out)
        if ref.family != "flux" and flux_transformer_weights != "same":
            raise BadInput("--flux-transformer-weights is for FLUX models")
        scale = identitynet_scale_of(identitynet, identitynet_scale)
        try:
            photo_counts = sorted({int(n) for n in photos.split(",") if n.strip()})
        except ValueError:
            raise BadInput(f"--photos takes photo counts such as 1,3, not {photos!r}") from None
        if not photo_counts or not all(1 <= n <= 16 for n in photo_counts):
            raise BadInput(f"--photos takes counts between 1 and 16, not {photos!r}")
        if ref.family == "flux" and photo_counts != [1]:
            raise BadInput("--photos is for FaceID-Portrait files on SD 1.x / SDXL, not for FLUX models")
        if ref.family == "flux" and identitynet:
            raise BadInput("--identitynet is for InstantID's ip-adapter.bin on SDXL, not for FLUX models")
        if ref.family == "flux":
            if identities != 1:
                raise BadInput("--identities: FLUX's transformer is compiled for up to four people a call; leave it out")
            if ref.inpainting:
                raise BadInput(f"{ref.name} is FLUX.1 Fill: it repaints each photo at the photo's own size, so there "
                               "is no size to compile ahead (a replica compiles each at its first request)")
            from ray_faceid.pipelines.flux_memory import TRANSFORMER_WEIGHTS

            if flux_transformer_weights not in TRANSFORMER_WEIGHTS:
                raise BadInput(f"--flux-transformer-weights is {' | '.join(TRANSFORMER_WEIGHTS)}, not "
                               f"{flux_transformer_weights!r}")
            if backend == "onnx" and flux_transformer_weights != "same":
                raise BadInput(f"--flux-transformer-weights {flux_transformer_weights} is for torch.compile: ONNX "
                               "Runtime runs FLUX's transformer graph in fp32")
            most = _max_rows(batch or "16")  # FLUX.1 doubles no rows: a Serve replica's 4 requests x 4 images
            what = ("its identity adapter installed" if adapter else
                    "no identity adapter: for images without identity (give --adapter FILE for runs with people)")
            if backend == "onnx":
                err_console.print(f"exporting FLUX's transformer to ONNX, {what}, for any batch (seconds for a tiny "
                                  "base; FLUX.1's 12B parameters: many minutes, and as much memory as its fp32 weights, "
                                  "twice)")
                report = _build_flux(ref, adapter, width, height, most, "fp32", flux_transformer_weights, cache,
                                     "onnxruntime")
                size = f"{width}x{height}" if width else "the model's native size"
                console.print(f"FLUX transformer ONNX graph for {size} (loaded from the cache: {report['loaded']}, "
                              f"stored: {report['stored']})", soft_wrap=True)
                console.print(where_found(cache.root), soft_wrap=True, highlight=False, markup=False)
                return
            parts = "the step cache's two parts of " if step_cache else ""
            err_console.print(f"compiling {parts}FLUX's transformer, {what}, for batches of up to {most} images (each "
                              "batch bucket takes minutes on a GPU without cached artifacts, about a minute on a CPU "
                              "for a tiny base)")
            report = _build_flux(ref, adapter, width, height, most, precision, flux_transformer_weights, cache,
                                 "torch.compile", step_cache)
            buckets = report["buckets"]
            weights = "" if flux_transformer_weights == "same" else \
                f" with {flux_transformer_weights.replace('_', ' ')} transformer weights"
            console.print(f"compiled {buckets} batch bucket{'s' if buckets != 1 else ''} of {parts}FLUX's transformer"
                          f"{weights} (Inductor artifacts loaded from the cache: {report['loaded']}, stored: "
                          f"{report['stored']})",
                          soft_wrap=True)
            console.print(where_found(cache.root), soft_wrap=True, highlight=False, markup=False)
            return
        from ray_faceid.engines.select import BUILDING_AHEAD

        ahead = BUILDING_AHEAD.set(True)
        try:
            report = _build(model, adapter, width, height, identities, max_rows, backend, precision, cache,
                            (identitynet, scale), photo_counts)
        finally:
            BUILDING_AHEAD.reset(ahead)
        # What was built, as a Serve config or command must ask for it to find it.
        built = (f"for {report['size']}, {identities} identit{'y' if identities == 1 else 'ies'} an image"
                 + (f", {photos} photo(s) per person" if photo_counts != [1] else "")
                 + (f", IdentityNet at scale {scale}" if identitynet else ""))
        if backend == "torch.compile":
            console.print(f"compiled {report['buckets']} batch buckets {built} (Inductor artifacts loaded from the "
                          f"cache: {report['loaded']}, stored: {report['stored']})", soft_wrap=True)
        else:
            console.print(f"{backend} engines ready: {report['buckets']} (up to {max_rows} rows) {built}",
                          soft_wrap=True)
        console.print(where_found(cache.root), soft_wrap=True, highlight=False, markup=False)
    for entry in sorted(cache.root.iterdir()) if cache.root.is_dir() else ():  # another compiler stores nothing
        if entry.is_dir():
            console.print(f"{entry}: {', '.join(sorted(p.name for p in entry.iterdir()))}")


def where_found(root) -> str:
    """Where the engines went, and what makes commands and replicas find them there."""
    import shlex
    from pathlib import Path

    from ray_faceid.engines.cache import EngineCache

    root, looked = Path(root).resolve(), EngineCache().root.resolve()
    if root == looked:
        return f"in {root}, where commands and replicas on this machine look"
    how = (f"set RAY_FACEID_CACHE={shlex.quote(str(root.parent))} where they run" if root.name == "engines" else
           "move it to a folder named engines and set RAY_FACEID_CACHE to that folder's parent where they run")
    return f"in {root}; commands and replicas look in {looked}: {how}"


def _build_flux(ref, adapter, width, height, max_images, precision, transformer_weights, cache, backend,
                step_cache: bool = False) -> dict:
    """FLUX's transformer compiled for every batch bucket up to `max_images` (no guidance rows on
    FLUX.1; `step_cache`: its two parts, as a generator with a step cache compiles them), or exported
    to ONNX (backend onnxruntime: any batch), by the warm-up a Serve replica runs at start, into the
    engine cache it looks in."""
    import torch

    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_memory import FLAGS, check_settings
    from ray_faceid.pipelines.flux_sampling import FluxGenerator, resolve_flux_precision
    from ray_faceid.pipelines.generate import DTYPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_flux_precision(precision, device, backend)
    check_settings("same", transformer_weights, device, backend, FLAGS)  # this device runs them: before the model loads
    base = load_flux(ref, DTYPES[precision] if device.type == "cuda" else None)
    flux_adapter = None
    if adapter:
        from ray_faceid.identity.flux_adapter import load_flux_identity

        flux_adapter = load_flux_identity(adapter, base.transformer)
    # Any threshold compiles the same two parts (the engine key says "step cache", not which threshold).
    generator = FluxGenerator(base, flux_adapter, device=device, precision=precision, backend=backend,
                              transformer_weights=transformer_weights, engine_cache=cache,
                              step_cache=0.1 if step_cache else 0.0)
    width, height = (width, height) if width else base.native_size
    from ray_faceid.engines.select import BUILDING_AHEAD

    ahead = BUILDING_AHEAD.set(True)  # an export here is the one ahead: not a missing engine's warning
    try:
        return generator.warm_up([(width, height)], max_images)
    finally:
        BUILDING_AHEAD.reset(ahead)


def _build(model, adapter, width, height, identities, max_rows, backend, precision, cache, identitynet,
           photos: list[int]) -> dict:
    """The pipeline's own warm-up, the engine builder a Serve replica runs at start (render actors
    build the same keys as rows need them), so what is built here is exactly what they look up.
    `identitynet`: (folder, scale), InstantID's, compiled into the UNet's graph as a replica's is."""
    import torch

    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.identity.adapter import NO_ADAPTER, shared_adapter
    from ray_faceid.identity.instantid import attach_identitynet
    from ray_faceid.pipelines.generate import IdentityPipeline
    from ray_faceid.pipelines.models import load_base

    if backend == "onnx":
        backend, precision = "onnxruntime", "fp32"
    elif backend == "tensorrt" and precision == "auto":
        precision = "fp16"
    base = load_base(model)
    # The engine takes identity tokens, not embeddings: a given adapter loads without an encoder check
    # (a published file needs insightface's); the tiny base's seeded default is made for the default one.
    shared = shared_adapter(adapter, base, None if adapter else FaceAnalyzer().spec)
    if shared is None:
        raise BadInput(NO_ADAPTER.format(model=base.model_id))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = IdentityPipeline(base, shared, device=device, backend=backend, engine_cache=cache, precision=precision)
    attach_identitynet(pipe, *identitynet, "--identitynet")
    width, height = (width, height) if width else base.native_size
    report = pipe.warm_up([(width, height)], [identities], max_images=max(1, max_rows // 2), photos=photos)
    return {**report, "size": f"{width}x{height}"}
