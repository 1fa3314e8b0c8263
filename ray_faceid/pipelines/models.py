"""Base diffusion models: from a local folder, an fsspec URI or a hub id (diffusers layout), or
`tiny` / `tiny-sdxl`: random-initialised tiny components built from configs, for tests and smoke runs.

Output of a tiny base is untrained noise-shaped imagery; everything it produces is labelled
untrained. The family (sd1, sd2, sdxl: families.py) is read from the folder's configs before
anything loads, and a folder of another family is refused. An inpainting base (9-channel UNet:
latents + mask + masked-image latents) is detected from its config; `tiny-inpaint` and
`tiny-sdxl-inpaint` build one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ray_faceid.pipelines.model_ref import ModelRef, resolve_model
from ray_faceid.weights_hash import cached_module_hash, weights_hash_of

TRAINED_STEPS, UNTRAINED_STEPS = 30, 4
DEFAULT_GUIDANCE = 5.0


@dataclass
class BaseModel:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler: object
    model_id: str
    untrained: bool = False
    text_encoder_2: object = None
    """SDXL's second text encoder (with projection: its pooled output conditions the UNet)."""
    tokenizer_2: object = None
    zero_empty_prompt: bool = False
    """SDXL's force_zeros_for_empty_prompt: an empty negative prompt is all zeros, not encoded."""
    sampling: dict = field(default_factory=dict)
    """The folder's own steps and guidance (`merge-lora --steps --guidance` records a few-step model's)."""

    @property
    def family(self) -> str:
        """sd1, sd2 or sdxl (families.py), from the UNet's config."""
        from ray_faceid.pipelines.families import unet_family

        return unet_family(self.unet.config)

    @property
    def pooled_dim(self) -> int:
        """Width of SDXL's pooled text embedding (an engine input); 0 for SD 1.x / 2.x."""
        return 0 if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim

    @property
    def modules(self) -> dict:
        """The torch modules of the base, by component name."""
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the UNet was built for: its sample size in pixels (512 for SD 1.x, 1024 for
        SDXL, 32 for the tiny bases). The default of every command, catalog row and request."""
        side = self.unet.config.sample_size
        width, height = (side, side) if isinstance(side, int) else (side[1], side[0])
        return width * self.vae_scale_factor, height * self.vae_scale_factor

    @property
    def default_steps(self) -> int:
        """Denoising steps when none are asked for: a handful for an untrained smoke base (its images
        are noise at any count), the folder's own (a few-step model's 4), else 30."""
        if self.sampling.get("steps"):
            return self.sampling["steps"]
        return UNTRAINED_STEPS if self.untrained else TRAINED_STEPS

    @property
    def default_guidance(self) -> float:
        """Classifier-free guidance when none is asked for: the folder's own (a few-step model's 0-1), else 5."""
        return self.sampling.get("guidance", DEFAULT_GUIDANCE)

    def __post_init__(self):
        # Taken now, before any cast or move: what the model IS, whatever precision it runs in.
        self.weights = {name: weights_hash_of(module) for name, module in self.modules.items()}
        self._hash = None

    def model_hash(self) -> str:
        """Hash of the components' weights (and configs), the tokenizer and the scheduler: provenance,
        adapter compatibility, render and engine keys. The model id is not in it: the same weights
        loaded from another path or under another name are the same model."""
        if self._hash is None:  # every generated image's provenance asks: hash the tokenizer once
            parts = {"weights": self.weights, "tokenizer": _tokenizer_hash(self.tokenizer)}
            if self.tokenizer_2 is not None:  # SD 1.x / 2.x hashes stay what they were
                parts["tokenizer_2"] = _tokenizer_hash(self.tokenizer_2)
            if self.scheduler is not None:
                parts["scheduler"] = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
            self._hash = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._hash

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BaseModel":
        """Move (and cast) every module; a VAE whose config says `force_upcast` (SDXL's overflows in
        fp16) stays fp32, and the pipeline casts latents to the VAE's own dtype."""
        for name, module in self.modules.items():
            upcast = name == "vae" and dtype == torch.float16 and getattr(module.config, "force_upcast", False)
            module.to(device) if dtype is None or upcast else module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "BaseModel":
        for module in self.modules.values():
            module.requires_grad_(False)
            module.eval()
        return self


def _tokenizer_hash(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    parts = {"vocab": sorted(tokenizer.get_vocab().items()), "max_length": tokenizer.model_max_length,
             "merges": sorted(f"{a} {b}" for a, b in getattr(tokenizer, "bpe_ranks", {}) or {})}
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def build_tiny(inpainting: bool = False, seed: int = 0, family: str = "sd1") -> BaseModel:
    if family == "sdxl":
        return build_tiny_sdxl(inpainting, seed)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    tokenizer = tiny_tokenizer(max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    name = "tiny-inpaint" if inpainting else "tiny"
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, model_id=f"{name} (untrained)", untrained=True).freeze()


def build_tiny_sdxl(inpainting: bool = False, seed: int = 0) -> BaseModel:
    """SDXL's structure at toy size (as diffusers' own SDXL tests build it): two CLIP text encoders
    (the second with a projection), added text-time conditioning, a VAE that asks for fp32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9 if inpainting else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, layers_per_block=1, force_upcast=True, scaling_factor=0.13025,
    )
    tokenizer, tokenizer_2 = tiny_tokenizer(max_length=32), tiny_tokenizer(max_length=32)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    name = "tiny-sdxl-inpaint" if inpainting else "tiny-sdxl"
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, model_id=f"{name} (untrained)", untrained=True,
                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, zero_empty_prompt=True).freeze()


def build_named_tiny(model: str) -> BaseModel:
    """`tiny`, `tiny-inpaint`, `tiny-sdxl` or `tiny-sdxl-inpaint`."""
    return build_tiny(inpainting=model.endswith("-inpaint"), family="sdxl" if "sdxl" in model else "sd1")


def save_base(base: BaseModel, folder: str | Path) -> None:
    """Write a base model in the diffusers layout (model_index.json + one folder per component)."""
    folder = Path(folder)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        if getattr(base, name) is not None:
            getattr(base, name).save_pretrained(folder / name)
    sdxl = base.family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_ray_faceid_model_id": base.model_id, "_ray_faceid_untrained": base.untrained}
    if base.sampling:
        index["_ray_faceid_sampling"] = base.sampling
    if sdxl:
        index["force_zeros_for_empty_prompt"] = base.zero_empty_prompt
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _from_diffusers_layout(source: str, model_id: str, family: str) -> BaseModel:
    """A local diffusers folder of a supported `family` (model_ref.py read it from the configs)."""
    from ray_faceid.quiet import model_loading

    model_loading()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ray_faceid.pipelines.schedulers import folder_scheduler

    untrained, meta = False, {}
    index = Path(source) / "model_index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        model_id = meta.get("_ray_faceid_model_id", model_id)
        untrained = bool(meta.get("_ray_faceid_untrained", False))
    components = {
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
    }
    extra = {}
    if family == "sdxl":
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2")
        extra = {"tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
                 "zero_empty_prompt": bool(meta.get("force_zeros_for_empty_prompt", True))}
    for name, module in components.items():  # hashed once per machine for a local folder's files
        cached_module_hash(module, Path(source) / name if Path(source).is_dir() else None)
    base = BaseModel(
        **components,
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        scheduler=folder_scheduler(source),  # the sampler the model ships with (SD 1.5: PNDM, SDXL: Euler)
        model_id=model_id,
        untrained=untrained,
        sampling=_sampling_defaults(meta.get("_ray_faceid_sampling"), source),
        **extra,
    ).freeze()
    _check_text_widths(base, source)
    return base


def _sampling_defaults(recorded, source: str) -> dict:
    """The steps and guidance a folder's model_index.json records (merge-lora writes them), checked:
    a hand-edited value out of range is named here, not at the first request."""
    from ray_faceid.errors import UnsupportedModel

    recorded = recorded or {}
    steps, guidance = (recorded.get("steps"), recorded.get("guidance")) if isinstance(recorded, dict) else (0, -1)
    bad_steps = steps is not None and (type(steps) is not int or not 1 <= steps <= 200)
    bad_guidance = guidance is not None and (type(guidance) not in (int, float) or not 0 <= guidance <= 30)
    if bad_steps or bad_guidance or set(recorded) - {"steps", "guidance"}:
        raise UnsupportedModel(f"{source}: model_index.json's _ray_faceid_sampling must be {{steps: 1-200, "
                               f"guidance: 0-30}}, not {recorded!r}")
    return {k: v for k, v in (("steps", steps), ("guidance", None if guidance is None else float(guidance)))
            if v is not None}


def _check_text_widths(base: BaseModel, source: str) -> None:
    """The text encoders and tokenizers must fit the UNet: a mismatch is named here, not a
    shape error from inside diffusers at the first step."""
    from ray_faceid.errors import UnsupportedModel

    width = base.text_encoder.config.hidden_size
    if base.text_encoder_2 is not None:
        width += base.text_encoder_2.config.hidden_size
        if base.tokenizer.model_max_length != base.tokenizer_2.model_max_length:
            raise UnsupportedModel(f"{source}: tokenizer ({base.tokenizer.model_max_length} tokens) and tokenizer_2 "
                                   f"({base.tokenizer_2.model_max_length}) disagree; SDXL needs the same length")
    if width != base.unet.config.cross_attention_dim:
        raise UnsupportedModel(f"{source}: the text encoders give {width}-wide states but the UNet reads "
                               f"{base.unet.config.cross_attention_dim}: the components come from different models")


def load_base(model: str | ModelRef) -> BaseModel:
    """A tiny base (TINY), a local diffusers folder, an fsspec URI of one, or a hub id: resolved
    (model_ref.py) unless a reference is given."""
    ref = resolve_model(model)
    if ref.kind == "tiny":
        return build_named_tiny(ref.name)
    return _from_diffusers_layout(str(ref.local_folder(weights=True)), ref.name, ref.family)
