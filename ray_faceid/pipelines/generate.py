"""IdentityPipeline: prompt + identities -> images, and identity inpainting.

Classifier-free guidance runs the unconditional rows with identity scale 0 (no identity), the
conditional rows with each identity's tokens, scale and region. Seeded noise is drawn on the CPU,
so the same seed gives the same image on any device.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ray_faceid.engines.base import DTYPES, UNetCall
from ray_faceid.engines.buckets import MAX_ENGINES, engine_bucket, engine_buckets
from ray_faceid.errors import BadInput, Erased
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.context import identity_kwargs
from ray_faceid.identity.expression import EXPRESSION_DIM, expression_code
from ray_faceid.identity.personal_bank import PersonalBank, PersonalRows
from ray_faceid.identity.personalization import version_of
from ray_faceid.identity.routing import Box, box_masks, strip_boxes
from ray_faceid.identity.tokens import fuse_embeddings
from ray_faceid.pipelines.models import BaseModel
from ray_faceid.pipelines.provenance import png_with_provenance
from ray_faceid.pipelines.schedulers import Sampler
from ray_faceid.pipelines.text_conditioning import TextConditioning, encode_prompts, unet_conditioning

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
    edit_moved: float | None = field(default=None, init=False)
    """Set by the pipeline: how far the edits moved the embedding (L2, the encoder's units)."""


@dataclass
class GenerationItem:
    """One image to make."""

    prompt: str
    identities: list[IdentityCondition]
    negative_prompt: str = ""
    seed: int = 0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    png: list[bytes]
    provenance: list[dict]
    seeds: list[int] = field(default_factory=list)


class IdentityPipeline:
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
        if self.backend != "torch" and adapter is not None and adapter.options.mapper == "instantid":
            raise BadInput(f"InstantID's IdentityNet runs beside the UNet on --backend torch; the {self.backend} "
                           "engines do not take its residuals yet")
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

    @torch.no_grad()
    def identity_tokens(self, identities: list[IdentityCondition]) -> torch.Tensor:
        """(1, M, T, C) tokens of every identity."""
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
            if self.adapter.options.mapper == "multiref":
                t = self.adapter.tokens(self._edited(ident, emb).unsqueeze(0))
            elif self.adapter.published and self.adapter.published.get("per_photo"):  # FaceID-Portrait
                t = self._tokens_per_photo(ident, emb)
            elif self.adapter.options.mapper == "instantid":  # the raw embedding, as its pipeline gives it
                if ident.edits:
                    raise BadInput(f"identity {ident.name}: attribute edits act on a unit embedding; InstantID reads "
                                   "the raw one")
                t = self.adapter.tokens(emb.mean(0, keepdim=True))
            elif self.adapter.options.mapper == "face_plus":
                t = self.adapter.tokens(self._edited(ident, emb, fuse_embeddings(emb)).unsqueeze(0),
                                        image_features=self._image_features(ident, dtype))
            else:
                q = None if ident.quality is None else torch.as_tensor(ident.quality, dtype=dtype, device=self.device)
                expr = code if self.adapter.options.expression_dim == EXPRESSION_DIM else None
                fused = self._edited(ident, emb, fuse_embeddings(emb, q))
                t = self.adapter.tokens(fused.unsqueeze(0), expression=expr)
            if code is not None and self.imr is not None:
                t = self.imr(t, code)
            tokens.append(t)
        if len({t.shape[1] for t in tokens}) > 1:
            raise BadInput("FaceID-Portrait gives tokens per photo: every person in one image needs the same number "
                           f"of photos (got {[t.shape[1] // self.adapter.options.num_tokens for t in tokens]})")
        return torch.stack(tokens, dim=1).to(self.base.unet.dtype)

    def _tokens_per_photo(self, ident: IdentityCondition, references: torch.Tensor) -> torch.Tensor:
        """(1, R*T, C): each reference photo's own tokens, in photo order (FaceID-Portrait's convention)."""
        if self.backend != "torch" and references.shape[0] != 1:
            raise BadInput(f"identity {ident.name}: FaceID-Portrait with {references.shape[0]} photos gives "
                           f"{references.shape[0]} sets of tokens; compiled engines hold one: use --backend torch")
        if ident.edits:
            raise BadInput(f"identity {ident.name}: attribute edits act on one fused embedding; FaceID-Portrait "
                           "reads each photo's own")
        t = self.adapter.tokens(references)
        return t.reshape(1, -1, t.shape[-1])

    def _image_features(self, ident: IdentityCondition, dtype) -> torch.Tensor:
        """(1, S, H): the mean CLIP image features of the identity's reference faces (FaceID-Plus)."""
        if ident.image_features is None:
            raise BadInput(f"identity {ident.name}: {self.adapter.published['variant']} reads the face's CLIP image "
                           "features as well as its embedding: give reference photos and --image-encoder FOLDER "
                           "(`generate`); enrolled people, Serve and render do not run FaceID-Plus yet")
        features = torch.as_tensor(np.asarray(ident.image_features), dtype=dtype, device=self.device)
        want = self.adapter.mapper.feature_dim
        if features.ndim != 3 or features.shape[-1] != want:
            raise BadInput(f"identity {ident.name}: image features of shape {tuple(features.shape)}; the adapter "
                           f"reads R x S x {want} (its CLIP image encoder's hidden states)")
        return features.mean(dim=0, keepdim=True)

    def check_edits(self, name: str, edits: dict) -> None:
        """Edits this pipeline can carry out: a flow is loaded and has every attribute named."""
        from ray_faceid.identity.edits import check_edits

        if self.flow is None:
            raise BadInput(f"identity {name}: attribute edits need an attribute flow (--flow URI on the command "
                           "line, flow: in the Serve config); train one with `ray-faceid train --method flow`")
        check_edits(edits, self.flow.attributes)

    def _edited(self, ident: IdentityCondition, references: torch.Tensor, fused: torch.Tensor | None = None):
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
            raise BadInput(f"width and height must be positive multiples of {step} for this model, got {width}x{height}")

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
        """Tokens of a zero embedding for each identity: the unconditional rows of adapters whose
        reference pipeline guides against them."""
        dtype = next(self.adapter.parameters()).dtype
        empty = torch.zeros(1, self.adapter.encoder_spec.dim, dtype=dtype, device=self.device)
        if self.adapter.options.mapper == "face_plus":  # and the features of a zero image, as its pipeline does
            if self.adapter.image_encoder is None:
                raise BadInput("FaceID-Plus guides against its CLIP image encoder's features of an empty image: give "
                               "--image-encoder FOLDER")
            negative = self.adapter.image_encoder.negative().to(self.device, dtype)
            zero = self.adapter.tokens(empty, image_features=negative)
        else:
            zero = self.adapter.tokens(empty)
        zero = zero.repeat(1, like.shape[2] // zero.shape[1], 1)  # FaceID-Portrait: one set per photo
        return zero[:, None].expand(like.shape[0], like.shape[1], -1, -1).to(like.dtype)

    @staticmethod
    def personal_of(item: "GenerationItem") -> tuple[str, dict] | None:
        """The own adapter an image runs with: that of its single identity, if it has one."""
        return item.identities[0].personal if len(item.identities) == 1 else None

    @property
    def per_row_weights(self) -> bool:
        """Whether one UNet batch may mix people's own adapters (the torch engines read them per row;
        ONNX Runtime and TensorRT engines hold one set of weights)."""
        return self.backend in ("torch", "torch.compile")

    def unet_batches(self, items: list["GenerationItem"]) -> list[list[int]]:
        """Indices of the items that share one UNet batch, in order: at most the bank's slots of
        people with their own adapter per batch (torch engines), or one adapter per batch (others)."""
        if self.adapter is None:  # no identity, no adapters of their own
            return [list(range(len(items)))]
        batches: list[list[int]] = []
        people: list[set] = []
        for k, item in enumerate(items):
            own = self.personal_of(item)
            key = own[0] if own else None  # the version: a content hash of the person's weights
            for batch, held in zip(batches, people):
                fits = (key in held or key is None or len(held - {None}) < self.personal_bank.slots
                        if self.per_row_weights else held == {key})
                if fits:
                    batch.append(k)
                    held.add(key)
                    break
            else:
                batches.append([k])
                people.append({key})
        return batches

    @torch.no_grad()
    def _denoise(self, items: list["GenerationItem"], steps, guidance, width, height, inpaint=None, callback=None,
                 sampler: Sampler | None = None):
        """Latents of every item, all denoised together: one UNet call per step for the whole batch.
        `callback`: the request's own step callback, read from `on_step` once when the request
        started (its caller's), never again: another job may run on this pipeline inside it (a
        large job pausing for small ones, deployments/turns.py) and set its own. `sampler`: the
        request's scheduler (default: the base's own)."""
        # A scheduler of its own per denoise (schedulers keep state between steps), and each row's
        # own adapter as an input of every UNet call: nothing a job inside the pause changes is read here.
        sampler = sampler or Sampler()
        base, sched = self.base, sampler.build(self.base.scheduler)
        own = [self.personal_of(it) if self.adapter is not None else None for it in items]
        row_personal = [None] * len(items) + own  # CFG: unconditional rows first
        self._check_size(width, height)
        most = sched.config.num_train_timesteps
        if not 1 <= steps <= most:
            raise BadInput(f"steps must be between 1 and {most} (the base model's scheduler has {most} timesteps), "
                           f"got {steps}")
        f = base.vae_scale_factor
        h, w = height // f, width // f
        negative = self.encode_prompt([it.negative_prompt or "" for it in items], zero_empty=True)
        text = TextConditioning.cat([negative, self.encode_prompt([it.prompt for it in items])])
        kwargs = self._identity_kwargs(items, h, w)
        control = self._identitynet_inputs(items, kwargs, width, height)
        # One generator per image, on the CPU: its initial noise, then (stochastic schedulers: ancestral,
        # SDE, LCM, TCD) each step's noise, drawn in diffusers' order: an image is the same alone or batched.
        generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
        noise = torch.cat([torch.randn((1, 4, h, w), generator=g) for g in generators]).to(self.device)
        step_kwargs = sampler.step_settings(sched)
        if "generator" in inspect.signature(sched.step).parameters:
            step_kwargs["generator"] = generators
        with sampler.refusing_bad_settings(type(sched)):
            sched.set_timesteps(steps, device=self.device)
        latents = noise * sched.init_noise_sigma
        if inpaint is not None:
            # (image latents, latent-size mask for blending, 9-channel conditioning: see inpaint.py)
            image_latents, mask_l, conditioning = inpaint
        if callback is not None:
            callback(0, len(sched.timesteps))  # the clock starts here, not after the first step
        for step, t in enumerate(sched.timesteps, 1):
            model_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            if inpaint is not None and base.inpainting:
                mask_c, masked_c = conditioning
                model_in = torch.cat([model_in, torch.cat([mask_c] * 2), torch.cat([masked_c] * 2)], dim=1)
            pred = self._unet(model_in, t, text, kwargs, h, w, row_personal, control)
            uncond, cond = pred.chunk(2)
            # Guidance at most 1 (few-step models): the prompt's prediction alone, as diffusers takes it.
            guided = cond if guidance <= 1 else uncond + guidance * (cond - uncond)
            latents = sched.step(guided, t, latents, **step_kwargs).prev_sample
            if inpaint is not None and not base.inpainting:
                # Blended latent diffusion: outside the mask, the input noised to the next scheduled
                # timestep (any spacing: trailing schedules never reach 0), clean after the last.
                after = sched.timesteps[step : step + 1]
                known = sched.add_noise(image_latents, noise, after) if len(after) else image_latents
                latents = mask_l * latents + (1 - mask_l) * known
            if callback is not None:
                callback(step, len(sched.timesteps))
        return latents

    def _identitynet_inputs(self, items: list["GenerationItem"], kwargs: dict, width: int, height: int):
        """InstantID: (tokens, keypoint images) IdentityNet reads for the 2B rows (the unconditional
        rows the zero embedding's tokens, as in the attention); None for other adapters."""
        if not kwargs or self.adapter.options.mapper != "instantid":
            return None
        if self.adapter.identitynet is None:
            raise BadInput("InstantID needs its IdentityNet: give --identitynet FOLDER (ControlNetModel/ of "
                           "InstantX/InstantID)")
        if any(len(it.identities) != 1 for it in items):
            raise BadInput("InstantID's IdentityNet reads one face's tokens and keypoints: one person per image")
        from ray_faceid.identity.instantid import frontal_points, keypoint_image

        images = []
        for it in items:
            pose = it.identities[0].pose
            points = frontal_points(width, height) if pose is None else np.asarray(pose) * [width, height]
            images.append(np.asarray(keypoint_image(points, width, height), np.float32) / 255)
        image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        return kwargs["identity_tokens"][:, 0], torch.cat([image, image])

    def _unet(self, sample, t, text, kwargs, h, w, row_personal, control=None):
        """One UNet call in the UNet's dtype (fp16 / bf16 on GPU); the prediction comes back in fp32,
        where the scheduler keeps the latents. `control`: InstantID's IdentityNet inputs."""
        sample, text = sample.to(self.base.unet.dtype), text.to(self.base.unet.dtype)
        return self._unet_call(sample, t, text, kwargs, h, w, row_personal, control).float()

    def _text_inputs(self, text: TextConditioning, h: int, w: int) -> dict:
        f = self.base.vae_scale_factor
        return unet_conditioning(self.base, text, w * f, h * f)

    def _unet_call(self, sample, t, text, kwargs, h, w, row_personal, control=None):
        """Eager torch, or the configured engine with identity as its inputs. Each row's own adapter
        (`row_personal`: (version, delta) or None) is placed in the bank at every call: a job that
        ran in between may have loaded others."""
        personal_rows = self.personal_bank.rows(row_personal) if kwargs and any(row_personal) else None
        if self.backend == "torch":
            if personal_rows is not None:
                kwargs = dict(kwargs, personal=PersonalRows(self.personal_bank, personal_rows))
            inputs = self._text_inputs(text, h, w)
            if control is not None:  # InstantID: IdentityNet's residuals, from the tokens and the keypoints
                down, mid = self.adapter.identitynet.residuals(sample, t, *control, inputs.get("added_cond_kwargs"))
                inputs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            return self.base.unet(sample, t, **inputs, cross_attention_kwargs=kwargs or None).sample
        rows, opts = sample.shape[0], self.adapter.options
        if kwargs:
            tokens, scale, region = kwargs["identity_tokens"], kwargs["identity_scale"], kwargs["region_masks"]
        else:  # no identity: one zero identity at scale 0 is exactly the stock layer
            tokens = torch.zeros(rows, 1, opts.num_tokens, self.base.cross_attention_dim, device=self.device,
                                 dtype=sample.dtype)
            scale, region = torch.zeros(rows, 1, device=self.device, dtype=sample.dtype), None
        if region is None:
            region = torch.ones(rows, tokens.shape[1], h, w, device=self.device, dtype=sample.dtype)
        added = {}
        if self.base.family == "sdxl":  # the added conditioning: live inputs like the rest
            cond = self._text_inputs(text, h, w)["added_cond_kwargs"]
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        text = text.hidden
        if self.backend == "torch.compile":
            # One engine for every shape: a compiled graph per bucket; the bank slots are an input.
            out = self.compiled_engine()(sample, t, text, tokens, scale, region, personal_rows, **added,
                                         compile_new=self.compile_new_shapes)
            if out is not None:
                return out
            # An unwarmed shape runs eager: the very function the engine compiles, uncompiled.
            return UNetCall(self.base.unet, self.personal_bank)(sample, t, text, tokens, scale, region,
                                                                 personal_rows=personal_rows, **added)
        versions = {p[0]: p for p in row_personal if p}
        if len(versions) > 1:
            raise BadInput("images generated together on this backend must use the same person's own adapter")
        engine = self._engine(rows, tokens.shape[1], h, w, text.shape[1], next(iter(versions.values()), None))
        return engine(sample, t, text, tokens, scale, region, **added)

    def _engine(self, rows: int, identities: int, h: int, w: int, text_length: int, personal: tuple | None):
        """An ONNX Runtime or TensorRT engine holding the shared weights plus `personal` (version,
        delta). Engines are kept per set of weights, never refitted while in use: a job paused
        between its steps (turns.py) comes back to the weights it started with."""
        from ray_faceid.engines.base import EngineShape
        from ray_faceid.engines.select import processor_weights_by_onnx_name, unet_engine

        top = engine_bucket(self.backend, rows)
        version, delta = personal or (None, None)
        if version in self._refused:
            raise Erased("this person was erased: their own adapter is not served any more")
        key = (h, w, identities, top, version)
        with self._engines_lock:  # the erasure sweep may drop engines from another thread
            found = self.engines.pop(key, None)
        if found is not None:
            engine = found
        else:
            # One engine per bucket whatever the first call's rows (its key, and the file `compile`
            # builds ahead): tuned for one image with guidance, the most common call.
            shape = EngineShape(batch=(1, 2, top), latent=(h, w), identities=identities,
                                tokens=self.adapter.options.num_tokens, text_length=text_length,
                                channels=self.base.unet.config.in_channels, cross_dim=self.base.cross_attention_dim,
                                pooled_dim=self.base.pooled_dim)
            engine = unet_engine(self.base, self.adapter, shape, self.backend, self.precision, self.engine_cache)
            if delta:
                engine.refit(processor_weights_by_onnx_name(self.adapter, delta))  # a new engine: no one uses it yet
        with self._engines_lock:
            self.engines[key] = engine
            while len(self.engines) > MAX_ENGINES:  # least recently used first
                self.engines.pop(next(iter(self.engines)))
        return engine

    def forget_personal(self, version: str) -> None:
        """Drop every copy of an erased person's own adapter this pipeline holds (bank slot, engines)
        and refuse it from now on (a request of theirs still running fails, typed, at its next step)."""
        self._refused.add(version)
        if self.personal_bank is not None:
            self.personal_bank.evict(version, forever=True)
        with self._engines_lock:
            for key in [k for k in self.engines if k[-1] == version]:
                self.engines.pop(key)

    def compiled_engine(self):
        if self._compiled is None:
            from ray_faceid.engines.compiled_engine import CompiledUNetEngine

            self._compiled = CompiledUNetEngine(self.base.unet, bank=self.personal_bank)
        return self._compiled

    def engine_shape(self, width: int, height: int, identities: int, max_images: int):
        """The EngineShape of this pipeline's UNet calls at one size: CFG doubles the rows."""
        from ray_faceid.engines.base import EngineShape

        self._check_size(width, height)
        f = self.base.vae_scale_factor
        return EngineShape(batch=(2, 2, 2 * max_images), latent=(height // f, width // f), identities=identities,
                           tokens=self.adapter.options.num_tokens, text_length=self.base.tokenizer.model_max_length,
                           channels=self.base.unet.config.in_channels, cross_dim=self.base.cross_attention_dim,
                           pooled_dim=self.base.pooled_dim)

    @property
    def precision(self) -> str:
        """The UNet's precision name (fp32, fp16, bf16)."""
        return next(name for name, dtype in DTYPES.items() if dtype == self.base.unet.dtype)

    def warm_up(self, sizes: list[tuple[int, int]], identities: list[int], max_images: int) -> dict:
        """Build every engine (size, identity count, batch bucket) the pipeline will run, from the
        engine cache where it is there and into it where not: the one builder behind `compile`, a
        Serve replica's start (render actors build the same keys as their rows need them).
        torch.compile: Inductor's artifacts; ONNX Runtime: one graph per size and identity count;
        TensorRT: a plan per batch bucket (engines/buckets.py, the keys requests look up); torch: none."""
        if self.backend == "torch.compile":
            return self.warm_up_shapes([self.engine_shape(w, h, m, max_images) for w, h in sizes for m in identities])
        if self.backend == "torch":
            return {"buckets": 0, "loaded": 0, "stored": 0}
        f, built = self.base.vae_scale_factor, 0
        for width, height in sizes:
            self._check_size(width, height)
            for count in identities:
                for top in engine_buckets(self.backend, 2 * max_images):  # CFG doubles every image
                    self._engine(top, count, height // f, width // f, self.base.tokenizer.model_max_length, None)
                    built += 1
        return {"buckets": built, "loaded": None, "stored": None}

    def warm_up_shapes(self, shapes: list) -> dict:
        """warm_up for explicit EngineShapes (torch.compile backend)."""
        from ray_faceid.engines.cache import EngineCache
        from ray_faceid.engines.compile_artifacts import compiled_key, warm_up_cached
        from ray_faceid.engines.select import adapter_structure

        structure, model_hash, engine = adapter_structure(self.adapter), self.base.model_hash(), self.compiled_engine()
        keys = [compiled_key(model_hash, structure, shape, self.precision, self.device, engine.compiler)
                for shape in shapes]
        return warm_up_cached(engine, shapes, keys, self.engine_cache or EngineCache())

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
                 seed: int = 0, steps: int | None = None, guidance: float = 5.0, width: int | None = None,
                 height: int | None = None, num_images: int = 1, sampler: Sampler | None = None) -> GenerationResult:
        """Steps and size default to the base model's own (BaseModel.default_steps, native_size), the
        scheduler to the base's own (`sampler`: another, schedulers.py)."""
        items = [GenerationItem(prompt, identities or [], negative_prompt, seed + k) for k in range(num_images)]
        return self.generate_items(items, steps, guidance, width, height, sampler)

    def generate_items(self, items: list["GenerationItem"], steps: int | None = None, guidance: float = 5.0,
                       width: int | None = None, height: int | None = None,
                       sampler: Sampler | None = None) -> GenerationResult:
        """Several images (other prompts, identities, seeds; the same size, steps and scheduler) in one batch."""
        if self.base.inpainting:
            raise BadInput(f"{self.base.model_id} is an inpainting model: it repaints a masked photo (`ray-faceid "
                           "inpaint`, /v1/inpaint); generate images with its text-to-image base")
        steps = steps or self.base.default_steps
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
            record = self.provenance("generate", it.prompt, it.negative_prompt, it.identities, it.seed, steps,
                                     guidance, width, height, sampler)
            result.images.append(image)
            result.png.append(png_with_provenance(image, record))
            result.provenance.append(record)
            result.seeds.append(it.seed)
        return result
