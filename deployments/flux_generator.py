"""The Generator deployment on a FLUX base (pipelines/flux_sampling.py): the same API, batching
boundaries, cancellation, turns and erasure sweep as the UNet families' Generator; requests of
different people and prompts are denoised in one transformer batch. Enrolled people are read as
the FLUX IP-Adapter reads a person: the reference crops the registry keeps, through the CLIP image
encoder (`image_encoder` in the Serve config); with the FLUX adapter `ray-faceid train` made, their
stored identity embeddings of its encoder. A negative prompt works through true CFG (`true_cfg`).
What FLUX does not take yet (a request's expression, edits, pose or sampler, a Fill request's
negative prompt) fails that request alone, in one line."""
from __future__ import annotations

import asyncio
import functools
import time

import torch

from deployments import multiplex
from deployments.generator import Generator, LoadedIdentity, start_of, true_cfg
from ray_faceid.config import ServeConfig
from ray_faceid.errors import BadInput
from ray_faceid.registry_secret import never_create_here


def fits_this_gpu(config: ServeConfig, precision: str) -> str:
    """The replica's memory plan (flux_memory.py), checked against this GPU's free memory; its line."""
    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.generate import parse_size
    from ray_faceid.pipelines.model_ref import resolve_model

    plan = flux_memory.replica_plan(
        resolve_model(config.model, flux=True), precision, config.flux_text_encoders, config.flux_transformer_weights,
        config.generator_batch_size * config.limits.max_images,
        [parse_size(size, "warm_up_sizes") for size in config.warm_up_sizes], config.adapter, config.image_encoder,
        bool(config.flux_step_cache), config.backend)
    flux_memory.check_this_gpu(plan, f"this replica's GPU (free memory, generator_gpus {config.generator_gpus:g})",
                               config.generator_gpus or 1.0)
    return plan.line()


class FluxServeGenerator(Generator):
    def __init__(self, config_json: str):
        from ray_faceid.pipelines.flux import load_flux
        from ray_faceid.pipelines.flux_sampling import FluxGenerator, resolve_flux_precision
        from ray_faceid.pipelines.generate import DTYPES

        self.config = config = ServeConfig.model_validate_json(config_json)
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        never_create_here()  # the registry secret comes from the cluster's configuration (registry_secret.py)
        precision = resolve_flux_precision(config.precision, torch.device(device), config.backend)
        memory = dict(text_encoders=config.flux_text_encoders, transformer_weights=config.flux_transformer_weights)
        self.memory_plan = None  # the CPU's memory is the machine's: not planned
        if device == "cuda":  # before anything loads: one line instead of an out-of-memory error halfway
            self.memory_plan = fits_this_gpu(config, precision)
        base = load_flux(config.model, DTYPES[precision] if device == "cuda" else None)
        adapter, self.encoder, self.pulid_reader = None, None, None
        if config.adapter:
            from ray_faceid.face.clip_image import ClipImageEncoder
            from ray_faceid.identity.flux_adapter import load_flux_identity

            adapter = load_flux_identity(config.adapter, base.transformer)
            if getattr(adapter, "tokens_of", None) is not None:  # PuLID-FLUX: its own encoders read the crops
                from ray_faceid.face.analyzer import FaceAnalyzer
                from ray_faceid.identity.pulid_faces import PulidFaceReader

                self.pulid_reader = PulidFaceReader(config.image_encoder, FaceAnalyzer(config.face), device,
                                                    DTYPES["bf16"] if device == "cuda" else torch.float32)
            elif adapter.encoder_spec is None:  # ours reads identity embeddings; a FLUX IP-Adapter, the crops
                self.encoder = ClipImageEncoder(config.image_encoder, device)  # resolve_config asked for both
        self.pipeline = FluxGenerator(base, adapter, device=device, precision=precision, backend=config.backend,
                                      step_cache=config.flux_step_cache, **memory)
        reader = self.encoder or self.pulid_reader
        self.pipeline.image_encoder_hash = None if reader is None else reader.sha256
        self.warm_up_report = self._warm_up()  # in __init__: Serve routes nothing to a replica still compiling
        self._serving_state()

    def _warm_up(self) -> dict:
        """torch.compile: each configured size compiled before the replica is ready, at every batch
        bucket a batch of requests can fill (people are inputs: none compile anew); onnxruntime: each
        size's graph exported or loaded; eager: nothing."""
        from ray_faceid.pipelines.generate import parse_size

        started = time.perf_counter()
        sizes = [parse_size(size, "warm_up_sizes") for size in self.config.warm_up_sizes]
        most_images = self.config.generator_batch_size * self.config.limits.max_images
        report = self.pipeline.warm_up(sizes or [self.pipeline.base.native_size], most_images)
        return dict(report, seconds=round(time.perf_counter() - started, 1))

    def controls(self) -> dict[str, bool]:
        base = self.pipeline.base
        true_cfg = not base.inpainting and not self.pipeline.step_cache  # the cache reads one pass a step
        return {"negative_prompt": true_cfg, "sampler": False, "expression": False, "edits": False,
                "guidance": base.guidance_embedded, "generate": not base.inpainting, "inpaint": base.inpainting,
                "true_cfg": true_cfg, "identity_start": True}

    def info(self) -> dict:
        adapter = self.pipeline.adapter
        return {"model": self.pipeline.base.model_id, "family": "flux", "adapter": self.adapter_hash,
                "adapter_trained_steps": adapter.trained["trained_steps"] if adapter is not None and adapter.trained
                else None, "adapter_published": None if adapter is None else adapter.published,
                "image_encoder": self.pipeline.image_encoder_hash, "identity_loads": self.loads,
                "backend": self.pipeline.backend, "memory": self.memory_plan,
                "text_encoders": self.pipeline.text_encoders, "transformer_weights": self.pipeline.transformer_weights,
                "warm_up": self.warm_up_report, "cancelled": self.cancelled, "lent_to_small_requests": self.turns.lent,
                "imr": None, "flow": None}

    async def _load_identity(self, key: str) -> LoadedIdentity:
        tenant, identity = multiplex.split_key(key)
        reads = self.pipeline.adapter.encoder_spec  # ours: the person's identity embeddings of its encoder
        if reads is not None:  # and their own adapter (personalize), if any
            from ray_faceid.identity.personalization import load_personal

            embeddings, quality, spec = self.registry.embeddings(tenant, identity, reads)
            personal = load_personal(self.registry, tenant, identity, self.adapter_hash, self.pipeline.adapter)
            loaded = LoadedIdentity(key, embeddings, quality, spec, personal)
            self._note_version(key, personal)
        elif self.pulid_reader is not None:  # PuLID-FLUX's ID tokens of the reference crops, each crop its own
            crops = self.registry.references(tenant, identity)
            tokens = await asyncio.to_thread(self._pulid_tokens, crops, identity)
            loaded = LoadedIdentity(key, tokens, None, self.pulid_reader.analyzer.spec)
        else:
            _, _, spec = self.registry.embeddings(tenant, identity)  # what the person was enrolled with
            crops = self.registry.references(tenant, identity)
            image_embeds = await asyncio.to_thread(self.encoder.image_embeds, crops)
            loaded = LoadedIdentity(key, image_embeds, None, spec)
        self.loads += 1
        self.held[key] = loaded
        return loaded

    def _pulid_tokens(self, crops: list, identity: str):
        """(modules run without state: two people loading at once share them safely)"""
        features = self.pulid_reader.read(crops, [f"{identity}'s reference crop {i + 1}" for i in range(len(crops))])
        return self.pipeline.adapter.tokens_of(features, identity)

    async def _conditions(self, tenant: str, requested: list[dict]):
        from ray_faceid.pipelines.generate import IdentityCondition

        adapter = self.pipeline.adapter
        if requested and self.encoder is None and self.pulid_reader is None and (adapter is None or
                                                                                  adapter.encoder_spec is None):
            raise BadInput(f"{self.pipeline.base.model_id}: identity on FLUX reads a FLUX IP-Adapter: this deployment "
                           "serves prompts alone (set adapter and image_encoder in its Serve config)")
        conditions, hits = [], 0
        for item in requested:
            asked = [what for what in ("expression", "edits", "pose") if item.get(what)]
            if asked:
                raise BadInput(f"identity {item['id']}: {', '.join(asked)} not built for FLUX yet")
            meta = self.registry.get(tenant, item["id"])  # a deleted identity is never served from the cache
            before = self.loads
            key = multiplex.identity_key(tenant, item["id"])
            loaded = await self.load_identity(key)
            ours = adapter.encoder_spec is not None
            if ours:
                self._refresh_personal(tenant, item["id"], meta, key, loaded)
            hits += self.loads == before
            conditions.append(IdentityCondition(meta.get("name") or item["id"], loaded.embeddings, loaded.quality,
                                                region=item.get("region"), scale=item.get("scale", 1.0), id=item["id"],
                                                encoder=loaded.spec_key if ours else None,
                                                personal=loaded.personal if ours else None))
        return conditions, hits

    def _refuse_unbuilt(self, request: dict) -> None:
        """What FLUX does not take yet, for this request alone (the Generator's groups call it per
        request); a negative prompt goes through true CFG, on generate."""
        from ray_faceid.pipelines.flux_sampling import check_true_cfg

        asked = [what for what in ("scheduler", "scheduler_config") if request.get(what)]
        if request["kind"] == "inpaint" and request.get("negative_prompt"):
            asked.append("negative_prompt (on FLUX.1 Fill)")
        if asked:
            raise BadInput(f"{', '.join(asked)}: not built for FLUX yet (FLUX.1 is guidance-distilled; its sampler "
                           "is its own flow-matching Euler)")
        if request["kind"] == "generate":
            check_true_cfg(true_cfg(request), bool(request.get("negative_prompt")), self.pipeline.step_cache,
                           ("negative_prompt", "true_cfg", "this deployment's step cache"))

    def _denoiser_call(self, request: dict):
        return functools.partial(self.pipeline.generate_items, true_cfg=true_cfg(request))

    async def _inpaint(self, request: dict) -> dict:
        from ray_faceid.face.decode import decode_image

        self._refuse_unbuilt(request)
        conditions, hits = await self._conditions(request["tenant"], request["identities"])
        # FLUX.1 Fill repaints at the photo's own size: reduced to the deployment's largest side as it is
        # decoded, and its real cost checked here (the ingress priced it at the native size).
        limits = self.config.limits
        decode = limits.decode(max_side=limits.max_side)
        image, mask = decode_image(request["image"], decode), decode_image(request["mask"], decode)
        from ray_faceid.pipelines.flux_sampling import MAX_FILL_PIXELS

        # What is repainted: a photo over FLUX's pixel budget at the budget (flux_sampling.py).
        cost = min(image.shape[0] * image.shape[1], MAX_FILL_PIXELS) * request["steps"]
        if cost > limits.max_cost:
            raise BadInput(f"inpainting a {image.shape[1]}x{image.shape[0]} photo in {request['steps']} steps is "
                           f"{cost} pixel-steps, over this deployment's {limits.max_cost}: send a smaller photo or "
                           "fewer steps")
        inpaint = functools.partial(self.pipeline.inpaint, feather=request["feather"], identity_start=start_of(request))
        result = await self._run([request], cost, inpaint, image, mask, request["prompt"], conditions, request["seed"],
                                 request["steps"], request["guidance"])
        return self._response(result.png, result.provenance, result.seeds, hits, len(conditions))
