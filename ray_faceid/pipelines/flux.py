"""FLUX.1 (Black Forest Labs) bases: a diffusers folder, or `tiny-flux` built offline for tests and
smoke runs.

FLUX is not a UNet. A transformer (FluxTransformer2DModel) denoises the VAE's 16-channel latents
packed in 2x2 patches (64 values a token): joint text-image attention in dual-stream blocks, then
single-stream ones, rotary positions (text tokens at 0, each patch at its row and column). The text
comes from T5 (the token sequence) and CLIP (its pooled vector). It is trained by flow matching; the
sigma schedule is shifted by the image's token count. The variants, read from the transformer's
config: dev takes the guidance scale as an input (guidance-distilled: no unconditional pass), schnell
takes none and runs in 4 steps, Fill (inpainting) reads the masked image and the mask packed beside
the latents. Sampling is in flux_sampling.py.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.weights_hash import cached_module_hash, weights_hash_of

DEV_STEPS, SCHNELL_STEPS, FILL_STEPS, UNTRAINED_STEPS = 28, 4, 50, 4  # FluxPipeline's, schnell's, FluxFillPipeline's
DEV_GUIDANCE, FILL_GUIDANCE = 3.5, 30.0  # FluxPipeline's and FluxFillPipeline's default guidance_scale
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's: 128 latent pixels, 1024 px through the VAE's factor 8
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length (its most)


@dataclass
class FluxBase:
    transformer: object
    vae: object
    text_encoder: object
    """CLIP: its pooled vector conditions every block (the transformer's `pooled_projections`)."""
    tokenizer: object
    text_encoder_2: object
    """T5's encoder: the token sequence the blocks attend to jointly with the image."""
    tokenizer_2: object
    scheduler: object
    model_id: str
    untrained: bool = False

    family = "flux"

    def __post_init__(self):
        # Taken before any cast or move: what the model IS, whatever precision it runs in.
        self.weights = {name: weights_hash_of(module) for name, module in self.modules.items()}
        self._hash = None

    @property
    def modules(self) -> dict:
        return {name: getattr(self, name) for name in WEIGHTED}

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def inpainting(self) -> bool:
        """Fill: the transformer reads the masked image's latents and the mask beside the noisy ones."""
        return self.transformer.config.in_channels != 4 * self.latent_channels

    @property
    def guidance_embedded(self) -> bool:
        """dev: the guidance scale is an input of the transformer; schnell: none."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def variant(self) -> str:
        return "fill" if self.inpainting else "dev" if self.guidance_embedded else "schnell"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: the VAE's factor, times 2 for the patches."""
        return 2 * self.vae_scale_factor

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) when none is asked for: FluxPipeline's 1024 px for a real base (its 128
        latent pixels), 32 px for the tiny one."""
        side = 32 if self.untrained else DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        return side, side

    @property
    def default_steps(self) -> int:
        if self.untrained:
            return UNTRAINED_STEPS
        return FILL_STEPS if self.inpainting else DEV_STEPS if self.guidance_embedded else SCHNELL_STEPS

    @property
    def default_guidance(self) -> float | None:
        """dev's 3.5, Fill's 30 (diffusers' defaults); None for schnell, which takes no guidance."""
        if not self.guidance_embedded:
            return None
        return FILL_GUIDANCE if self.inpainting else DEV_GUIDANCE

    def model_hash(self) -> str:
        """Hash of the components' weights, the tokenizers and the scheduler (provenance); not the
        model id: the same weights under another name are the same model."""
        if self._hash is None:
            self._hash = flux_model_hash(self.weights, self.tokenizer, self.tokenizer_2, self.scheduler)
        return self._hash

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "FluxBase":
        for module in self.modules.values():
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "FluxBase":
        for module in self.modules.values():
            module.requires_grad_(False)
            module.eval()
        return self


def build_tiny_flux(guidance_embeds: bool = True, seed: int = 0, fill: bool = False) -> FluxBase:
    """FLUX's structure at toy size (as diffusers' own FLUX tests build it, with FLUX's 16 latent
    channels): one dual-stream and one single-stream block, a CLIP text encoder for the pooled
    vector, a T5 encoder, a VAE of factor 2. `guidance_embeds`: dev (True) or schnell; `fill`: Fill's
    transformer, reading the packed masked photo (64) and mask (2 x 2 x the VAE's factor squared)
    beside the latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ray_faceid.pipelines.tiny_tokenizer import tiny_t5_tokenizer, tiny_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64 + (64 + 4 * 2 * 2 if fill else 0), out_channels=64, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=16,
        norm_num_groups=8, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,  # FLUX.1's VAE
    )
    tokenizer = tiny_tokenizer(max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"))
    tokenizer_2 = tiny_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=0))
    # FLUX.1-dev's scheduler: shifted by the image's token count; schnell's: a fixed shift of 1.
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    name = "tiny-flux-fill" if fill else "tiny-flux" if guidance_embeds else "tiny-flux-schnell"
    return FluxBase(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                    model_id=f"{name} (untrained)", untrained=True).freeze()


def load_flux(model, dtype: torch.dtype | None = None) -> FluxBase:
    """A FLUX base from a tiny name or a ModelRef of the flux family (model_ref.py); `dtype`: what a
    folder's weights load as (bf16 on a GPU: FLUX.1-dev's 12B parameters are 48 GB in fp32)."""
    from ray_faceid.pipelines.model_ref import resolve_model

    ref = resolve_model(model, flux=True)
    if ref.family != "flux":
        raise UnsupportedModel(f"{ref.name} is an {ref.family.upper()} model, not FLUX")
    if ref.kind == "tiny":
        return build_tiny_flux(guidance_embeds=ref.name != "tiny-flux-schnell", fill=ref.inpainting)
    return _from_diffusers_layout(str(ref.local_folder(weights=True)), ref.name, dtype)


def flux_dev_modules(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     components: tuple[str, ...] = ("transformer", "text_encoder_2", "text_encoder", "vae")) -> dict:
    """FLUX.1-dev's transformer, text encoders and VAE from their published configs, with random
    weights (the GPU benchmark's stand-in; on the meta device, its sizes without any memory), made
    in `dtype` (None: float32) in the order given, so one seed makes the same weights whichever
    components follow the transformer."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    builders = {
        "transformer": lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                          num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                                          is_gated_act=True)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                             num_hidden_layers=12, num_attention_heads=12,
                                                             max_position_embeddings=77, vocab_size=49408)),
        "vae": lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                     block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, use_quant_conv=False,
                                     use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
    }
    # Made in the dtype directly: FLUX.1's 17B parameters in float32 first would need 68 GB.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            return {name: builders[name]() for name in components}
    finally:
        torch.set_default_dtype(default)


FLUX_MAX_SIDE = 4096
WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2")  # the components with weights


def flux_model_hash(weights: dict, tokenizer, tokenizer_2, scheduler) -> str:
    """FluxBase.model_hash from its parts: the components' weights hashes, the tokenizers, the scheduler."""
    from ray_faceid.pipelines.models import _tokenizer_hash

    parts = {"weights": weights, "tokenizer": _tokenizer_hash(tokenizer), "tokenizer_2": _tokenizer_hash(tokenizer_2),
             "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remembered_model_hash(folder: str | Path) -> str | None:
    """The model_hash of a local FLUX folder where this machine has hashed its weights before (any
    command that loaded it), from its tokenizers and scheduler and the remembered weights hashes: no
    weights are read. None where one of them was never hashed here."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTokenizer

    from ray_faceid.weights_hash import remembered_hash

    weights = {name: remembered_hash(Path(folder) / name, widen_half=True) for name in WEIGHTED}
    if None in weights.values():
        return None
    return flux_model_hash(weights, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                           AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                           FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))


def check_flux_size(width: int, height: int, multiple: int, where: str = "") -> None:
    """Sides FLUX makes: multiples of its patch in pixels (`size_multiple`), up to FLUX_MAX_SIDE; a
    refusal suggests the nearest size it makes. `where`: what the message starts with (a flag, a field)."""
    if width % multiple or height % multiple or not 0 < width <= FLUX_MAX_SIDE or not 0 < height <= FLUX_MAX_SIDE:
        from ray_faceid.pipelines.generate import nearest_size

        raise BadInput(f"{where}FLUX makes images whose sides are multiples of {multiple} up to {FLUX_MAX_SIDE}, not "
                       f"{width}x{height}: try {nearest_size(width, height, multiple, FLUX_MAX_SIDE)}")


def flux_settings(ref) -> dict:
    """What the checks before loading need, from a FLUX reference's configs alone: whether the
    transformer takes guidance, the multiple image sides must be, and the transformer's text width,
    inner width and dual-stream block count (what an identity adapter must match)."""
    if ref.kind == "tiny":
        with torch.random.fork_rng():  # building it seeds torch's generator: the caller's draws stay theirs
            config = build_tiny_flux(guidance_embeds=ref.name != "tiny-flux-schnell").transformer.config
        transformer = dict(config)
        multiple = 4
    else:
        folder = ref.local_folder()
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        multiple = 2 ** len(vae.get("block_out_channels", (0, 0, 0, 0)))
    return {"guidance_embedded": bool(transformer.get("guidance_embeds")), "size_multiple": multiple,
            "text_width": transformer.get("joint_attention_dim"),
            "inner_width": transformer.get("num_attention_heads", 0) * transformer.get("attention_head_dim", 0),
            "dual_blocks": transformer.get("num_layers")}


def _from_diffusers_layout(source: str, model_id: str, dtype: torch.dtype | None = None) -> FluxBase:
    from ray_faceid.quiet import model_loading

    model_loading()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    meta = json.loads((Path(source) / "model_index.json").read_text())
    cast = {} if dtype is None else {"torch_dtype": dtype}
    components = {
        "transformer": FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", **cast),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **cast),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **cast),
        "text_encoder_2": T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **cast),
    }
    for name, module in components.items():  # hashed once per machine for a local folder's files
        cached_module_hash(module, Path(source) / name, widen_half=True)  # bf16 on a GPU, fp32 on a CPU
    base = FluxBase(**components, tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                    tokenizer_2=AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
                    scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
                    model_id=meta.get("_ray_faceid_model_id", model_id),
                    untrained=bool(meta.get("_ray_faceid_untrained", False))).freeze()
    _check_widths(base, source)
    return base


def _check_widths(base: FluxBase, source: str) -> None:
    """The text encoders must fit the transformer: a mismatch is named here, not a shape error at
    the first step."""
    config = base.transformer.config
    pairs = (("text_encoder_2 (T5)", base.text_encoder_2.config.d_model, "joint_attention_dim", config.joint_attention_dim),
             ("text_encoder (CLIP)", base.text_encoder.config.hidden_size, "pooled_projection_dim",
              config.pooled_projection_dim))
    for what, width, key, wanted in pairs:
        if width != wanted:
            raise UnsupportedModel(f"{source}: {what} gives {width}-wide states but the transformer's {key} is {wanted}: "
                                   "the components come from different models")


def save_flux(base: FluxBase, folder: str | Path) -> None:
    """The tiny FLUX base as diffusers saves a FluxPipeline, or a FluxFillPipeline (a folder any FLUX
    path loads)."""
    from diffusers import FluxFillPipeline, FluxPipeline

    pipeline = FluxFillPipeline if base.inpainting else FluxPipeline
    pipe = pipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                    text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=base.transformer)
    pipe.save_pretrained(folder)
    index = Path(folder) / "model_index.json"
    meta = json.loads(index.read_text())
    meta.update({"_ray_faceid_model_id": base.model_id, "_ray_faceid_untrained": base.untrained})
    index.write_text(json.dumps(meta, indent=2))
