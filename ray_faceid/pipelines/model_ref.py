"""A base model named once: `resolve_model` turns what a user gives (`tiny`, a folder, an fsspec URI,
a hub id) into a ModelRef at the edge of a command, reading configs only (no weights), and every
layer below takes the reference: its local folder, family, inpainting flag and components are known
without another lookup, and its weights' fingerprint is computed once, when first asked for.

A reference travels to Ray workers as it is; a worker on another machine, where the driver's local
copy or hub cache is not, resolves the name again there (`local_folder`)."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ray_faceid import storage
from ray_faceid.envs import cache_dir
from ray_faceid.errors import BackendUnavailable, NotFound

TINY = ("tiny", "tiny-inpaint", "tiny-sdxl", "tiny-sdxl-inpaint")
TINY_FLUX = ("tiny-flux", "tiny-flux-schnell", "tiny-flux-fill")
FLUX_RUNS = ("a FLUX model: `ray-faceid generate`, `render` and Serve run it (`inpaint`: FLUX.1 Fill; `train`, "
             "`personalize` and `compile --backend torch.compile` too), people read through a FLUX IP-Adapter, "
             "PuLID-FLUX or the adapter `train` makes; merge-lora and the IMR on FLUX are not built yet")
HUB_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors", "*/*.bin", "*/*.model"]  # a diffusers layout
HUB_CONFIGS = ["model_index.json", "*/*.json"]  # what deciding the family needs
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass
class ModelRef:
    name: str
    """As the user gave it: the model id of everything made with it."""
    kind: str
    """tiny | folder | uri | hub."""
    folder: str | None
    """The local diffusers folder (configs at least; a hub model's weights arrive when it loads); None for tiny."""
    family: str
    inpainting: bool
    components: tuple[str, ...]
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> str:
        """What identifies the weights without loading them (checks before a job starts): the files'
        hash of the folder, the weights hash of a tiny base, a hub model's id at its snapshot's commit.
        Computed once per reference."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        from ray_faceid.weights_hash import folder_hash

        if self.kind == "tiny" and self.family == "flux":
            from ray_faceid.pipelines.flux import load_flux

            return load_flux(self).model_hash()
        if self.kind == "tiny":
            from ray_faceid.pipelines.models import build_named_tiny

            return build_named_tiny(self.name).model_hash()
        if self.kind != "hub":
            return folder_hash(self.local_folder())
        # The id at the snapshot's commit: the same before and after the weights arrive (a resume and
        # a finished render still match), another when the hub model changes.
        folder = Path(self.folder) if self.folder else None
        return f"hub:{self.name}@{folder.name}" if folder else f"hub:{self.name}"

    def local_folder(self, weights: bool = False) -> Path:
        """The folder on this machine; `weights`: with the weights present (a hub model fetches them).
        Where the driver's copy is not (another machine), the name is resolved again here."""
        if self.kind == "hub" and weights:
            return Path(_hub_snapshot(self.name, HUB_FILES, weights=True))
        if self.folder and (Path(self.folder) / "model_index.json").exists():
            return Path(self.folder)
        if self.kind == "uri":
            return _local_copy(self.name)
        if self.kind == "hub":
            return Path(_hub_snapshot(self.name, HUB_CONFIGS))
        raise NotFound(f"model {self.name!r}: no model folder at {self.folder} on this machine")


def resolve_model(model: str | ModelRef, flux: bool = False) -> ModelRef:
    """A ModelRef from a tiny name, a local folder, an fsspec URI (copied into the local cache once)
    or a hub id (its configs only, until it loads); a reference is returned as it is. A folder of an
    unsupported kind is refused here (families.py), before any weight is read; so is a FLUX model
    unless the caller runs FLUX (`flux`)."""
    ref = model if isinstance(model, ModelRef) else _resolve(model)
    if ref.family == "flux" and not flux:
        from ray_faceid.errors import UnsupportedModel

        raise UnsupportedModel(f"{ref.name} is {FLUX_RUNS}")
    return ref


def _resolve(model: str) -> ModelRef:
    from ray_faceid.pipelines.families import FLUX_COMPONENTS, detect_family

    if model in TINY_FLUX:
        return ModelRef(model, "tiny", None, "flux", model.endswith("-fill"), FLUX_COMPONENTS)
    if model in TINY:
        return ModelRef(model, "tiny", None, "sdxl" if "sdxl" in model else "sd1", model.endswith("-inpaint"),
                        COMPONENTS if "sdxl" in model else tuple(c for c in COMPONENTS if not c.endswith("_2")))
    if "://" in model and not model.startswith("file://"):
        kind, folder = "uri", _local_copy(model)
    elif Path(model.removeprefix("file://")).is_dir():
        # Absolute: workers and actors may run in another working directory (Ray Train's always do).
        kind, folder = "folder", Path(model.removeprefix("file://")).resolve()
    elif model.count("/") == 1 and not model.startswith((".", "/")):
        kind, folder = "hub", Path(_hub_snapshot(model, HUB_CONFIGS))
    else:
        import difflib

        close = difflib.get_close_matches(model, TINY + TINY_FLUX, n=1)
        hint = f": did you mean {close[0]!r}?" if close else ""
        raise NotFound(f"model {model!r}: not a built-in tiny base ({', '.join(TINY + TINY_FLUX)}), a folder, a URI "
                       f"or a hub id (owner/name){hint}")
    family = detect_family(folder)
    if family == "flux":  # Fill: the masked image and the mask packed beside the latents
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        latent = json.loads((folder / "vae" / "config.json").read_text()).get("latent_channels", 16)
        return ModelRef(model, kind, str(folder), family, transformer.get("in_channels") != 4 * latent, FLUX_COMPONENTS)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    present = tuple(c for c in COMPONENTS if (folder / c).is_dir())
    return ModelRef(model, kind, str(folder), family, unet.get("in_channels") == 9, present)


def _local_copy(uri: str) -> Path:
    """A local copy of a model folder at any fsspec URI, cached by URI."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise NotFound(f"no model folder at {uri}")
    cache = Path(cache_dir()) / "models"
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "model_index.json").exists():
        # Copied aside and renamed in whole: an interrupted copy is never taken for a complete one.
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}-"))
        try:
            fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
            shutil.rmtree(target, ignore_errors=True)  # an older, incomplete copy
            try:
                partial.rename(target)
            except OSError:  # another process renamed its complete copy in first
                if not (target / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _has_weights(folder: Path) -> bool:
    """Whether a hub snapshot holds the denoiser's weights (a configs-only one does not)."""
    return any(any((folder / denoiser).glob(f"*.{ext}")) for denoiser in ("unet", "transformer")
               for ext in ("safetensors", "bin"))


def _hub_snapshot(model: str, patterns: list[str], weights: bool = False) -> str:
    """A local folder of a hub model holding `patterns` (`weights`: the weights too): the local cache
    first, then one bounded download attempt; no network (or no such model) is one line within
    seconds, not minutes of retries."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise BackendUnavailable(f"hub model {model!r}: huggingface_hub is not installed; pass a local folder") from exc
    try:
        folder = snapshot_download(model, local_files_only=True, allow_patterns=patterns)
        if not weights or _has_weights(Path(folder)):
            return folder
    except Exception:  # noqa: BLE001 - not cached: try the hub once
        pass
    try:
        return snapshot_download(model, allow_patterns=patterns, etag_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same answer for the user
        raise BackendUnavailable(f"hub model {model!r} is not in the local cache and the hub could not provide it "
                                 f"({type(exc).__name__}): download it where there is a network "
                                 f"(`hf download {model}`) or pass a local folder") from None
