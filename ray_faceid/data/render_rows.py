"""One catalog row -> one image, its identity scores and a manifest record. Plain Python: the Ray
Data render job calls it from an actor; the render benchmark's plain loop calls it directly.

Every output is content-addressed: its key hashes the row, the base model, the shared adapter and
each identity's per-identity adapter version (and, for inpaint rows, the image and mask bytes).
The PNG and a JSON sidecar (the manifest record) are written under that key, sidecar last, so a
re-run skips a row whose sidecar exists, and a changed adapter re-renders only its rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict

import numpy as np

from ray_faceid import storage
from ray_faceid.config import RenderConfig
from ray_faceid.data.catalog import CatalogRow, parse_row
from ray_faceid.errors import BadInput, EncoderMismatch, FaceIdError

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
IDENTITY_CACHE = 64  # identities (embeddings + per-identity weights) kept per renderer


def output_uris(out: str, row_id: str, key: str) -> tuple[str, str]:
    stem = storage.join(out, IMAGES_DIR, f"{row_id}.{key[:16]}")
    return stem + ".png", stem + ".json"


class Renderer:
    def __init__(self, config: RenderConfig, model: str, adapter: str | None, registry: str, tenant: str, out: str,
                 imr: str | None = None, flow: str | None = None, image_encoder: str | None = None,
                 catalog: str | None = None, people_counts: tuple[int, ...] = (1,)):
        """`people_counts`: how many people the job's rows name (render.py's people_counts), each
        warmed on torch.compile before the first row."""
        import torch

        from ray_faceid.face.analyzer import FaceAnalyzer
        from ray_faceid.identity.adapter import NO_ADAPTER, shared_adapter
        from ray_faceid.identity.face_plus import attach_image_encoder
        from ray_faceid.identity.instantid import attach_identitynet
        from ray_faceid.pipelines.edit_modules import load_edit_modules
        from ray_faceid.pipelines.generate import IdentityPipeline, resolve_precision
        from ray_faceid.pipelines.models import load_base
        from ray_faceid.registry import Registry

        self.tenant, self.out = tenant, out
        self.catalog = catalog  # rows' relative image and mask paths are read from its folder
        self.analyzer = FaceAnalyzer(config.face)
        base = load_base(model)
        # Defaults resolved to the model's own before they join the output keys: an SD 1.x job keeps
        # the keys it had when the defaults were fixed at 512x512, 30 steps and guidance 5.
        width, height = base.native_size
        self.config = config = config.model_copy(update={
            "steps": config.steps or base.default_steps, "size": config.size or f"{width}x{height}",
            "guidance": base.default_guidance if config.guidance is None else config.guidance})
        from ray_faceid.identity import published

        # A published file reads each person's stored embeddings it takes (identity()), whatever stack
        # scores the outputs; ours, the face stack's own. Without one: the smoke base's seeded adapter.
        given = None if adapter and published.is_published_file(adapter) else self.analyzer.spec
        shared = shared_adapter(adapter, base, given)
        if shared is None:
            raise BadInput(NO_ADAPTER.format(model=base.model_id))
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(config.precision, device)
        imr_module, flow_module = load_edit_modules(shared, imr, flow)  # before the pipeline casts the adapter
        attach_image_encoder(shared, image_encoder, device, "--image-encoder")  # before the pipeline casts the adapter
        self.pipeline = IdentityPipeline(base, shared, imr_module, device=device, backend=config.backend,
                                         precision=self.precision, flow=flow_module)
        attach_identitynet(self.pipeline, config.identitynet, config.identitynet_scale, "identitynet (--identitynet)")
        self.identitynet = None if shared.identitynet is None else shared.identitynet.record()
        self.image_encoder_hash = None if shared.image_encoder is None else shared.image_encoder.sha256
        self.imr_hash = None if imr_module is None else imr_module.weights_hash
        self.flow_hash = None if flow_module is None else flow_module.weights_hash
        self.registry = Registry(registry)
        self.model_hash, self.adapter_hash = base.model_hash(), self.pipeline.adapter_hash
        self.identities: OrderedDict[str, dict] = OrderedDict()
        self.warmed = None
        if self.pipeline.backend == "torch.compile":
            from ray_faceid.pipelines.generate import parse_size

            # The job's size for each count of people its rows name, in every batch bucket its rows fill,
            # before the first row: from `ray-faceid compile`'s artifacts where the engine cache has them, into
            # it where not (a row's own size: compiled as rows need it).
            try:
                self.warmed = self.pipeline.warm_up([parse_size(config.size)], list(people_counts),
                                                    max_images=config.unet_batch)
                log.info("render actor: torch.compile warmed %s", self.warmed)
            except BadInput as wrong:  # a size this model cannot make: each row says so, as it would unwarmed
                log.warning("render actor: nothing warmed (%s)", wrong.message)

    # -- inputs -------------------------------------------------------------------------------
    def identity(self, identity: str) -> dict:
        """Embeddings, quality and per-identity weights of an identity, by id or name (LRU-cached)."""
        from ray_faceid.identity.personalization import load_personal

        if identity in self.identities:
            # Still enrolled? (a person erased while the job runs: their later rows fail, their copy is dropped)
            self._still_enrolled(identity)
            self.identities.move_to_end(identity)
            return self.identities[identity]
        found = self.registry.resolve(self.tenant, identity)  # rows may name people or give their ids
        # The face stack's embeddings (the enrollment's, or added by `identities embed`) give the tokens
        # and the scores; a published file that takes another encoder's reads those (any it takes), and
        # the outputs are scored where the person has the face stack's too.
        spec, adapter = self.analyzer.spec, self.pipeline.adapter
        if adapter.takes(spec):
            embeddings, quality, _ = self.registry.embeddings(self.tenant, found, spec)
            scoring = embeddings
        else:
            embeddings, quality, spec = self.registry.embeddings(self.tenant, found, None, adapter.takes)
            try:
                scoring = self.registry.embeddings(self.tenant, found, self.analyzer.spec)[0]
            except EncoderMismatch:
                scoring = None
        loaded = {"id": found, "embeddings": embeddings, "quality": quality, "scoring": scoring, "encoder": spec.key(),
                  "personal": load_personal(self.registry, self.tenant, found, self.adapter_hash, self.pipeline.adapter),
                  "image_features": self._image_features(found)}
        self.identities[identity] = loaded
        if len(self.identities) > IDENTITY_CACHE:
            self.identities.popitem(last=False)
        return loaded

    def _still_enrolled(self, identity: str) -> None:
        """Erased (or NotFound) for a cached identity erased since it was loaded, its copy dropped."""
        from ray_faceid.errors import Erased, NotFound

        try:
            self.registry.get(self.tenant, self.identities[identity]["id"])
        except (Erased, NotFound):
            del self.identities[identity]
            raise

    def _image_features(self, identity: str) -> np.ndarray | None:
        """FaceID-Plus: the CLIP features of the person's reference crops; None for other adapters."""
        encoder = self.pipeline.adapter.image_encoder
        return None if encoder is None else encoder.enrolled_features(self.registry.references(self.tenant, identity))

    def key(self, row: CatalogRow, extra: list[str]) -> str:
        # The job's feather keys the inpaint rows that render with it alone (pinned in the defaults' hash:
        # keys made before it was keyed apart stay theirs).
        defaults = self.config.model_copy(update={"feather": RenderConfig.model_fields["feather"].default})
        parts = {"row": row.key_fields(), "model": self.model_hash, "adapter": self.adapter_hash,
                 "personal": self._personal_version(row),
                 "defaults": defaults.compute_hash(), "inputs": extra, **self._module_hashes(row)}
        feather = row.feather_or(self.config.feather)
        if row.inpaint and feather:  # the smoothstep edge: rows made with the old erode-and-blur one are made again
            parts["feather"] = ["smoothstep", feather]
        # A published file takes any set of its width: which one made the tokens is part of what made the
        # image (ours is pinned to its encoder by its hash; a FLUX IP-Adapter reads photos: None).
        encoders = [self.identity(i.id).get("encoder") for i in row.identities]
        adapter = self.pipeline.adapter
        if adapter is not None and adapter.published and any(e not in (None, self.analyzer.spec.key()) for e in encoders):
            parts["embeddings_encoders"] = encoders
        if self.image_encoder_hash:  # FaceID-Plus reads the faces through it
            parts["image_encoder"] = self.image_encoder_hash
        if self.identitynet:  # InstantID: its weights and scale
            parts["identitynet"] = [self.identitynet["weights_sha256"], self.identitynet["scale"]]
        if self.config.flux_step_cache:  # FLUX's step cache changes the image
            parts["step_cache"] = self.config.flux_step_cache
        if self.config.flux_transformer_weights != "same":  # float8 weights (and products) too
            parts["transformer_weights"] = self.config.flux_transformer_weights
        if self.precision != "fp32":  # fp32 keys stay those of runs made before precision was a setting
            parts["precision"] = self.precision
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _module_hashes(self, row: CatalogRow) -> dict:
        """The IMR's and the flow's weights, for a row they act on (an expression, edits): a row
        neither touches renders the same with or without them, and keeps its key."""
        hashes = {}
        if self.imr_hash and any(i.expression or row.expression for i in row.identities):
            hashes["imr"] = self.imr_hash
        if self.flow_hash and any(i.edits or row.edits for i in row.identities):
            hashes["flow"] = self.flow_hash
        return hashes

    def _personal_version(self, row: CatalogRow) -> str:
        """The per-identity adapter a row renders with: only a single-identity row uses one."""
        if len(row.identities) != 1:
            return "shared"
        from ray_faceid.identity.personalization import version_of

        personal = self.identity(row.identities[0].id)["personal"]
        return version_of(personal[0]) if personal else "shared"

    def conditions(self, row: CatalogRow) -> list:
        from ray_faceid.pipelines.generate import IdentityCondition

        if row.true_cfg not in (None, 1):
            raise BadInput("true_cfg: for FLUX bases; this base runs classifier-free guidance already (guidance)")
        out = []
        for ident in row.identities:
            loaded = self.identity(ident.id)
            out.append(IdentityCondition(ident.id, loaded["embeddings"], loaded["quality"], ident.region,
                                         ident.expression or row.expression, ident.scale, loaded["personal"],
                                         edits=ident.edits if ident.edits is not None else row.edits,
                                         id=loaded["id"], image_features=loaded["image_features"], pose=ident.pose,
                                         encoder=loaded["encoder"]))
        return out

    # -- one row ------------------------------------------------------------------------------
    def render_text(self, text: str, index: int) -> dict:
        """A manifest record for one catalog row; a bad row gives an error record, not an exception."""
        try:  # name the row by its own id where it has a readable one
            row_id = str(json.loads(text).get("id") or f"#{index}")
        except (ValueError, AttributeError):
            row_id = f"#{index}"
        try:
            row = parse_row(text, index)
            row_id = row.id
            return self.render(row)
        except FaceIdError as exc:
            return {"id": row_id, "index": index, "status": "error", "error": f"{exc.code}: {exc.message}",
                    "output_uri": None, "key": None, "seed": None, "cached": False, "similarity": None,
                    "face_found": None, "leakage": None, "scores": None, "provenance": None}

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
        steps, guidance = row.steps or self.config.steps, row.guidance if row.guidance is not None else self.config.guidance
        sampler = row.sampler()
        conditions = self.conditions(row)
        if row.inpaint:
            from ray_faceid.pipelines.inpaint import inpaint

            result = inpaint(self.pipeline, decode_image(image_bytes), decode_image(mask_bytes),
                             conditions[0] if conditions else None, row.prompt, row.negative_prompt, row.seed, steps,
                             guidance, row.feather_or(self.config.feather), sampler=sampler,
                             identity_start=row.identity_start or 0)
        else:
            from ray_faceid.pipelines.generate import GenerationItem

            width, height = row.dimensions(self.config.size)
            item = GenerationItem(row.prompt, conditions, row.negative_prompt, row.seed, row.identity_start or 0)
            result = self.pipeline.generate_items([item], steps, guidance, width, height, sampler)
        return self._commit(row, key, png_uri, record_uri, result.images[0], result.provenance[0])

    def _commit(self, row: CatalogRow, key: str, png_uri: str, record_uri: str, image, provenance: dict) -> dict:
        """Score the row's image and write it (its provenance naming the row that made it), then its record."""
        from ray_faceid.eval.identity import score_output
        from ray_faceid.pipelines.provenance import png_with_provenance

        provenance = dict(provenance, render_row=row.id)  # which catalog row, for whoever holds the PNG alone
        png = png_with_provenance(image, provenance)
        faces = self.analyzer.analyze(np.asarray(image))
        references = {i.id: self.identity(i.id)["scoring"] for i in row.identities}
        scores = score_output(faces, {k: v for k, v in references.items() if v is not None})
        # People without the face stack's embeddings are left out of the scores, and named: a
        # similarity of None must not read as "their face was not found".
        scores["unscored"] = [self.identity(k)["id"] for k, v in references.items() if v is None]
        record = {"id": row.id, "index": None, "status": "ok", "error": None, "output_uri": png_uri, "key": key,
                  "seed": row.seed, "cached": False, "similarity": scores["similarity"], "face_found": scores["face_found"],
                  "leakage": scores["leakage"], "scores": json.dumps(scores), "provenance": json.dumps(provenance),
                  "identity_ids": [self.identity(i.id)["id"] for i in row.identities]}  # what erasure looks for
        storage.write_bytes(png_uri, png)
        storage.write_bytes(record_uri, json.dumps(record).encode())  # last: the row is done
        return record

    def render_batch(self, texts: list[str], indices: list[int]) -> list[dict]:
        if self.config.unet_batch == 1:
            return [{**self.render_text(t, i), "index": i} for t, i in zip(texts, indices)]
        return self._render_grouped(texts, indices)

    def _render_grouped(self, texts: list[str], indices: list[int]) -> list[dict]:
        """Generate rows that can share a UNet batch (same size, steps, guidance, scheduler, identity
        count and per-identity weights) are denoised together; the others go one by one."""
        from ray_faceid.pipelines.generate import GenerationItem, check_identity_start

        records: dict[int, dict] = {}
        groups: dict[tuple, list] = {}
        for text, index in zip(texts, indices):
            try:
                row = parse_row(text, index)
                if row.inpaint:
                    records[index] = self.render_text(text, index)
                    continue
                key = self.key(row, [])
                png_uri, record_uri = output_uris(self.out, row.id, key)
                if storage.exists(record_uri):
                    records[index] = {**json.loads(storage.read_bytes(record_uri)), "cached": True}
                    continue
                conditions = self.conditions(row)
                self.pipeline.check_people(conditions)  # a row its people cannot share fails alone, before any batch
                shape = (row.dimensions(self.config.size), row.steps or self.config.steps,
                         row.guidance if row.guidance is not None else self.config.guidance, len(conditions),
                         row.sampler(), row.true_cfg or 1.0)
                check_identity_start([GenerationItem(row.prompt, conditions, identity_start=row.identity_start or 0)],
                                     shape[1])  # its own error, not its batch's
                groups.setdefault(shape, []).append((index, row, key, png_uri, record_uri, conditions))
            except FaceIdError:
                records[index] = self.render_text(text, index)
        for (size, steps, guidance, _, sampler, true_cfg), members in groups.items():
            for start in range(0, len(members), self.config.unet_batch):
                chunk = members[start : start + self.config.unet_batch]
                items = [GenerationItem(r.prompt, c, r.negative_prompt, r.seed, r.identity_start or 0)
                         for _, r, _, _, _, c in chunk]
                try:
                    more = {"true_cfg": true_cfg} if true_cfg != 1 else {}  # FLUX's alone (UNet rows refuse it)
                    result = self.pipeline.generate_items(items, steps, guidance, *size, sampler, **more)
                except BadInput:
                    for index, row, *_ in chunk:
                        records[index] = self.render_text(row.model_dump_json(), index)
                    continue
                for k, (index, row, key, png_uri, record_uri, _) in enumerate(chunk):
                    records[index] = self._commit(row, key, png_uri, record_uri, result.images[k],
                                                  result.provenance[k])
        return [{**records[i], "index": i} for i in indices]
