"""Base model families: what a diffusers folder is, read from its configs before anything heavy loads.

`sd1` (one CLIP text encoder, 768 wide), `sd2` (one OpenCLIP encoder, 1024 wide, often
v-prediction) and `sdxl` (two text encoders, pooled embeddings and time ids as added conditioning);
each with an inpainting variant (a 9-channel UNet). Anything else (FLUX, SD3, PixArt: transformers,
not UNets; an SDXL refiner; a bare UNet) is refused in one line that names what it looks like.
"""
from __future__ import annotations

import json
from pathlib import Path

from ray_faceid.errors import UnsupportedModel

FAMILIES = ("sd1", "sd2", "sdxl")
SUPPORTED = "supported: SD 1.x, SD 2.x and SDXL diffusers folders (and their inpainting variants)"
# model_index.json _class_name prefixes of pipelines built on something other than a UNet we serve.
OTHER_PIPELINES = {"Flux": "FLUX", "StableDiffusion3": "Stable Diffusion 3", "PixArt": "PixArt", "Sana": "Sana",
                   "HunyuanDiT": "Hunyuan-DiT", "Lumina": "Lumina", "AuraFlow": "AuraFlow", "CogView": "CogView",
                   "Kandinsky": "Kandinsky", "Wuerstchen": "Wuerstchen", "StableCascade": "Stable Cascade",
                   "Kolors": "Kolors", "QwenImage": "Qwen-Image"}


def unet_family(config) -> str:
    """The family of a UNet from its config (a dict or a diffusers FrozenDict)."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def detect_family(folder: str | Path) -> str:
    """The family of a local diffusers folder, or UnsupportedModel naming what it looks like."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json") or {}
    pipeline = str(index.get("_class_name", ""))
    for prefix, name in OTHER_PIPELINES.items():
        if pipeline.startswith(prefix):
            raise UnsupportedModel(f"{folder} looks like a {name} model ({pipeline}); {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    if unet is None:
        if (folder / "transformer").is_dir():
            raise UnsupportedModel(f"{folder} looks like a transformer-based model (transformer/, no unet/); {SUPPORTED}")
        bare = _read_json(folder / "config.json") or {}
        if str(bare.get("_class_name", "")).startswith("UNet"):
            raise UnsupportedModel(f"{folder} looks like a bare UNet (no VAE, text encoder, tokenizer or scheduler "
                                   f"beside it); {SUPPORTED}")
        raise UnsupportedModel(f"{folder} is not a diffusers model folder (no unet/config.json); {SUPPORTED}")
    family = unet_family(unet)
    if family == "sdxl":
        _check_sdxl(folder, index)
    return family


def _check_sdxl(folder: Path, index: dict) -> None:
    # A component saved as None is listed in model_index.json as [null, null].
    present = {name for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
               if (folder / name).is_dir() and (index.get(name) or ["listed"])[0] is not None}
    if "text_encoder_2" in present and "text_encoder" not in present:
        raise UnsupportedModel(f"{folder} looks like an SDXL refiner (only text_encoder_2); it refines images, it "
                               f"does not make them: bring the SDXL base; {SUPPORTED}")
    missing = [name for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if name not in present]
    if missing:
        raise UnsupportedModel(f"{folder} has an SDXL UNet but no {', '.join(missing)}: SDXL needs both text "
                               "encoders and their tokenizers")
