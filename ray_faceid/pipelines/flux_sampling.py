"""Text-to-image on a FLUX base (flux.py), as diffusers' FluxPipeline samples with its defaults: the
prompt through CLIP (pooled) and T5 (512 tokens), seeded noise drawn on the CPU per image and packed
in 2x2 patches, the flow-matching Euler schedule (sigmas 1 to 1/steps, shifted by the image's token
count where the scheduler says so), dev's guidance as an input of the transformer, no unconditional
pass. Each call builds its own scheduler: nothing another request changes is read here.

With a FLUX IP-Adapter (identity/flux_adapter.py) each person's reference embedding becomes identity
tokens the dual-stream blocks attend to, each person within their region of the packed patches."""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from ray_faceid.engines.buckets import BATCH_BUCKETS, batch_bucket
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.flux import MAX_SEQUENCE_LENGTH, FluxBase, check_flux_size
from ray_faceid.pipelines.generate import (
    DTYPES,
    GenerationItem,
    GenerationResult,
    check_identity_start,
    identity_active,
    with_identity_start,
)
from ray_faceid.pipelines.provenance import png_with_provenance

log = logging.getLogger(__name__)
GRAPHS_KEPT = 2  # onnxruntime: image sizes whose sessions a generator keeps loaded


def resolve_flux_precision(precision: str, device: torch.device, backend: str = "torch") -> str:
    """`auto`: bf16 on CUDA (FLUX's own dtype: its activations overflow fp16), fp32 on the CPU and on
    backend onnxruntime (its graphs are fp32)."""
    if backend == "onnxruntime":
        if precision not in ("auto", "fp32"):
            raise BadInput(f"backend onnxruntime runs FLUX's transformer in fp32: precision {precision} is for torch "
                           "or torch.compile")
        return "fp32"
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise BadInput(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    return precision


FLUX_BACKENDS = ("torch", "torch.compile", "onnxruntime")


def resolve_flux_backend(backend: str, device: torch.device) -> str:
    """`auto`: torch.compile on CUDA, eager elsewhere; onnxruntime where asked (the transformer's ONNX
    graph, engines/flux_onnx.py); FLUX has no TensorRT engine yet."""
    if backend == "auto":
        return "torch.compile" if device.type == "cuda" else "torch"
    if backend not in FLUX_BACKENDS:
        raise BadInput(f"backend {backend}: not built for FLUX yet; FLUX runs on torch, torch.compile or onnxruntime")
    if backend == "onnxruntime":
        from ray_faceid.engines.select import require_backend

        require_backend(backend)
    return backend


def fill_gray(mask: np.ndarray) -> np.ndarray:
    """The mask's grey levels as FLUX.1 Fill reads them (its hole: 0.5 or over, as diffusers
    binarises it); a mask with no hole is refused (`inpaint` checks it before any model loads too)."""
    gray = mask if mask.ndim == 2 else np.asarray(Image.fromarray(mask[..., :3]).convert("L"))
    if not (gray / 255.0 >= 0.5).any():
        raise BadInput("mask is empty: paint the region to repaint in white")
    return gray


def check_true_cfg(true_cfg: float, negative_prompt: bool, step_cache: float,
                   names: tuple[str, str, str] = ("--negative-prompt", "--true-cfg", "--step-cache")) -> None:
    """A negative prompt on FLUX works through true CFG only, and true CFG needs one (diffusers'
    FluxPipeline runs none without it); the step cache reads one transformer pass a step, not two.
    `names`: the negative prompt's, true CFG's and the step cache's names where they were given."""
    negative, cfg, cache = names
    if not 1 <= true_cfg <= 30:
        raise BadInput(f"{cfg} {true_cfg}: from 1 (off) to 30")
    if negative_prompt and true_cfg <= 1:
        raise BadInput(f"a negative prompt on FLUX works through true CFG (FLUX.1 is guidance-distilled): give "
                       f"{cfg} S over 1 (each step runs the transformer twice), or leave {negative} out")
    if true_cfg > 1 and not negative_prompt:
        raise BadInput(f"{cfg} guides the image away from {negative}: give one (each step then runs the transformer "
                       "twice)")
    if true_cfg > 1 and step_cache:
        raise BadInput(f"{cfg} and {cache}: not both (the step cache compares one transformer pass a step; true CFG "
                       "runs two)")


def check_step_cache(threshold: float, backend: str) -> None:
    """A step cache threshold (pipelines/flux_step_cache.py) this backend runs, or BadInput."""
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise BadInput(f"step_cache is a threshold between 0 (off) and 1, not {threshold!r} (0.1 is a common one)")
    if threshold and backend == "onnxruntime":
        raise BadInput("a step cache runs on backend torch or torch.compile, not on FLUX's ONNX graph")


def flow_shift(image_tokens: int, config) -> float:
    """mu of the schedule's shift: linear in the image's token count, from base_shift at
    base_image_seq_len tokens to max_shift at max_image_seq_len (FLUX.1's 0.5 at 256, 1.15 at 4,096)."""
    low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (high - low)
    return image_tokens * slope + base_shift - slope * low


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch one token, row by row."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h x w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def patch_positions(h: int, w: int) -> torch.Tensor:
    """(h/2 * w/2, 3) rotary positions of the patches: 0, row, column."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


# FLUX.1 makes images up to about 2 megapixels; a larger photo (a camera's 12 MP) is repainted reduced.
MAX_FILL_PIXELS = 2 * 1024 * 1024


def repaint_size(width: int, height: int, max_pixels: int = MAX_FILL_PIXELS) -> tuple[int, int]:
    """The size FLUX.1 Fill repaints a photo at: its own, or reduced to `max_pixels`."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    return (max(1, int(width * scale)), max(1, int(height * scale))) if scale < 1 else (width, height)


@torch.no_grad()
def encode_prompts(base: FluxBase, prompts: list[str], text_device, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 states (B, 512, D), CLIP pooled (B, P)) of each prompt, as FluxPipeline encodes them: the
    text encoders run on `text_device`, the states go to `device` (the generator's, training's)."""
    clip = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    pooled = base.text_encoder(clip.to(text_device), output_hidden_states=False).pooler_output
    t5 = base.tokenizer_2(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                          return_tensors="pt").input_ids
    states = base.text_encoder_2(t5.to(text_device), output_hidden_states=False)[0]
    return states.to(device, base.text_encoder_2.dtype), pooled.to(device, base.text_encoder.dtype)


class FluxGenerator:
    def __init__(self, base: FluxBase, adapter=None, device: str | torch.device = "cpu", precision: str = "auto",
                 backend: str = "torch", text_encoders: str = "same", transformer_weights: str = "same",
                 engine_cache=None, step_cache: float = 0.0, cuda_graphs: bool | None = None):
        """`adapter`: a FluxIdentityAdapter (identity/flux_adapter.py), installed on the transformer once.
        `backend` torch.compile: the transformer compiled once per size and batch bucket
        (RAY_FACEID_TORCH_COMPILE_BACKEND, else Inductor): a batch is padded up to its bucket
        (engines/buckets.py) and every call takes the identity inputs of MAX_IDENTITIES people and their
        patches, so another person, person count, region or strength compiles nothing anew. `engine_cache`:
        where warm_up finds Inductor's artifacts (`ray-faceid compile`) and stores them (default
        $RAY_FACEID_CACHE/engines). `step_cache`: the first-block change under which a step reuses the
        other blocks' residual (pipelines/flux_step_cache.py); 0: off, every block at every step.
        `cuda_graphs` (None: on for torch.compile on CUDA): each compiled shape replayed from a CUDA
        graph (engines/flux_cuda_graphs.py); not with the step cache, whose two parts run compiled."""
        from ray_faceid.pipelines import flux_memory

        self.base, self.adapter, self.device = base, adapter, torch.device(device)
        self.backend = backend = resolve_flux_backend(backend, self.device)
        check_step_cache(step_cache, backend)
        self.step_cache = float(step_cache)
        flux_memory.check_settings(text_encoders, transformer_weights, self.device, backend)
        self.precision = resolve_flux_precision(precision, self.device, backend)
        self.text_encoders, self.transformer_weights = text_encoders, transformer_weights
        # text_encoders cpu: T5 and CLIP encode on the CPU (memory planned in flux_memory.py).
        self.text_device = torch.device("cpu") if text_encoders == "cpu" else self.device
        # Every module in the precision (a bf16 folder's text encoders load in bf16 even where the rest is
        # fp32); one already in it is not cast again (diffusers warns at every cast).
        cast = DTYPES[self.precision]
        for name, module in base.modules.items():
            target = self.text_device if name.startswith("text_encoder") else self.device
            narrow = module.dtype != cast
            if name == "transformer" and transformer_weights in flux_memory.FP8_STORED:
                # Narrowed where it was loaded, then moved: the GPU never holds the wide weights, and a
                # cast after it would widen the float8 buffers again.
                if narrow:
                    module.to(dtype=cast)
                flux_memory.store_fp8(module, matmul=transformer_weights == "fp8_matmul")
                module.to(target)
            else:
                module.to(device=target, dtype=cast) if narrow else module.to(target)
        self.adapter_hash = None
        self.image_encoder_hash = None
        """The CLIP image encoder's weights hash where people's embeddings came from photos through it."""
        self.personal_bank = None
        """People's own adapters (`ray-faceid personalize` on ours) as per-row, per-person weights."""
        if adapter is not None:
            from ray_faceid.identity.flux_training import base_refusal

            refusal = base_refusal(adapter.trained, base)  # ours: the base it was trained on, as on the UNet
            if refusal:
                from ray_faceid.errors import BaseModelMismatch

                raise BaseModelMismatch(refusal)
            self.adapter_hash = adapter.content_hash()  # of the weights as loaded, before any cast
            adapter.to(self.device, cast)
            if adapter.trained:  # after the cast: the bank takes the adapter's dtype
                from ray_faceid.identity.personal_bank import PersonalBank

                self.personal_bank = PersonalBank(adapter)
            adapter.install(base.transformer, self.personal_bank)
        self.denoiser, self.engine_cache, self.compiler = base.transformer, engine_cache, None
        self.fill_sizes: set[tuple[int, int]] = set()  # photo sizes Fill has compiled (it warms none ahead)
        # One graph for any people (compiled or exported): every identity input always there, one shape.
        self.fixed_inputs = backend in ("torch.compile", "onnxruntime")
        # onnxruntime: the transformer's graph per latent size, the GRAPHS_KEPT last used (each session holds
        # the whole transformer; an evicted one comes back from the engine cache, not a new export).
        self.graphs: OrderedDict[tuple[int, int], object] = OrderedDict()
        if backend == "torch.compile":
            from ray_faceid.engines.compiled_engine import allow_shape_compiles
            from ray_faceid.envs import torch_compile_backend

            allow_shape_compiles()  # sizes x batch buckets: past Dynamo's 8 graphs it would run eager, silently
            self.compiler = torch_compile_backend()
            self.denoiser = torch.compile(base.transformer, backend=self.compiler, dynamic=False)
            if self.device.type == "cuda" if cuda_graphs is None else cuda_graphs:
                from ray_faceid.engines.flux_cuda_graphs import GraphedTransformer

                self.denoiser = GraphedTransformer(self.denoiser, capture=self.device.type == "cuda")
        self.stages = None  # the step cache's two parts of the transformer (each compiled on torch.compile)
        if self.step_cache:
            from ray_faceid.pipelines.flux_step_cache import FluxStages

            self.stages = FluxStages(base.transformer)
            self.head, self.tail = self.stages.head, self.stages.tail
            if backend == "torch.compile":
                self.head, self.tail = (torch.compile(part, backend=self.compiler, dynamic=False)
                                        for part in (self.head, self.tail))
        self.on_step = None  # callback(step, total): 0 before denoising, then after each step (progress bars)

    @torch.no_grad()
    def _person_tokens(self, person) -> torch.Tensor:
        """(T, C) tokens of one person, as the adapter reads them, checked."""
        if not (np.isfinite(person.scale) and 0 <= person.scale <= 4):
            raise BadInput(f"identity {person.name}: strength must be between 0 and 4, got {person.scale}")
        return self.adapter.person_tokens(person.embeddings, person.name, self.device, person.quality)

    @torch.no_grad()
    def identity_inputs(self, rows: list[list], h: int, w: int) -> dict:
        """The transformer's identity inputs for a batch whose image k has the people `rows[k]`: each
        one's tokens, strength, and the patches they own. Rows of fewer people are padded with
        people of strength 0, who add nothing: rows of any people share one batch."""
        fixed = self.fixed_inputs
        if not any(rows) and not (fixed and self.adapter is not None):
            return {}
        if self.adapter is None:
            raise BadInput(f"{self.base.model_id}: identity on FLUX reads a FLUX IP-Adapter or PuLID-FLUX: give "
                           "--adapter FILE (the XLabs FLUX IP-Adapter layout, or PuLID-FLUX's file)")
        from ray_faceid.identity.flux_adapter import patch_owner
        from ray_faceid.identity.routing import strip_boxes
        from ray_faceid.pipelines.generate import MAX_IDENTITIES

        most = max(len(people) for people in rows)
        if most > MAX_IDENTITIES:
            raise BadInput(f"at most {MAX_IDENTITIES} identities per image, got {most}")
        slots = MAX_IDENTITIES if fixed else most
        adapter = self.adapter
        tokens = torch.zeros(len(rows), slots, adapter.tokens_per_person, adapter.width, device=self.device,
                             dtype=adapter.dtype)
        scale = torch.zeros(len(rows), slots, device=self.device)
        # One person without a region takes the whole image (no routing); several, or one with a region,
        # their region: a person without one takes their strip of M equal vertical ones (as on the UNet
        # families).
        routed = fixed or any(len(people) > 1 or (people and people[0].region is not None) for people in rows)
        owner = torch.zeros(len(rows), (h // 2) * (w // 2), slots, dtype=torch.bool) if routed else None
        for k, people in enumerate(rows):
            for m, person in enumerate(people):
                tokens[k, m] = self._person_tokens(person)
                scale[k, m] = person.scale
            if owner is None or not people:
                continue
            if len(people) == 1 and people[0].region is None:
                owner[k, :, 0] = True
                continue
            defaults = strip_boxes(len(people))
            boxes = [p.region or defaults[i] for i, p in enumerate(people)]
            owner[k, :, : len(people)] = patch_owner(boxes, h, w, 1)[0]
        return {"identity_tokens": tokens, "identity_scale": scale,
                "patch_owner": None if owner is None else owner.to(self.device)}

    def check_people(self, identities: list) -> None:
        """One image's people as the batch will read them (embeddings, strengths, regions, count, their
        own adapters): checked per request or row before a batch runs, so one's bad people fail it alone."""
        self.identity_inputs([identities], 2, 2)
        own = self._versions(identities)
        if self.personal_bank is not None and len(own) > self.personal_bank.slots:
            raise BadInput(f"{len(own)} people with their own adapter in one image; this generator holds "
                           f"{self.personal_bank.slots} at a time (each person's projections are about "
                           f"{self.personal_bank.person_bytes / 2**30:.1f} GB): fewer people, or some without theirs")

    @staticmethod
    def _versions(identities: list) -> set:
        return {p.personal[0] for p in identities if p.personal}

    def _bank_chunks(self, items: list) -> list[list]:
        """Items in runs whose people's own adapters fit the bank together (one run without a bank)."""
        if self.personal_bank is None:
            return [items]
        chunks, held = [[]], set()
        for item in items:
            own = self._versions(item.identities)
            if chunks[-1] and len(held | own) > self.personal_bank.slots:
                chunks.append([])
                held = set()
            chunks[-1].append(item)
            held |= own
        return chunks

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states (B, 512, D), CLIP pooled (B, P)) of each prompt."""
        return encode_prompts(self.base, prompts, self.text_device, self.device)

    def check(self, steps: int, guidance: float | None, width: int, height: int, inpainting: bool = False) -> None:
        base = self.base
        if base.inpainting != inpainting:
            raise BadInput(f"{base.model_id} is FLUX.1 Fill, an inpainting model: it repaints a masked photo "
                           "(`ray-faceid inpaint`); generate images with FLUX.1 dev or schnell" if base.inpainting else
                           f"{base.model_id} is FLUX.1 {base.variant}: repainting a masked photo needs FLUX.1 Fill")
        if not 1 <= steps <= 200:
            raise BadInput(f"steps must be between 1 and 200, got {steps}")
        if guidance and not base.guidance_embedded:  # 0 is none, as diffusers' schnell examples pass it
            raise BadInput(f"{base.model_id} is FLUX.1 schnell, which takes no guidance: leave --guidance out")
        if guidance is not None and not 0 <= guidance <= 30:
            raise BadInput(f"guidance must be between 0 and 30, got {guidance}")
        check_flux_size(width, height, base.size_multiple)

    def _defaults(self, steps, guidance, width, height):
        base = self.base
        if not base.guidance_embedded and guidance == 0:
            guidance = None  # schnell's "no guidance" (check refuses any other value)
        return (steps or base.default_steps, base.default_guidance if guidance is None else guidance,
                width or base.native_size[0], height or base.native_size[1])

    @torch.no_grad()
    def generate(self, prompt: str, identities: list | None = None, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None,
                 num_images: int = 1, identity_start: int = 0, negative_prompt: str = "",
                 true_cfg: float = 1.0) -> GenerationResult:
        """`num_images` of the prompt with `identities` (IdentityCondition: embeddings, scale, region),
        seeds `seed`, `seed + 1`, ...; steps, guidance and size default to the base's own (flux.py);
        `identity_start`: the step their identity starts at (GenerationItem); `true_cfg` over 1: true
        classifier-free guidance away from `negative_prompt` (generate_items)."""
        items = [GenerationItem(prompt, identities or [], negative_prompt, seed + k, identity_start)
                 for k in range(num_images)]
        return self.generate_items(items, steps, guidance, width, height, None, true_cfg)

    @torch.no_grad()
    def generate_items(self, items: list, steps: int | None = None, guidance: float | None = None,
                       width: int | None = None, height: int | None = None, sampler=None,
                       true_cfg: float = 1.0) -> GenerationResult:
        """One image per GenerationItem (its prompt, people and seed), denoised in one batch: requests
        and catalog rows of different people and prompts share the transformer's calls. Each image is
        the one `generate` makes of its item alone. `true_cfg` over 1: each step also runs the
        transformer on the items' negative prompts and moves away from them, as diffusers'
        FluxPipeline(true_cfg_scale=, negative_prompt=) does (twice the transformer's work)."""
        if not items:
            return GenerationResult([], [], [], [])
        asked = sampler is not None and (sampler.name or sampler.overrides)  # None or the base's own: taken
        if asked:
            raise BadInput("a sampler: not built for FLUX yet (FLUX.1 is guidance-distilled; its sampler is its own "
                           "flow-matching Euler)")
        check_true_cfg(true_cfg, any(item.negative_prompt for item in items), self.step_cache)
        steps, guidance, width, height = self._defaults(steps, guidance, width, height)
        self.check(steps, guidance, width, height)
        # This call's progress and cancellation, read once: while it pauses between steps another request
        # may run and set on_step for itself (deployments/turns.py).
        callback = self.on_step
        for item in items:
            self.check_people(item.identities)
        check_identity_start(items, steps)
        runs = self._bank_chunks(items)  # people's own adapters: as many as the bank holds at a time
        if len(runs) == 1 and (self.backend != "torch.compile" or len(items) <= BATCH_BUCKETS[-1]):
            return self._generate_batch(items, steps, guidance, width, height, callback, true_cfg)
        largest = BATCH_BUCKETS[-1] if self.backend == "torch.compile" else max(len(items), 1)
        parts = [self._generate_batch(run[i : i + largest], steps, guidance, width, height, callback, true_cfg)
                 for run in runs for i in range(0, len(run), largest)]  # the largest bucket at a time
        return GenerationResult(*(sum((getattr(p, field) for p in parts), []) for field in
                                  ("images", "png", "provenance", "seeds")))

    def _generate_batch(self, items: list, steps: int, guidance: float | None, width: int, height: int,
                        callback, true_cfg: float = 1.0) -> GenerationResult:
        compiled = self.backend == "torch.compile"
        # Compiled: padded up to the batch bucket with copies of the last image, made and dropped.
        padded = items + [items[-1]] * (batch_bucket(len(items)) - len(items)) if compiled else items
        f = self.base.vae_scale_factor
        h, w = height // f, width // f
        # One generator per image, on the CPU (as diffusers draws a list of generators): an image is the
        # same alone or batched.
        noise = torch.cat([torch.randn((1, self.base.latent_channels, h, w),
                                       generator=torch.Generator("cpu").manual_seed(item.seed)) for item in padded])
        rows = [item.identities for item in padded]
        latents, reused = self._denoise([item.prompt for item in padded], rows, pack(noise.to(self.device)), None,
                                        steps, guidance, h, w, callback, starts=[item.identity_start for item in padded],
                                        negatives=[item.negative_prompt for item in padded], true_cfg=true_cfg)
        result = self._result(items, latents, steps, guidance, width, height, reused=reused)
        if true_cfg > 1:  # what made the image: the guidance away from its negative prompt
            for item, record in zip(items, result.provenance):
                record.update(negative_prompt=item.negative_prompt, true_cfg=true_cfg,
                              true_cfg_from_step=self.true_cfg_from)
            result.png = [png_with_provenance(image, record) for image, record in zip(result.images, result.provenance)]
        return result

    def warm_up(self, sizes: list[tuple[int, int]], most_images: int) -> dict:
        """torch.compile: every (size, batch bucket) a call of up to `most_images` images can take,
        compiled now (a Serve replica, before it is ready; `ray-faceid compile`, ahead), from
        Inductor's artifacts in the engine cache where they are there and into it where not; eager:
        nothing to do. Returns {"loaded", "stored", "buckets"}."""
        from ray_faceid.engines.cache import EngineCache
        from ray_faceid.engines.compile_artifacts import warm_up_cached

        if self.backend not in ("torch.compile", "onnxruntime"):
            return {"buckets": 0, "note": "FLUX eager: nothing compiled"}
        if self.base.inpainting:
            return {"buckets": 0, "note": "FLUX.1 Fill: each photo size compiles at its first request"}
        if self.backend == "onnxruntime":  # a graph per size, any batch
            f, cache = self.base.vae_scale_factor, self.engine_cache or EngineCache()
            found = sum(cache.lookup(self.engine_key(w, h), "flux_transformer.onnx") is not None for w, h in sizes)
            for width, height in sizes:
                self.check(1, None, width, height)
                self._onnx_graph(height // f, width // f)
            return {"buckets": 0, "graphs": len(sizes), "loaded": found, "stored": len(sizes) - found}
        buckets = [b for b in BATCH_BUCKETS if b <= batch_bucket(most_images)]
        for width, height in sizes:
            self.check(1, None, width, height)

        def compile_all() -> int:
            from contextlib import nullcontext

            capturing = getattr(self.denoiser, "capturing", nullcontext)  # CUDA graphs: captured here, never later
            with capturing():
                for width, height in sizes:
                    for bucket in buckets:
                        self.generate_items([GenerationItem("", [], "", 0)] * bucket, steps=1, width=width,
                                            height=height)
            return len(sizes) * len(buckets)

        # A key per (size, bucket): `compile --batch 8` serves a replica whose batches reach 16 for the
        # buckets they share.
        keys = [self.engine_key(width, height, bucket) for width, height in sizes for bucket in buckets]
        return warm_up_cached(self.compiler, compile_all, keys, self.engine_cache or EngineCache())

    def engine_key(self, width: int, height: int, bucket: int | None = None):
        """The engine cache's key of the compiled transformer at one size and batch bucket (onnxruntime:
        its graph at one size, any batch): what its code depends on."""
        from ray_faceid.engines.base import device_tag
        from ray_faceid.engines.cache import EngineKey
        from ray_faceid.engines.flux_onnx import MAX_BATCH
        from ray_faceid.engines.onnx_export import OPSET
        from ray_faceid.pipelines.generate import MAX_IDENTITIES

        adapter = self.adapter
        structure = "no identity" if adapter is None else f"{adapter.structure}, {MAX_IDENTITIES} people a call"
        if self.transformer_weights != "same":
            structure += f"; {self.transformer_weights.replace('_', ' ')} transformer weights"
        if self.step_cache:  # its two parts are compiled apart (the threshold changes no code)
            structure += "; step cache"
        f = self.base.vae_scale_factor
        common = dict(graph="flux_transformer", model_hash=self.base.model_hash(), latent=(height // f, width // f),
                      identities=None if adapter is None else MAX_IDENTITIES,
                      tokens=None if adapter is None else adapter.tokens_per_person, precision=self.precision)
        if self.backend == "onnxruntime":  # the adapter's weights are in the graph; a bank's are its inputs
            weights = "" if adapter is None else f", weights {self.adapter_hash[:16]}"
            return EngineKey(backend="onnx", adapter_structure=structure + weights, batch=(1, 2, MAX_BATCH),
                             weight_inputs=self.personal_bank is not None,
                             runtime_version=f"opset{OPSET}, bank stacks inputs without data", **common)
        return EngineKey(backend="torch.compile", adapter_structure=structure, batch=(bucket, bucket, bucket),
                         buckets=(bucket,), device=device_tag(self.device),
                         runtime_version=f"torch {torch.__version__}, {self.compiler}", **common)

    def _onnx_graph(self, h: int, w: int):
        """onnxruntime: the transformer's graph for latents h x w, from the engine cache, exported into it
        where it is not there (seconds on a tiny base, many minutes on FLUX.1: `ray-faceid compile
        --backend onnx` exports ahead)."""
        graph = self.graphs.get((h, w))
        if graph is not None:
            self.graphs.move_to_end((h, w))
            return graph
        from ray_faceid.engines.cache import EngineCache
        from ray_faceid.engines.flux_onnx import FluxCall, OnnxRuntimeFluxTransformer, export_flux_transformer

        cache = self.engine_cache or EngineCache()
        f = self.base.vae_scale_factor

        def export(folder):
            from ray_faceid.engines.select import BUILDING_AHEAD

            if BUILDING_AHEAD.get():  # `ray-faceid compile` itself
                log.info("exporting FLUX's transformer graph for %dx%d images into %s", w * f, h * f, cache.root)
            elif self.base.inpainting:  # a graph per photo size: none is exported ahead
                log.warning("FLUX.1 Fill: exporting the transformer's graph for %dx%d photos (their first request at "
                            "this size; then kept in the engine cache at %s)", w * f, h * f, cache.root)
            else:
                log.warning("FLUX's transformer graph for %dx%d images is not in the engine cache at %s: exporting it "
                            "(`ray-faceid compile --backend onnx` exports ahead)", w * f, h * f, cache.root)
            call = FluxCall(self.base.transformer, self.adapter, self.personal_bank)
            return export_flux_transformer(call, self._example(h, w), folder / "flux_transformer.onnx")

        path = cache.get_or_build(self.engine_key(w * f, h * f), "flux_transformer.onnx", export)
        while len(self.graphs) >= GRAPHS_KEPT:
            self.graphs.popitem(last=False)
        graph = self.graphs[(h, w)] = OnnxRuntimeFluxTransformer(path, self.personal_bank)
        return graph

    def _example(self, h: int, w: int) -> dict:
        """What _denoise gives the transformer for a batch of two at latents h x w (the export's example)."""
        states, pooled = self.encode_prompt(["", ""])
        config = self.base.transformer.config
        example = dict(hidden_states=torch.zeros(2, (h // 2) * (w // 2), config.in_channels, device=self.device),
                       timestep=torch.ones(2, device=self.device), pooled_projections=pooled,
                       encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3, device=self.device),
                       img_ids=patch_positions(h, w).to(self.device, states.dtype))
        if self.base.guidance_embedded:
            example["guidance"] = torch.ones(2, device=self.device)
        identity = self.identity_inputs([[], []], h, w)
        example.update(identity)
        personal = self._row_personal([[], []], identity)
        if personal is not None:
            example["personal_slots"] = self.personal_bank.rows(personal).view(2, -1)
        return example

    @torch.no_grad()
    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, identities: list | None = None, seed: int = 0,
                steps: int | None = None, guidance: float | None = None,
                max_pixels: int = MAX_FILL_PIXELS, feather: float = 0.0, identity_start: int = 0) -> GenerationResult:
        """The masked part (white) of an RGB image repainted by FLUX.1 Fill, as diffusers'
        FluxFillPipeline does at the image's own size (strength 1); outside the mask the photo's own
        pixels are kept exactly, and `feather` pixels inside its edge blend into them (0: a hard edge,
        diffusers' pixels everywhere inside). A side that is no multiple of the patch size is padded
        (edges repeated) and cut back. A photo over `max_pixels` is repainted reduced to it and the
        repainted part enlarged back."""
        identities = identities or []
        base = self.base
        full_h, full_w = image.shape[:2]
        if mask.shape[:2] != (full_h, full_w):
            raise BadInput(f"the mask is {mask.shape[1]}x{mask.shape[0]}, the image {full_w}x{full_h}: give one of the "
                           "image's size")
        full_gray = fill_gray(mask)
        full_hole = full_gray / 255.0 >= 0.5
        source = image = image[..., :3]
        gray = full_gray
        size = repaint_size(full_w, full_h, max_pixels)
        if size != (full_w, full_h):
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
            # Any coverage repaints a reduced pixel: the repainted part then covers the whole mask.
            gray = np.asarray(Image.fromarray(full_gray).resize(size, Image.Resampling.BOX))
            gray = np.where(gray > 0, 255, 0).astype(np.uint8)
        height, width = image.shape[:2]
        multiple = base.size_multiple
        padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        pad = ((0, padded_h - height), (0, padded_w - width))
        photo = np.pad(image, pad + ((0, 0),), mode="edge")
        binary = (np.pad(gray, pad) / 255.0 >= 0.5).astype(np.float32)
        if not binary.any():
            raise BadInput(f"the mask is too thin to repaint at {width}x{height} (the photo reduced to FLUX's "
                           f"{max_pixels} pixels): paint a wider region")
        steps, guidance, _, _ = self._defaults(steps, guidance, padded_w, padded_h)
        self.check(steps, guidance, padded_w, padded_h, inpainting=True)
        item = GenerationItem(prompt, identities, "", seed, identity_start)
        check_identity_start([item], steps)
        if self.backend == "torch.compile" and (padded_w, padded_h) not in self.fill_sizes:
            self.fill_sizes.add((padded_w, padded_h))  # Fill repaints at each photo's size: none is warmed ahead
            log.warning("FLUX.1 Fill: compiling the transformer for %dx%d photos (their first request; minutes on a "
                        "GPU without cached artifacts, then cached)", padded_w, padded_h)
        f, vae = base.vae_scale_factor, base.vae
        h, w = padded_h // f, padded_w // f
        pixels = torch.from_numpy(photo).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)
        hole = torch.from_numpy(binary)[None, None].to(self.device)
        # The draws diffusers makes from the image's generator, in its order: the photo's latents, the
        # noise, the masked photo's latents.
        generator = torch.Generator("cpu").manual_seed(seed)

        def latents_of(x: torch.Tensor) -> torch.Tensor:
            sample = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=generator)
            return (sample.float() - vae.config.shift_factor) * vae.config.scaling_factor

        image_latents = latents_of(pixels)
        noise = torch.randn((1, base.latent_channels, h, w), generator=generator).to(self.device)
        masked = pack(latents_of(pixels * (1 - hole)))
        packed_mask = pack(hole[:, 0].view(1, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, h, w))
        condition = torch.cat([masked, packed_mask], dim=-1)
        latents, reused = self._denoise([prompt], [identities], noise, condition, steps, guidance, h, w, self.on_step,
                                        start=image_latents, starts=[identity_start])
        result = self._result([item], latents, steps, guidance, padded_w, padded_h, "inpaint", reused)
        painted = result.images[0].crop((0, 0, width, height))
        reduced = size != (full_w, full_h)
        if reduced:
            painted = painted.resize((full_w, full_h), Image.Resampling.LANCZOS)
        if feather > 0:  # the UNet families' soft inner edge (pipelines/inpaint.py)
            from ray_faceid.pipelines.inpaint import paste_back

            kept = paste_back(source, full_hole, painted, feather)
        else:
            kept = np.where(full_hole[..., None], np.asarray(painted), source)  # the photo's own pixels outside the mask
        out = Image.fromarray(kept.astype(np.uint8))
        record = dict(result.provenance[0], size=[full_w, full_h], feather=feather)
        if reduced:
            record["repainted_at"] = [width, height]
        return GenerationResult([out], [png_with_provenance(out, record)], [record], [seed])

    def _denoise(self, prompts: list[str], rows: list[list], latents: torch.Tensor, condition: torch.Tensor | None,
                 steps: int, guidance: float | None, h: int, w: int, callback=None,
                 start: torch.Tensor | None = None, starts: list[int] | None = None,
                 negatives: list[str] | None = None, true_cfg: float = 1.0) -> tuple[torch.Tensor, list[int] | None]:
        """Packed latents denoised from `latents` (packed noise; Fill: the unpacked noise, put on the
        schedule's first sigma over the photo's latents `start`), image k with prompts[k] and the
        people rows[k] from step starts[k] (default: the first); `condition`: Fill's packed masked photo
        and mask, beside the latents. With the step cache on, also the steps each image reused (else None).
        `true_cfg` over 1: from step true_cfg_from on, the transformer also runs on `negatives` (their
        people's unconditional identity: uncond_identity) and the velocity is moved away from it."""
        base = self.base
        batch = latents.shape[0]
        # Each prompt encoded once (a bucket's padding repeats one; T5-XXL on the CPU takes seconds a prompt).
        unique = list(dict.fromkeys(prompts))
        states, pooled = self.encode_prompt(unique)
        if len(unique) < len(prompts):
            which = torch.tensor([unique.index(p) for p in prompts], device=states.device)
            states, pooled = states[which], pooled[which]
        text_positions = torch.zeros(states.shape[1], 3, device=self.device, dtype=states.dtype)
        positions = patch_positions(h, w).to(self.device, states.dtype)
        identity = self.identity_inputs(rows, h, w)
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device,
                                mu=flow_shift((h // 2) * (w // 2), scheduler.config))
        scheduler.set_begin_index(0)
        if start is not None:
            latents = pack(scheduler.scale_noise(start, scheduler.timesteps[:1].repeat(batch), latents))
        latents = latents.to(states.dtype)
        embedded = None
        if base.guidance_embedded:
            embedded = torch.full([batch], guidance, device=self.device, dtype=torch.float32)
        if callback is not None:
            callback(0, len(scheduler.timesteps))
        transformer = base.transformer
        denoiser = self._onnx_graph(h, w) if self.backend == "onnxruntime" else self.denoiser
        cache = None
        if self.step_cache:  # this call's own: other requests' steps run between this one's
            from functools import partial

            from ray_faceid.pipelines.flux_step_cache import StepCache

            cache = StepCache(self.step_cache, batch)
            denoiser = partial(cache, self.head, self.tail, self.stages)
        personal = self._row_personal(rows, identity)
        negative = None
        if true_cfg > 1:  # the negative prompts, each encoded once, and the people's unconditional identity
            unique_negatives = list(dict.fromkeys(negatives))
            negative_states, negative_pooled = self.encode_prompt(unique_negatives)
            which = torch.tensor([unique_negatives.index(n) for n in negatives], device=negative_states.device)
            negative = (negative_states[which], negative_pooled[which])
            negative_identity = self.uncond_identity(identity)
        for step, t in enumerate(scheduler.timesteps, 1):
            if personal is not None:  # placed at every step: another batch may run between two (turns.py)
                identity["personal_slots"] = self.personal_bank.rows(personal).view(batch, -1)
            timestep = t.expand(batch).to(latents.dtype) / 1000
            hidden = latents if condition is None else torch.cat([latents, condition.to(latents.dtype)], dim=2)
            active = identity_active(starts, step - 1, self.device) if starts and identity else None
            now = identity if active is None else dict(  # rows whose identity has not started: strength 0
                identity, identity_scale=identity["identity_scale"] * active[:, None])
            velocity = denoiser(hidden_states=hidden.to(transformer.dtype), timestep=timestep, guidance=embedded,
                              pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_positions,
                              img_ids=positions, joint_attention_kwargs=dict(now) or None,
                              return_dict=False)[0]
            if negative is not None and step - 1 >= self.true_cfg_from:
                if personal is not None:
                    negative_identity["personal_slots"] = identity["personal_slots"]
                away = negative_identity if active is None else dict(
                    negative_identity, identity_scale=negative_identity["identity_scale"] * active[:, None])
                unwanted = denoiser(hidden_states=hidden.to(transformer.dtype), timestep=timestep, guidance=embedded,
                                    pooled_projections=negative[1], encoder_hidden_states=negative[0],
                                    txt_ids=text_positions, img_ids=positions, joint_attention_kwargs=dict(away) or None,
                                    return_dict=False)[0]
                velocity = unwanted + true_cfg * (velocity - unwanted)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(step, len(scheduler.timesteps))
        return latents, None if cache is None else cache.reused

    @property
    def true_cfg_from(self) -> int:
        """The first step true CFG runs at: PuLID-FLUX's app starts it at step 1
        (timestep_to_start_cfg), diffusers' FluxPipeline at step 0."""
        return getattr(self.adapter, "true_cfg_from", 0)

    def uncond_identity(self, identity: dict) -> dict:
        """The identity inputs of true CFG's negative pass: the adapter's unconditional tokens where it
        has them (PuLID-FLUX: its IDFormer on zeros, as its pipeline's uncond_id), at the same strengths
        and patches; otherwise no identity (strength 0)."""
        if not identity:
            return {}
        uncond = getattr(self.adapter, "uncond_tokens", None)
        if uncond is None:
            return dict(identity, identity_scale=torch.zeros_like(identity["identity_scale"]))
        tokens = uncond().to(identity["identity_tokens"].dtype).expand_as(identity["identity_tokens"])
        return dict(identity, identity_tokens=tokens.contiguous())

    def _row_personal(self, rows: list[list], identity: dict) -> list | None:
        """Each (row, person slot)'s own adapter (version, delta) or None, row by row; None where no bank
        or no identity. Compiled: always there (zeros for nobody's), so one graph serves either."""
        if self.personal_bank is None or not identity:
            return None
        slots = identity["identity_tokens"].shape[1]
        personal = [(people[m].personal if m < len(people) else None) for people in rows for m in range(slots)]
        return personal if any(personal) or self.fixed_inputs else None

    def forget_personal(self, version: str) -> None:
        """Drop an erased person's own adapter from the bank and refuse it from now on."""
        if self.personal_bank is not None:
            self.personal_bank.evict(version, forever=True)

    def _result(self, items: list, latents, steps, guidance, width, height, kind="generate", reused=None):
        f = self.base.vae_scale_factor
        result = GenerationResult([], [], [], [])
        for k, item in enumerate(items):
            image = self.decode(unpack(latents[k : k + 1], height // f, width // f))
            record = with_identity_start(self.provenance(item.prompt, item.identities, item.seed, steps, guidance,
                                                         width, height, kind), item)
            if reused is not None:  # what made this image: the threshold, and the steps it took from the cache
                record["step_cache"] = {"threshold": self.step_cache, "steps_reused": reused[k]}
            result.images.append(image)
            result.png.append(png_with_provenance(image, record))
            result.provenance.append(record)
            result.seeds.append(item.seed)
        return result

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.base.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        arr = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def provenance(self, prompt: str, identities: list, seed: int, steps: int, guidance: float | None, width: int,
                   height: int, kind: str = "generate") -> dict:
        from ray_faceid.identity.personalization import version_of

        base = self.base
        return {
            "generator": "ray_faceid",
            "kind": kind,
            "ai_generated": True,
            "base_model": base.model_id,
            "base_model_hash": base.model_hash(),
            "base_family": "flux",
            "flux_variant": base.variant,
            "untrained_base": base.untrained,
            "adapter": self.adapter_hash,
            **({"adapter_published": self.adapter.published} if self.adapter is not None and self.adapter.published
               else {}),
            **({"adapter_trained": self.adapter.trained} if self.adapter is not None and self.adapter.trained else {}),
            **({"encoder": self.adapter.encoder_spec.key()}
               if self.adapter is not None and self.adapter.encoder_spec is not None else {}),
            **({"image_encoder": self.image_encoder_hash} if self.image_encoder_hash else {}),
            "identities": [{"name": p.name, "id": p.id, "region": p.region, "scale": p.scale,
                            **({"embeddings_encoder": p.encoder} if p.encoder else {}),
                            **({"personal_adapter": version_of(p.personal[0])}
                               if p.personal and self.personal_bank is not None else {})} for p in identities],
            "backend": self.backend,
            **({"compiler": self.compiler} if self.compiler else {}),  # torch.compile's backend (Inductor)
            "precision": self.precision,
            **({"transformer_weights": self.transformer_weights} if self.transformer_weights != "same" else {}),
            "prompt": prompt,
            "seed": seed,
            "steps": steps,
            "scheduler": {"class": type(base.scheduler).__name__, "sigmas": "1 to 1/steps, shifted by the token count"
                          if base.scheduler.config.get("use_dynamic_shifting") else "1 to 1/steps"},
            "guidance": guidance,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "size": [width, height],
        }
