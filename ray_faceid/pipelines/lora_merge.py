"""A base with LoRAs fused in, saved as a model folder: how few-step LoRAs (LCM, TCD, Hyper-SD,
SDXL-Lightning) and style LoRAs reach every path at once.

The LoRAs are applied by diffusers' own loader (`load_lora_weights`: diffusers, PEFT and kohya key
layouts, UNet and text encoders) and fused into the weights, so the folder is a plain base: every
command, catalog row, Serve config and compiled engine takes it as `--model`, its weights hash names
it in each image's provenance, and its scheduler is the one the LoRA needs (a distilled model samples
with its own). `model_index.json` records what it was made of (the base's weights, each LoRA's sha256
and scale)."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ray_faceid import storage
from ray_faceid.errors import BackendUnavailable, BadInput, StorageError, UnsupportedModel
from ray_faceid.pipelines.models import BaseModel, load_base
from ray_faceid.pipelines.schedulers import Sampler
from ray_faceid.weights_hash import module_hash


def diffusers_pipeline(base: BaseModel, scheduler=None):
    """diffusers' pipeline over the base's own modules (SD 1.x / 2.x or SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler or base.scheduler
    if base.family == "sdxl":
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=base.zero_empty_prompt,
                                         add_watermarker=False)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def merge_loras(model: str, loras: list[str], scales: list[float], out: str | Path,
                sampler: Sampler | None = None, steps: int | None = None, guidance: float | None = None) -> dict:
    """Fuse `loras` (files at any fsspec URI, each at its scale) into `model` and save the result at
    `out` (a new folder) with `sampler`'s scheduler (default: the base's own), and `steps` and
    `guidance` as the folder's own defaults (a few-step model's: every path uses them unless told
    otherwise). Returns the record written into its model_index.json."""
    if "://" in str(out) and not str(out).startswith("file://"):
        raise BadInput(f"--out {out}: a local folder (merge here, then copy it where models live)")
    out = Path(str(out).removeprefix("file://")).resolve()  # `.` has a name once resolved
    if not loras:
        raise BadInput("--lora: give at least one LoRA file (.safetensors, as diffusers or kohya save them)")
    if len(scales) not in (0, 1, len(loras)):
        raise BadInput(f"--lora-scale: give one scale for all LoRAs or one per LoRA ({len(loras)}), not {len(scales)}")
    scales = list(scales) * len(loras) if len(scales) == 1 else (list(scales) or [1.0] * len(loras))
    if any(scale == 0 for scale in scales):
        raise BadInput("--lora-scale 0 changes nothing: leave that LoRA out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"--out {out} is not an empty folder: merge into a new one (nothing there is overwritten)")
    try:
        import peft  # noqa: F401 - diffusers loads LoRAs through PEFT
    except ImportError:
        raise BackendUnavailable("merging LoRAs needs PEFT: pip install 'ray_faceid[lora]'") from None
    files = [(uri, storage.read_bytes(uri)) for uri in loras]  # a missing file fails before the base loads
    base = load_base(model)
    if base.untrained:
        raise BadInput(f"--model {model} is the untrained smoke-test base: merge LoRAs into a real model's folder")
    pipe = diffusers_pipeline(base, sampler.build(base.scheduler) if sampler else None)
    parts = [m for m in (base.unet, base.text_encoder, base.text_encoder_2) if m is not None]
    merged = []
    for (uri, data), scale in zip(files, scales):
        before = [module_hash(m) for m in parts]
        _fuse(pipe, uri, data, scale)
        if [module_hash(m) for m in parts] == before:
            raise UnsupportedModel(f"LoRA {uri} changed no weight of {model}: its layers match none of this "
                                   f"{base.family} base's (a LoRA for another family?)")
        merged.append({"file": uri.rsplit("/", 1)[-1], "sha256": hashlib.sha256(data).hexdigest(), "scale": scale})
    record = {"base": model, "base_weights": base.model_hash(), "loras": merged,
              "scheduler": type(pipe.scheduler).__name__}
    # A base merged before keeps its own steps and guidance unless new ones are given.
    record["sampling"] = base.sampling | {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
    names = " + ".join(f"{m['file']}@{m['sha256'][:12]}x{m['scale']:g}" for m in merged)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written into a folder of this merge's own beside --out, renamed in whole: a crash midway never
        # leaves a folder that loads, and nothing of another merge's or the user's is touched.
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merge-"))
        try:
            pipe.save_pretrained(partial)
            index = partial / "model_index.json"
            meta = json.loads(index.read_text()) | {"_ray_faceid_model_id": f"{base.model_id} + {names}",
                                                   "_ray_faceid_merged": record}
            if record["sampling"]:
                meta["_ray_faceid_sampling"] = record["sampling"]
            index.write_text(json.dumps(meta, indent=2))
            if out.exists():
                out.rmdir()  # empty, checked above (something written there since fails here, kept)
            partial.rename(out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; what a failure left otherwise
    except OSError as exc:
        raise StorageError(f"--out {out}: the merged model could not be written ({exc.strerror or exc})") from None
    return record


def _fuse(pipe, uri: str, data: bytes, scale: float) -> None:
    """One LoRA through diffusers' loader, fused at `scale`, its PEFT layers then removed."""
    with tempfile.TemporaryDirectory() as tmp:
        name = uri.rsplit("/", 1)[-1]
        (Path(tmp) / name).write_bytes(data)
        try:
            pipe.load_lora_weights(tmp, weight_name=name, adapter_name="merge")
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UnsupportedModel(f"LoRA {uri} could not be applied to this base: {first}") from None
        try:
            pipe.fuse_lora(lora_scale=scale, adapter_names=["merge"])
        except (ValueError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UnsupportedModel(f"LoRA {uri} could not be fused into this base: {first}") from None
    pipe.unload_lora_weights()
