"""IdentityPipeline: prompt + identities -> images, and identity inpainting.

Here: loading the adapter's modules onto the base, each identity's tokens (embeddings, photos,
expression and attribute edits, regions), decoding and provenance. The denoising loop is in
sampling.py; what runs the UNet (eager torch or an engine, warm-up) in unet_runtime.py.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ray_faceid.engines.base import DTYPES
from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.context import identity_kwargs
from ray_faceid.identity.expression import expression_code
from ray_faceid.identity.personal_bank import PersonalBank
from ray_faceid.identity.personalization import version_of
from ray_faceid.identity.routing import Box, box_masks, strip_boxes
from ray_faceid.pipelines.models import BaseModel
from ray_faceid.pipelines.provenance import png_with_provenance
from ray_faceid.pipelines.sampling import DenoisingLoop
from ray_faceid.pipelines.schedulers import Sampler
from ray_faceid.pipelines.text_conditioning import TextConditioning, encode_prompts
from ray_faceid.pipelines.unet_runtime import UNetRuntime

MAX_IDENTITIES = 4


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """`auto` is fp16 on CUDA and fp32 elsewhere (half precision on CPU is slower, not faster)."""
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise BadInput(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    return precision


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """'512x512' -> (width, height); every command and catalog row reads sizes through this.
    `name` is what the message calls the value (a flag, a catalog field)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise BadInput(f"{name} must look like 512x512, got {text!r}") from exc
    if not (8 <= width <= 2048 and 8 <= height <= 2048):
        raise BadInput(f"{name} {text}: each side must be between 8 and 2048")
    return width, height


def nearest_size(width: int, height: int, multiple: int, most: int = 2048) -> str:
    """The size nearest `width` x `height` whose sides are multiples of `multiple` up to `most`: what a
    refusal of a size suggests."""
    def side(length: int) -> int:
        return min(most // multiple * multiple, max(multiple, int(length / multiple + 0.5) * multiple))

    return f"{side(width)}x{side(height)}"


@dataclass
class IdentityCondition:
    """One person to put in the image."""

    name: str
    embeddings: np.ndarray
    """(R, D) reference embeddings from the face stack (one row per reference photo)."""
    quality: np.ndarray | None = None
    region: Box | None = None
    """x0, y0, x1, y1 as fractions of the image; default: equal vertical strips."""
    expression: str | dict | None = None
    scale: float = 1.0
    personal: tuple[str, dict] | None = None
    """(version, weight delta) of this identity's own adapter (train.personalize); applied when the
    identity is alone in its image (its weights live in layers every identity of a row shares), as
    that row's own weights (identity/personal_bank.py), never by changing the shared ones."""
    edits: dict[str, float] | None = None
    """Attribute edits through the attribute flow, e.g. {"smile": 0.8, "yaw": -20} (identity/edits.py)."""
    id: str | None = None
    """The enrolled person's registry id, where the embeddings came from the registry (`name`: what the
    caller called them)."""
    image_features: np.ndarray | None = None
    """(R, S, H) CLIP image features of the reference faces, for adapters that read them (FaceID-Plus)."""
    pose: np.ndarray | None = None
    """InstantID: the face's five keypoints in the image made (5 x 2, fractions of its width and
    height, identity/instantid.py's order); None: a frontal face in the middle."""
    encoder: str | None = None
    """The key of the encoder that made `embeddings` (a person may hold several encoders' sets, and a
    published file takes any of its width); None: the caller gave them as they are (--face-embedding)."""
    edit_moved: float | None = field(default=None, init=False)
    """Set by the pipeline: how far the edits moved the embedding (L2, the encoder's units)."""


@dataclass
class GenerationItem:
    """One image to make."""

    prompt: str
    identities: list[IdentityCondition]
    negative_prompt: str = ""
    seed: int = 0
    identity_start: int = 0
    """The denoising step (from 0) at which its people's identity starts: earlier steps run without it
    (PuLID-FLUX's start_step; later: less likeness, more of the prompt). Its strength is an input of
    each call, so compiled engines never rebuild for it."""


def check_identity_start(items: list[GenerationItem], steps: int) -> None:
    for item in items:
        check_start(item.identity_start, steps)


def check_start(identity_start: int, steps: int) -> None:
    if not 0 <= identity_start < steps:
        raise BadInput(f"identity start {identity_start} is past the last of {steps} steps: give a step from 0 "
                       f"to {steps - 1} (later, the person would not be in the image)")


def identity_active(starts: list[int], step: float, device) -> torch.Tensor | None:
    """Per row, 1 where its identity applies at `step` (from 0) and 0 where it has not started; None
    where every row's applies (the inputs as they are)."""
    if all(start <= step for start in starts):
        return None
    return torch.tensor([float(start <= step) for start in starts], device=device)


def with_identity_start(record: dict, item: GenerationItem) -> dict:
    """An image's provenance with the step its identity started at (where not the first)."""
    return dict(record, identity_start=item.identity_start) if item.identity_start else record


@dataclass
class GenerationResult:
    images: list[Image.Image]
    png: list[bytes]
    provenance: list[dict]
    seeds: list[int] = field(default_factory=list)


class IdentityPipeline(DenoisingLoop, UNetRuntime):
    """The sampling loop is in sampling.py, the UNet's runtimes (engines, warm-up) in unet_runtime.py."""

    def __init__(self, base: BaseModel, adapter: IdentityAdapter | None = None, imr=None,
                 device: str | torch.device = "cpu", backend: str = "torch", engine_cache=None,
                 precision: str = "fp32", flow=None):
        """`precision` casts the UNet, VAE, text encoder, adapter and IMR (fp16 / bf16 on GPU); the
        scheduler's latents and the attribute flow (an edit must be exactly reversible) stay fp32.
        `imr` (identity/imr.py) turns `expression` requests into motion of the identity tokens;
        `flow` (identity/flow.py) carries out `edits`; load both with pipelines/edit_modules.py, which
        checks them against the adapter."""
        from ray_faceid.engines.select import resolve_backend

        self.base, self.adapter, self.imr, self.flow = base, adapter, imr, flow
        self.device = torch.device(device)
        if (imr is not None or flow is not None) and adapter is None:
            raise BadInput("an IMR or an attribute flow works on an identity adapter's input: load an adapter")
        self.backend = resolve_backend(backend)
        if self.backend != "torch" and adapter is None:
            raise BadInput(f"the {self.backend} backend runs the UNet with identity processors: load an adapter")
        if self.backend == "tensorrt" and adapter is not None and adapter.kind.identitynet:
            raise BadInput("InstantID's IdentityNet runs with the UNet on --backend torch, torch.compile or "
                           "onnxruntime; TensorRT plans do not take its residuals yet")
        self.engine_cache, self.engines = engine_cache, {}
        self._engines_lock, self._refused = threading.Lock(), set()  # versions of erased people's adapters
        self.on_step = None  # callback(step, total): 0 before denoising, then after each step (progress bars)
        self.compile_new_shapes = True
        """torch.compile: compile a shape on its first use; False (Serve, after its warm-up): run an
        unwarmed shape eager rather than make its request wait for a compile."""
        self._compiled = None  # the torch.compile engine, made on first use
        # The hash of the adapter as loaded, before any cast: the registry's per-identity adapters
        # and the provenance refer to the trained weights, whatever precision they run in.
        self.adapter_hash = None if adapter is None else adapter.content_hash()
        dtype = DTYPES[resolve_precision(precision, self.device)]
        cast = {} if dtype == torch.float32 else {"dtype": dtype}  # fp32: leave a base cast by the caller as is
        base.to(self.device, cast.get("dtype"))
        for module in (adapter, imr):
            if module is not None:
                module.to(self.device, **cast).eval()
        if flow is not None:
            flow.to(self.device).eval()
        if adapter is not None:
            adapter.install(base.unet)
        else:
            IdentityAdapter.remove(base.unet)
        # People's own adapters as per-row weights (after the cast: the bank takes the adapter's dtype).
        self.personal_bank = None if adapter is None else PersonalBank(adapter)

    # -- conditioning -------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], zero_empty: bool = False) -> TextConditioning:
        """The text conditioning of each prompt, as the base's family reads it (text_conditioning.py)."""
        return encode_prompts(self.base, prompts, zero_empty)

    def check_people(self, identities: list[IdentityCondition]) -> None:
        """People who cannot share one image with this adapter's kind (FaceID-Portrait: unequal photo
        counts). Checked per request before a batch runs (one request's people fail it alone)."""
        if self.adapter is not None:
            self.adapter.kind.check_people(identities)

    @torch.no_grad()
    def identity_tokens(self, identities: list[IdentityCondition]) -> torch.Tensor:
        """(1, M, T, C) tokens of every identity, as the adapter's kind reads each (identity/kinds.py)."""
        kind = self.adapter.kind
        kind.check_people(identities)
        spec = self.adapter.encoder_spec
        dtype = next(self.adapter.parameters()).dtype  # fp16 / bf16 on GPU
        tokens = []
        for ident in identities:
            emb = torch.as_tensor(np.atleast_2d(ident.embeddings), dtype=dtype, device=self.device)
            if emb.shape[-1] != spec.dim:
                raise BadInput(f"identity {ident.name}: {emb.shape[-1]}-d embeddings, the adapter needs {spec.dim}-d "
                               f"({spec.key()})")
            code = expression_code(ident.expression)
            if code is not None:
                code = code.to(self.device, dtype).unsqueeze(0)
            t = kind.tokens(self, ident, emb, code)
            if code is not None and self.imr is not None:
                t = self.imr(t, code)
            tokens.append(t)
        return torch.stack(tokens, dim=1).to(self.base.unet.dtype)

    def check_edits(self, name: str, edits: dict) -> None:
        """Edits this pipeline can carry out: a flow is loaded and has every attribute named."""
        from ray_faceid.identity.edits import check_edits

        if self.flow is None:
            raise BadInput(f"identity {name}: attribute edits need an attribute flow (--flow URI on the command "
                           "line, flow: in the Serve config); train one with `ray-faceid train --method flow`")
        check_edits(edits, self.flow.attributes)

    def edited(self, ident: IdentityCondition, references: torch.Tensor, fused: torch.Tensor | None = None):
        """The mapper's input with the identity's attribute edits applied (the input itself without
        edits); records how far the edits moved it on the condition."""
        from ray_faceid.identity.edits import edit_embeddings, edit_fused

        target = references if fused is None else fused
        if not ident.edits:
            return target
        self.check_edits(ident.name, ident.edits)
        if fused is None:
            edited, moved = edit_embeddings(self.flow, references, ident.edits)
        else:
            edited, moved = edit_fused(self.flow, fused, references, ident.edits)
        ident.edit_moved = float(moved.float().mean())
        return edited

    def region_masks(self, identities: list[IdentityCondition], height: int, width: int) -> torch.Tensor | None:
        if len(identities) == 1 and identities[0].region is None:
            return None
        defaults = strip_boxes(len(identities))
        boxes = [ident.region or defaults[i] for i, ident in enumerate(identities)]
        try:
            return box_masks(boxes, height, width).unsqueeze(0).to(self.device)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc

    # -- sampling -----------------------------------------------------------------------------
    def _check_size(self, width: int, height: int) -> None:
        step = self.base.vae_scale_factor
        if width % step or height % step or width < step or height < step:
            raise BadInput(f"width and height must be positive multiples of {step} for this model, got {width}x{height}: "
                           f"try {nearest_size(width, height, step)}")

    def _identity_kwargs(self, items: list["GenerationItem"], h: int, w: int) -> dict:
        """cross_attention_kwargs for 2B rows: B unconditional (identity scale 0), then B conditional."""
        counts = {len(it.identities) for it in items}
        if counts == {0}:
            return {}
        if len(counts) > 1:
            raise BadInput("images generated together must have the same number of identities")
        if self.adapter is None:
            raise BadInput("identities were given but no identity adapter is loaded (pass --adapter)")
        tokens = torch.cat([self.identity_tokens(it.identities) for it in items])
        scale = torch.tensor([[c.scale for c in it.identities] for it in items], device=self.device,
                             dtype=self.base.unet.dtype)
        masks = [self.region_masks(it.identities, h, w) for it in items]
        if any(m is not None for m in masks):  # a single identity without region may act everywhere
            masks = [torch.ones(1, 1, h, w, device=self.device) if m is None else m for m in masks]
            region = torch.cat(masks).to(self.base.unet.dtype)
            region = torch.cat([region, region])
        else:
            region = None
        # One context for the whole denoise: the routing is the same at every step.
        if self.adapter.options.negative == "zero_embedding":  # the adapter's own convention (published.py)
            return identity_kwargs(torch.cat([self.zero_tokens(tokens), tokens]), torch.cat([scale, scale]), region)
        return identity_kwargs(torch.cat([tokens, tokens]), torch.cat([torch.zeros_like(scale), scale]), region)

    def zero_tokens(self, like: torch.Tensor) -> torch.Tensor:
        """Tokens of a zero embedding for each identity (as the adapter's kind makes them): the
        unconditional rows of adapters whose reference pipeline guides against them."""
        zero = self.adapter.kind.zero_tokens(self, next(self.adapter.parameters()).dtype)
        zero = zero.repeat(1, like.shape[2] // zero.shape[1], 1)  # FaceID-Portrait: one set per photo
        return zero[:, None].expand(like.shape[0], like.shape[1], -1, -1).to(like.dtype)

    @staticmethod
    def personal_of(item: "GenerationItem") -> tuple[str, dict] | None:
        """The own adapter an image runs with: that of its single identity, if it has one."""
        return item.identities[0].personal if len(item.identities) == 1 else None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.base.vae
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        arr = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        vae = self.base.vae
        x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0).to(self.device) / 127.5 - 1
        return vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor

    def provenance(self, kind, prompt, negative_prompt, identities, seed, steps, guidance, width, height,
                   sampler: Sampler | None = None) -> dict:
        return {
            "generator": "ray_faceid",
            "kind": kind,
            "ai_generated": True,
            "base_model": self.base.model_id,
            "base_model_hash": self.base.model_hash(),
            "base_family": self.base.family,
            "untrained_base": self.base.untrained,
            "adapter": self.adapter_hash,
            "backend": self.backend,
            **({"compiler": self._compiled.compiler} if self._compiled is not None else {}),
            "adapter_trained_steps": None if self.adapter is None else self.adapter.trained_steps,
            **({"adapter_published": self.adapter.published} if self.adapter is not None and self.adapter.published
               else {}),
            **({"image_encoder": self.adapter.image_encoder.sha256}
               if self.adapter is not None and self.adapter.image_encoder is not None else {}),
            **({"identitynet": self.adapter.identitynet.record()}
               if self.adapter is not None and self.adapter.identitynet is not None else {}),
            "encoder": None if self.adapter is None else self.adapter.encoder_spec.key(),
            "imr": getattr(self.imr, "weights_hash", None if self.imr is None else "unsaved"),
            "flow": getattr(self.flow, "weights_hash", None if self.flow is None else "unsaved"),
            "identities": [{"name": i.name, "id": i.id, "region": i.region, "expression": i.expression, "scale": i.scale,
                            "personal_adapter": version_of(i.personal[0]) if i.personal and len(identities) == 1 else None,
                            "embeddings_encoder": i.encoder,
                            **({"edits": i.edits, "edit_moved": i.edit_moved} if i.edits else {})}
                           for i in identities],
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "scheduler": (sampler or Sampler()).record(self.base.scheduler),
            "guidance": guidance,
            "size": [width, height],
        }

    def generate(self, prompt: str, identities: list[IdentityCondition] | None = None, negative_prompt: str = "",
                 seed: int = 0, steps: int | None = None, guidance: float | None = None, width: int | None = None,
                 height: int | None = None, num_images: int = 1, sampler: Sampler | None = None,
                 identity_start: int = 0) -> GenerationResult:
        """Steps, guidance and size default to the base model's own (BaseModel.default_steps,
        default_guidance, native_size), the scheduler to the base's own (`sampler`: another, schedulers.py);
        `identity_start`: the step their identity starts at (GenerationItem)."""
        items = [GenerationItem(prompt, identities or [], negative_prompt, seed + k, identity_start)
                 for k in range(num_images)]
        return self.generate_items(items, steps, guidance, width, height, sampler)

    def generate_items(self, items: list["GenerationItem"], steps: int | None = None, guidance: float | None = None,
                       width: int | None = None, height: int | None = None,
                       sampler: Sampler | None = None) -> GenerationResult:
        """Several images (other prompts, identities, seeds; the same size, steps and scheduler) in one batch."""
        if self.base.inpainting:
            raise BadInput(f"{self.base.model_id} is an inpainting model: it repaints a masked photo (`ray-faceid "
                           "inpaint`, /v1/inpaint); generate images with its text-to-image base")
        steps = steps or self.base.default_steps
        guidance = self.base.default_guidance if guidance is None else guidance
        width, height = width or self.base.native_size[0], height or self.base.native_size[1]
        for it in items:
            if len(it.identities) > MAX_IDENTITIES:
                raise BadInput(f"at most {MAX_IDENTITIES} identities per image, got {len(it.identities)}")
        latents, callback = [None] * len(items), self.on_step  # this request's, whatever runs in its pauses
        for batch in self.unet_batches(items):
            denoised = self._denoise([items[k] for k in batch], steps, guidance, width, height, callback=callback,
                                     sampler=sampler)
            for j, k in enumerate(batch):
                latents[k] = denoised[j : j + 1]
        result = GenerationResult([], [], [], [])
        for k, it in enumerate(items):
            image = self.decode(latents[k])
            record = with_identity_start(self.provenance("generate", it.prompt, it.negative_prompt, it.identities,
                                                         it.seed, steps, guidance, width, height, sampler), it)
            result.images.append(image)
            result.png.append(png_with_provenance(image, record))
            result.provenance.append(record)
            result.seeds.append(it.seed)
        return result
