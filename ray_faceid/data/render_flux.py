"""Catalog rows on a FLUX base: the Renderer's keys, cache, scoring, manifest records and batching
(`--unet-batch`: rows of the same size, steps, guidance, true CFG and people count denoised together), each
image made by FluxGenerator (pipelines/flux_sampling.py). A row's people are enrolled
ones, read as the FLUX IP-Adapter reads a person: the reference crops the registry keeps, through the
CLIP image encoder (--image-encoder); for a FLUX adapter `ray-faceid train` made, their stored
identity embeddings of its encoder. Inpaint rows need FLUX.1 Fill. What FLUX does not take yet (a
row's expression, edits, pose or sampler, an inpaint row's negative prompt; an IMR, a flow, an IdentityNet, another
backend) is refused in one line: the row, or the job before it starts."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict

import numpy as np

from ray_faceid import storage
from ray_faceid.config import RenderConfig
from ray_faceid.data.catalog import CatalogRow
from ray_faceid.data.render_rows import IDENTITY_CACHE, Renderer, output_uris
from ray_faceid.errors import BadInput, EncoderMismatch

log = logging.getLogger(__name__)


def check_flux_job(config: RenderConfig, imr: str | None, flow: str | None, model=None) -> None:
    """What a FLUX render does not run, in one line: run_render asks before Ray starts, each actor again
    (`model`, a reference: the job's size checked against its configs)."""
    import torch

    from ray_faceid.pipelines.flux_sampling import FLUX_BACKENDS, check_step_cache, resolve_flux_precision

    given = {"--imr": imr, "--flow": flow, "--identitynet": config.identitynet,
             "--backend": None if config.backend in ("auto", *FLUX_BACKENDS) else config.backend}
    refused = [option for option, value in given.items() if value]
    if refused:
        raise BadInput(f"{', '.join(refused)}: not built for FLUX yet; FLUX renders with --adapter (a FLUX "
                       "IP-Adapter) and --image-encoder, on backend torch, torch.compile or onnxruntime")
    resolve_flux_precision(config.precision, torch.device("cpu"), config.backend)  # what no device runs
    check_step_cache(config.flux_step_cache, config.backend)
    if config.backend == "onnxruntime":  # the settings against the device: on each actor (_check_memory)
        from ray_faceid.pipelines.flux_memory import FLAGS, check_settings

        check_settings(config.flux_text_encoders, config.flux_transformer_weights, torch.device("cpu"), "onnxruntime",
                       FLAGS)
    if model is not None and config.size:
        from ray_faceid.pipelines.flux import check_flux_size, flux_settings
        from ray_faceid.pipelines.generate import parse_size

        check_flux_size(*parse_size(config.size, "--size"), flux_settings(model)["size_multiple"], "--size: ")


def _check_memory(config: RenderConfig, model, device, precision: str, adapter: str | None, image_encoder: str | None):
    """Before the base loads: the job's memory settings on this actor's device, and on a GPU the
    actor's memory plan (pipelines/flux_memory.py, its batch of rows at the job's size) against its
    free memory (its share where actors share one): one line instead of running out halfway."""

    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.flux_sampling import resolve_flux_backend
    from ray_faceid.pipelines.generate import parse_size
    from ray_faceid.pipelines.model_ref import resolve_model

    backend = resolve_flux_backend(config.backend, device)
    flux_memory.check_settings(config.flux_text_encoders, config.flux_transformer_weights, device, backend,
                               flux_memory.FLAGS)
    if device.type != "cuda":  # the CPU's memory is the machine's: not planned
        return
    plan = flux_memory.replica_plan(resolve_model(model, flux=True), precision, config.flux_text_encoders,
                                    config.flux_transformer_weights, config.unet_batch,
                                    [parse_size(config.size, "--size")] if config.size else [], adapter, image_encoder,
                                    bool(config.flux_step_cache), backend)
    flux_memory.check_this_gpu(plan, f"this render actor's GPU (free memory, {config.num_gpus_per_worker or 1:g} GPU "
                               "a worker)", config.num_gpus_per_worker or 1.0, flags=True)


class FluxRenderer(Renderer):
    def __init__(self, config: RenderConfig, model, adapter: str | None, registry: str, tenant: str, out: str,
                 imr: str | None = None, flow: str | None = None, image_encoder: str | None = None,
                 catalog: str | None = None, people_counts: tuple[int, ...] = (1,)):
        """`people_counts` is the UNet renderer's: FLUX's compiled transformer takes any count of people."""
        import torch

        from ray_faceid.face.analyzer import FaceAnalyzer
        from ray_faceid.pipelines.flux import load_flux
        from ray_faceid.pipelines.flux_sampling import FluxGenerator, resolve_flux_precision
        from ray_faceid.pipelines.generate import DTYPES
        from ray_faceid.registry import Registry

        check_flux_job(config, imr, flow)
        self.tenant, self.out = tenant, out
        self.catalog = catalog  # rows' relative image and mask paths are read from its folder
        self.analyzer = FaceAnalyzer(config.face)  # scores the outputs, as for every base
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_flux_precision(config.precision, torch.device(device), config.backend)
        _check_memory(config, model, torch.device(device), self.precision, adapter, image_encoder)
        base = load_flux(model, DTYPES[self.precision] if device == "cuda" else None)
        width, height = base.native_size
        self.config = config = config.model_copy(update={
            "steps": config.steps or base.default_steps, "size": config.size or f"{width}x{height}",
            "guidance": base.default_guidance if config.guidance is None else config.guidance})
        flux_adapter, self.encoder = None, None
        if adapter:
            from ray_faceid.identity.flux_adapter import load_flux_identity

            flux_adapter = load_flux_identity(adapter, base.transformer)
        # Ours (`ray-faceid train` made it) reads each person's stored identity embeddings of its encoder.
        self.face_encoder = None if flux_adapter is None else flux_adapter.encoder_spec
        if self.face_encoder is not None and image_encoder:
            raise BadInput("this FLUX adapter (made by `ray-faceid train`) reads people's identity embeddings: leave "
                           "--image-encoder out")
        if adapter and self.face_encoder is None:
            if not image_encoder:
                raise BadInput("a FLUX IP-Adapter reads each person's reference crops through a CLIP image encoder: "
                               "give --image-encoder FOLDER (a CLIPVisionModelWithProjection)")
        self.pulid_reader = None  # PuLID-FLUX: its encoders read each person's reference crops
        if image_encoder and getattr(flux_adapter, "tokens_of", None) is not None:
            from ray_faceid.identity.pulid_faces import PulidFaceReader

            # The face stack that scores the outputs gives the ArcFace embedding (antelopev2's pack).
            self.pulid_reader = PulidFaceReader(image_encoder, self.analyzer, device,
                                                DTYPES["bf16"] if device == "cuda" else torch.float32)
        elif image_encoder:
            if not adapter:
                raise BadInput("--image-encoder reads people for a FLUX IP-Adapter: give --adapter FILE too")
            from ray_faceid.face.clip_image import ClipImageEncoder

            self.encoder = ClipImageEncoder(image_encoder, device)
        self.pipeline = FluxGenerator(base, flux_adapter, device=device, precision=self.precision,
                                      backend=config.backend,  # compiled: once per actor, for the whole job
                                      step_cache=config.flux_step_cache, text_encoders=config.flux_text_encoders,
                                      transformer_weights=config.flux_transformer_weights)
        reader = self.encoder or self.pulid_reader
        self.image_encoder_hash = None if reader is None else reader.sha256
        self.pipeline.image_encoder_hash = self.image_encoder_hash
        self.imr_hash = self.flow_hash = self.identitynet = None
        self.registry = Registry(registry)
        self.model_hash, self.adapter_hash = base.model_hash(), self.pipeline.adapter_hash
        self.identities: OrderedDict[str, dict] = OrderedDict()
        self.warmed = None
        if self.pipeline.backend == "torch.compile" and not base.inpainting:  # Fill compiles each photo's size
            from ray_faceid.pipelines.generate import parse_size

            # The job's size in every batch bucket its rows fill, before the first row: from `ray-faceid
            # compile`'s artifacts where the engine cache has them (seconds, not minutes per actor).
            self.warmed = self.pipeline.warm_up([parse_size(config.size)], config.unet_batch)
            log.info("render actor: torch.compile warmed %s", self.warmed)

    def identity(self, identity: str) -> dict:
        """The face stack's embeddings (the scores, where the person has them) and the CLIP image
        embeddings of the reference crops (the adapter's input) of an identity, by id or name (LRU-cached)."""
        if identity in self.identities:
            self._still_enrolled(identity)
            self.identities.move_to_end(identity)
            return self.identities[identity]
        found = self.registry.resolve(self.tenant, identity)
        try:  # the adapter reads the reference crops: a person without the face stack's embeddings goes unscored
            scoring = self.registry.embeddings(self.tenant, found, self.analyzer.spec)[0]
        except EncoderMismatch:
            scoring = None
        image_embeds, encoder, quality = None, None, None
        if self.encoder is not None:
            image_embeds = self.encoder.image_embeds(self.registry.references(self.tenant, found))
        if self.pulid_reader is not None:  # PuLID-FLUX's ID tokens of the reference crops, each crop its own
            crops = self.registry.references(self.tenant, found)
            features = self.pulid_reader.read(crops, [f"{identity}'s reference crop {i + 1}" for i in range(len(crops))])
            image_embeds = self.pipeline.adapter.tokens_of(features, identity)
            encoder = self.analyzer.spec.key()
        personal = None
        if self.face_encoder is not None:
            from ray_faceid.identity.personalization import load_personal

            image_embeds, quality, spec = self.registry.embeddings(self.tenant, found, self.face_encoder)
            encoder = spec.key()
            personal = load_personal(self.registry, self.tenant, found, self.adapter_hash, self.pipeline.adapter)
        loaded = {"id": found, "scoring": scoring, "personal": personal, "image_embeds": image_embeds,
                  "quality": quality, "encoder": encoder}
        self.identities[identity] = loaded
        if len(self.identities) > IDENTITY_CACHE:
            self.identities.popitem(last=False)
        return loaded

    def conditions(self, row: CatalogRow) -> list:
        from ray_faceid.pipelines.flux_sampling import check_true_cfg
        from ray_faceid.pipelines.generate import IdentityCondition

        asked = [what for what, value in (("expression", row.expression), ("edits", row.edits),
                                          ("scheduler", row.scheduler)) if value]
        asked += [f"{what} of {i.id}" for i in row.identities for what, value in
                  (("expression", i.expression), ("edits", i.edits), ("pose", i.pose)) if value]
        if row.inpaint and (row.negative_prompt or row.true_cfg not in (None, 1)):
            asked.append("a negative prompt or true CFG on FLUX.1 Fill")
        if asked:
            raise BadInput(f"{', '.join(asked)}: not built for FLUX yet")
        check_true_cfg(row.true_cfg or 1.0, bool(row.negative_prompt), self.config.flux_step_cache,
                       ("negative_prompt", "true_cfg", "the job's --step-cache"))
        if row.identities and self.encoder is None and self.face_encoder is None and self.pulid_reader is None:
            raise BadInput("identity on FLUX reads a FLUX IP-Adapter: render with --adapter FILE and --image-encoder "
                           "FOLDER, or --adapter with the folder `ray-faceid train --model FLUX` wrote")
        out = []
        for ident in row.identities:
            loaded = self.identity(ident.id)
            out.append(IdentityCondition(ident.id, loaded["image_embeds"], loaded["quality"], region=ident.region,
                                         scale=ident.scale,
                                         id=loaded["id"], encoder=loaded["encoder"], personal=loaded["personal"]))
        return out

    def _personal_version(self, row: CatalogRow):
        """The people's own adapters a row renders with: on FLUX each person's applies beside others too
        ("shared" where nobody has one: the keys rows had before personal adapters)."""
        from ray_faceid.identity.personalization import version_of

        versions = [self.identity(i.id)["personal"] for i in row.identities]
        if not any(versions):
            return "shared"
        return [version_of(v[0]) if v else "shared" for v in versions]

    def render(self, row: CatalogRow) -> dict:
        from ray_faceid.face.decode import decode_image

        inputs = []
        if row.inpaint:
            image_bytes, mask_bytes = map(storage.read_bytes, row.inpaint_files(self.catalog))
            inputs = [hashlib.sha256(image_bytes).hexdigest(), hashlib.sha256(mask_bytes).hexdigest()]
        key = self.key(row, inputs)
        png_uri, record_uri = output_uris(self.out, row.id, key)
        if storage.exists(record_uri):
            return {**json.loads(storage.read_bytes(record_uri)), "cached": True}
        conditions = self.conditions(row)
        steps = row.steps or self.config.steps
        guidance = row.guidance if row.guidance is not None else self.config.guidance
        if row.inpaint:
            result = self.pipeline.inpaint(decode_image(image_bytes), np.asarray(decode_image(mask_bytes)), row.prompt,
                                           conditions, row.seed, steps, guidance,
                                           feather=row.feather_or(self.config.feather),
                                           identity_start=row.identity_start or 0)
        else:
            width, height = row.dimensions(self.config.size)
            result = self.pipeline.generate(row.prompt, conditions, row.seed, steps, guidance, width, height,
                                            identity_start=row.identity_start or 0, negative_prompt=row.negative_prompt,
                                            true_cfg=row.true_cfg or 1.0)
        return self._commit(row, key, png_uri, record_uri, result.images[0], result.provenance[0])

