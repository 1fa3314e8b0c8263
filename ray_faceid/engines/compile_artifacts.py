"""The compiled engine's on-disk artifact: Inductor's compiled code for every warmed-up shape (the
UNet engine's, and FLUX's transformer's: flux_sampling.py).

`torch.compiler.save_cache_artifacts()` collects what Inductor and AOTAutograd compiled in this
process (kernels, wrapper code, autotuning results); `load_cache_artifacts()` in a fresh process
fills the local caches with them, so the same compile is served from cache: Dynamo still traces
(seconds), the minutes of code generation and autotuning are skipped. The weights are not in it
(parameters stay inputs of the compiled code), so one artifact serves every identity and every
personal adapter of the adapter's structure.

Why not an AOTInductor package: it bakes the weights in as constants (the identity weights would
have to be swapped through its constant-buffer API, per person), and on an H100 a 1.77 GB package
of this UNet crashed the process on load without a message (DESIGN.md, Engines).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ray_faceid.engines.base import device_tag
from ray_faceid.engines.cache import EngineCache, EngineKey
from ray_faceid.engines.compiled_engine import buckets_for

log = logging.getLogger(__name__)
FILENAME = "inductor_artifacts.bin"


def compiled_key(model_hash: str, adapter_structure: str, shape, precision: str, device: torch.device,
                 compiler: str = "inductor") -> EngineKey:
    return EngineKey(backend="torch.compile", model_hash=model_hash, adapter_structure=adapter_structure,
                     batch=shape.batch, buckets=buckets_for(shape), latent=shape.latent, identities=shape.identities,
                     tokens=shape.tokens, precision=precision, device=device_tag(device),
                     runtime_version=f"torch {torch.__version__}, {compiler}")


def warm_up_cached(compiler: str, warm_up: Callable[[], int], keys: list[EngineKey], cache: EngineCache) -> dict:
    """Load the cached artifacts of `keys`, run `warm_up()` (it compiles every shape they stand for and
    says how many), and store what was missing. The UNet engine's and FLUX's transformer's alike.
    Returns {"loaded": n, "stored": n, "buckets": n} for the caller's log or readiness report."""
    if compiler != "inductor":  # the artifacts are Inductor's: another backend has none to keep
        return {"loaded": 0, "stored": 0, "buckets": warm_up()}
    loaded = 0
    for key in keys:
        path = cache.lookup(key, FILENAME)
        if path is not None:
            torch.compiler.load_cache_artifacts(path.read_bytes())
            loaded += 1
    buckets = warm_up()
    stored = 0
    if loaded < len(keys):
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            log.warning("torch.compile produced no cache artifacts (is Inductor's FX graph cache off?)")
        else:
            for key in keys:
                if cache.lookup(key, FILENAME) is None:
                    cache.store(key, lambda folder: _write(folder / FILENAME, artifacts[0]))
                    stored += 1
    return {"loaded": loaded, "stored": stored, "buckets": buckets}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
