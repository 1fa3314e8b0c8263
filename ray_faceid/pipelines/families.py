"""Base model families: what a diffusers folder is, read from its configs before anything heavy loads.

`sd1` (one CLIP text encoder, 768 wide), `sd2` (one OpenCLIP encoder, 1024 wide, often
v-prediction) and `sdxl` (two text encoders, pooled embeddings and time ids as added conditioning);
each with an inpainting variant (a 9-channel UNet). `flux` (a FluxPipeline or FluxFillPipeline
folder: a transformer, not a UNet; pipelines/flux.py). Anything else (SD3, PixArt, FLUX's control
and Kontext pipelines; an SDXL refiner; a bare UNet; UNets of other channels or conditioning, such as
InstructPix2Pix, upscalers, unCLIP; a UNet without its text encoder) is refused in one line that
names what it looks like.
"""
from __future__ import annotations

import json
from pathlib import Path

from ray_faceid.errors import UnsupportedModel

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
SUPPORTED = ("supported: SD 1.x, SD 2.x and SDXL diffusers folders (and their inpainting variants), and FLUX.1 "
             "(dev, schnell, Fill)")
FLUX_PIPELINES = ("FluxPipeline", "FluxFillPipeline")
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
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
    if pipeline in FLUX_PIPELINES:
        return _check_flux(folder, pipeline)
    for prefix, name in OTHER_PIPELINES.items():
        if pipeline.startswith(prefix):
            kind = f"a {name} model of another kind" if name == "FLUX" else f"a {name} model"
            raise UnsupportedModel(f"{folder} looks like {kind} ({pipeline}); {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    if unet is None:
        if (folder / "transformer").is_dir():
            raise UnsupportedModel(f"{folder} looks like a transformer-based model (transformer/, no unet/); {SUPPORTED}")
        bare = _read_json(folder / "config.json") or {}
        if str(bare.get("_class_name", "")).startswith("UNet"):
            raise UnsupportedModel(f"{folder} looks like a bare UNet (no VAE, text encoder, tokenizer or scheduler "
                                   f"beside it); {SUPPORTED}")
        raise UnsupportedModel(f"{folder} is not a diffusers model folder (no unet/config.json); {SUPPORTED}")
    _check_unet(folder, unet)
    family = unet_family(unet)
    if family == "sdxl":
        _check_sdxl(folder, index)
    else:
        _check_text_encoder(folder, index)
    return family


# UNet input widths we run: 4 latent channels, or 9 for an inpainting base (latents, mask, masked image).
LATENT_CHANNELS, INPAINT_CHANNELS = 4, 9
OTHER_UNETS = {8: "an InstructPix2Pix-style image-editing UNet (latents + the image to edit)",
               7: "an upscaler UNet (latents + the low-resolution image)"}


def _check_unet(folder: Path, unet: dict) -> None:
    """UNets of the families we run only: their channels and conditioning, before any weight loads
    (another layout fails at its first denoising step otherwise)."""
    channels = unet.get("in_channels", LATENT_CHANNELS)
    if channels not in (LATENT_CHANNELS, INPAINT_CHANNELS):
        what = OTHER_UNETS.get(channels, "a UNet of another kind")
        raise UnsupportedModel(f"{folder}'s UNet takes {channels} input channels: {what}, not a text-to-image or "
                               f"inpainting base; {SUPPORTED}")
    if unet.get("out_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
        raise UnsupportedModel(f"{folder}'s UNet predicts {unet['out_channels']} channels, not the {LATENT_CHANNELS} "
                               f"latent channels of SD's VAE; {SUPPORTED}")
    if unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None:
        raise UnsupportedModel(f"{folder}'s UNet takes a class embedding (class_embed_type "
                               f"{unet.get('class_embed_type')!r}: unCLIP, an upscaler or a class-conditioned model), "
                               f"not a text-to-image base; {SUPPORTED}")
    if unet.get("addition_embed_type") not in (None, "text_time"):
        raise UnsupportedModel(f"{folder}'s UNet takes {unet['addition_embed_type']!r} added conditioning "
                               f"(Kandinsky-style), not SDXL's text and time ids; {SUPPORTED}")


def _check_text_encoder(folder: Path, index: dict) -> None:
    present = [name for name in ("text_encoder", "tokenizer")
               if (folder / name).is_dir() and (index.get(name) or ["listed"])[0] is not None]
    missing = [name for name in ("text_encoder", "tokenizer") if name not in present]
    if missing:
        raise UnsupportedModel(f"{folder} has an SD UNet but no {' or '.join(missing)}: a text-to-image base "
                               f"needs its text encoder and tokenizer beside the UNet; {SUPPORTED}")


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


def _check_flux(folder: Path, pipeline: str) -> str:
    """A FLUX.1 folder: every component there, the transformer FLUX's."""
    missing = [name for name in FLUX_COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise UnsupportedModel(f"{folder} is a {pipeline} folder without {', '.join(missing)}: FLUX needs its "
                               "transformer, VAE, both text encoders (CLIP and T5) with their tokenizers and its scheduler")
    if _read_json(folder / "vae" / "config.json") is None:
        raise UnsupportedModel(f"{folder}/vae/config.json is missing or not JSON: FLUX needs its VAE's config")
    transformer = _read_json(folder / "transformer" / "config.json") or {}
    if transformer.get("_class_name") != "FluxTransformer2DModel":
        raise UnsupportedModel(f"{folder}'s transformer is a {transformer.get('_class_name') or 'model of no class'}, "
                               f"not FLUX's FluxTransformer2DModel; {SUPPORTED}")
    return "flux"
