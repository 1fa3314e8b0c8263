"""Engine files cached under a key of everything they depend on.

The key hashes the base model, the adapter's structure (never its weights: engines take those by
refit, so one file serves every identity), the shapes, the precision and the runtime: for
TensorRT the GPU name, its compute capability and the TensorRT version; for torch.compile the GPU
and the torch version. A file is stored with the
sha256 of its bytes; a file that no longer matches (truncated, corrupted, overwritten) is rebuilt
with a warning, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from ray_faceid.config import Settings
from ray_faceid.envs import cache_dir

log = logging.getLogger(__name__)
FORMAT = 3  # bump when the export or build changes what a file holds


class EngineKey(Settings):
    """Everything an engine file depends on; its compute_hash() names the cache entry."""

    backend: Literal["onnx", "tensorrt", "torch.compile"] = Field(
        ..., description="What the file is: an ONNX graph, a TensorRT plan or Inductor's compiled artifacts.")
    graph: Literal["unet", "face_encoder", "flux_transformer"] = Field("unet", description="Which network.")
    model_hash: str = Field(..., description="BaseModel.model_hash() of the base, or the encoder's spec version.")
    adapter_structure: str | None = Field(None, description="Adapter options and layers (not weights); UNet only.")
    weight_inputs: bool = Field(False, description="ONNX graphs: the adapter's in-layer weights are also inputs.")
    batch: tuple[int, int, int] = Field(..., description="min, opt, max rows.")
    latent: tuple[int, int] | None = Field(None, description="Latent h, w; UNet only.")
    identities: int | None = Field(None, description="Identities per row (M); UNet only.")
    tokens: int | None = Field(None, description="Tokens per identity (T); UNet only.")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Engine precision.")
    device: str = Field("cpu", description="GPU name and compute capability, or cpu.")
    buckets: tuple[int, ...] | None = Field(None, description="torch.compile: the batch buckets compiled.")
    runtime_version: str = Field("", description="TensorRT version, the ONNX opset, or the torch version.")
    format: int = Field(FORMAT, description="ray_faceid's engine format version.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EngineCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or Path(cache_dir()) / "engines")

    def folder(self, key: EngineKey) -> Path:
        return self.root / f"{key.backend}-{key.compute_hash()}"

    def get_or_build(self, key: EngineKey, filename: str, build: Callable[[Path], Path]) -> Path:
        """The cached file for `key`, built by `build(folder) -> file` when missing or not intact."""
        return self.lookup(key, filename) or self.store(key, build)

    def lookup(self, key: EngineKey, filename: str) -> Path | None:
        """The cached file for `key` if its entry is complete and intact (a broken one is warned about)."""
        folder = self.folder(key)
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):  # truncated or unreadable: as corrupted as a wrong checksum
            meta = {}
        target = folder / filename
        intact = target.exists() and meta.get("key") == key.model_dump(mode="json") and \
            all((folder / name).exists() and _sha256(folder / name) == sha for name, sha in meta["files"].items())
        if intact:
            return target
        log.warning("engine cache entry %s is corrupted or stale; rebuilding it", folder)
        return None

    def store(self, key: EngineKey, build: Callable[[Path], Path]) -> Path:
        """(Re)build the entry for `key` with `build(folder) -> file`. The entry is built in a folder
        of its own and renamed into place whole, so a crash leaves no half entry and two processes
        storing the same key at once each finish (the last rename wins; both entries are the same)."""
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(f"{folder.name}.building-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            built = build(staging)
            files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
            (staging / "meta.json").write_text(json.dumps({"key": key.model_dump(mode="json"), "files": files}, indent=2))
            target = folder / built.relative_to(staging)
            for _ in range(3):
                if self.lookup(key, target.name) is not None:  # another process finished first: keep theirs,
                    return target                                # never delete an entry someone may be reading
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete or corrupted entry
                try:
                    staging.rename(folder)
                    return target
                except OSError:  # another process put its entry in place between our two steps
                    continue
            raise OSError(f"could not put the engine cache entry {folder} in place")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self._sweep_abandoned(folder.parent)

    @staticmethod
    def _sweep_abandoned(root: Path, older_than_s: float = 24 * 3600) -> None:
        """Build folders a killed process left behind (engines can be GBs); a day is longer than any build."""
        import time

        for stale in root.glob("*.building-*"):
            try:
                if time.time() - stale.stat().st_mtime > older_than_s:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                continue
