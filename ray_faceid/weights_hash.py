"""What made an artifact: hashes of model WEIGHTS (never of configs or ids alone).

`module_hash(module)` hashes every tensor of a module's state dict (name, dtype, shape, bytes) and
its config: two models of one architecture with other weights differ, the same weights give the
same hash wherever they were loaded from. Models loaded in another precision by device (FLUX: bf16
on a GPU, fp32 on a CPU) are hashed with their fp16 / bf16 tensors widened to fp32 first (exact), so
the same files are one model on both. The hash is taken once, when the model is built or
loaded, and kept on the module (`weights_hash_of`), so a later cast to fp16 or a move to a GPU
does not change what the model is said to be.

Hashing a 3.4 GB UNet takes seconds; for models loaded from a folder the result is cached under
the folder's files (path, size, modification time), so each model is hashed once per machine.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

ATTRIBUTE = "_ray_faceid_weights_hash"
HALF = (torch.float16, torch.bfloat16)
DIGEST_CHARS = 16


# Bookkeeping that saving or casting writes into a config; not what the model computes.
METADATA_KEYS = frozenset({"architectures", "transformers_version", "diffusers_version", "torch_dtype", "dtype",
                           "name_or_path"})


def _config_of(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    return {k: v for k, v in items if not str(k).startswith("_") and k not in METADATA_KEYS}


def module_hash(module: torch.nn.Module, widen_half: bool = False) -> str:
    """sha256 of the module's config and every tensor of its state dict, in name order. Identity
    attention processors installed in a UNet are not part of the base: their tensors are skipped.
    `widen_half`: fp16 / bf16 tensors hashed as fp32 (a model loaded in either precision by device)."""
    h = hashlib.sha256(json.dumps(_config_of(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if ".processor." in name:
            continue
        t = tensor.detach()
        if widen_half and t.dtype in HALF:  # exact: the same file's weights alike in bf16 (GPU) or fp32
            t = t.float()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def weights_hash_of(module: torch.nn.Module) -> str:
    """The module's weights hash: the one recorded when it was built or loaded, else taken now
    (take it before casting: fp16 weights are other bytes)."""
    found = getattr(module, ATTRIBUTE, None)
    if found is None:
        found = module_hash(module)
        record(module, found)
    return found


def record(module: torch.nn.Module, digest: str) -> None:
    setattr(module, ATTRIBUTE, digest)


def _files_key(folder: Path) -> str:
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _entry(folder: Path, kind: str) -> Path:
    from ray_faceid.envs import cache_dir

    return Path(cache_dir()) / "weights_hashes" / f"{kind}{_files_key(folder)}.txt"


def _remembered(folder: Path, kind: str, compute) -> str:
    """`compute()`, cached per machine under the key of `folder`'s files (paths, sizes, times)."""
    entry = _entry(folder, kind)
    if entry.exists():
        return entry.read_text().strip()
    digest = compute()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    tmp.replace(entry)
    return digest


def cached_module_hash(module: torch.nn.Module, folder: str | Path | None, widen_half: bool = False) -> str:
    """module_hash, remembered for the files of `folder` it was loaded from (unchanged files,
    same hash); recorded on the module either way."""
    if folder is None or not Path(folder).is_dir():
        digest = module_hash(module, widen_half)
    else:
        digest = _remembered(Path(folder), "w2-" if widen_half else "", lambda: module_hash(module, widen_half))
    record(module, digest)
    return digest


def remembered_hash(folder: str | Path, widen_half: bool = False) -> str | None:
    """The weights hash `cached_module_hash` took of the module in `folder` on this machine, if any
    command did since its files last changed; None otherwise (nothing is loaded to find out)."""
    if not Path(folder).is_dir():
        return None
    entry = _entry(Path(folder), "w2-" if widen_half else "")
    return entry.read_text().strip() if entry.exists() else None


def folder_hash(folder: str | Path) -> str:
    """sha256 over every file of a model folder (relative path and bytes, streamed): identifies the
    weights without loading them. Cached like module hashes, by the files' paths, sizes and times."""
    folder = Path(folder)

    def compute() -> str:
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    return _remembered(folder, "files-", compute)
