"""Generator deployment: the base pipeline loaded once per replica; identities (embeddings, read
from the registry) multiplexed with LRU eviction; requests batched: those of the same size, steps
and identity count are denoised together, one UNet call per step for all their images. With the
torch.compile backend every configured shape is compiled (or loaded from the engine cache)
before the replica is ready, and batches are padded up to the compiled batch buckets.

Errors are returned as {"error", "message", "status"} so the ingress can answer 4xx precisely.
A request whose caller went away (the client disconnected) stops at the next denoising step: the
pipeline's step callback checks whether anyone still waits for the images being made. Batches run
concurrently up to the pipeline, which takes turns (turns.py): a large job lets small ones run
between its steps.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
import time
import weakref

import numpy as np
import torch
from ray import serve

from deployments import multiplex
from deployments.memory import replica_memory
from deployments.schemas import TAKEN_UNSAID
from deployments.turns import PipelineTurns
from ray_faceid.config import ServeConfig
from ray_faceid.errors import BadInput, EncoderMismatch, Erased, FaceIdError, NotFound
from ray_faceid.identity.personalization import version_of
from ray_faceid.registry import newest_adapter
from ray_faceid.registry_secret import never_create_here

PROGRESS_EVERY_S = 0.25


def served_line(pipeline) -> str:
    """What a deployment serves, for the people who use its page: the base, and which identity
    adapter (a published file: its kind, file and licence)."""
    adapter = pipeline.adapter
    if adapter is None:
        identity = "no identity adapter: prompts only"
    elif adapter.published:
        p = adapter.published
        identity = f"{p['kind']} ({p['variant']}) from {p['file']}; licence: {p['licence']}"
    else:
        identity = (f"identity adapter {pipeline.adapter_hash[:12]}, "
                    + (f"{adapter.trained_steps} steps trained" if adapter.trained_steps else "untrained"))
    base = str(pipeline.base.model_id).rstrip("/").rsplit("/", 1)[-1]  # a name: tenants never see server paths
    return f"Serving {base} with {identity}."


class LoadedIdentity:
    def __init__(self, key: str, embeddings: np.ndarray, quality: np.ndarray, spec, personal=None,
                 image_features: np.ndarray | None = None):
        self.key, self.embeddings, self.quality = key, embeddings, quality
        self.image_features = image_features
        """FaceID-Plus: the CLIP features of the person's reference crops."""
        self.spec, self.spec_key = spec, spec.key()
        self.personal = personal
        """(version, weight delta) of the identity's own adapter for this replica's shared adapter."""
        self.loaded_at = time.time()


class Cancelled(FaceIdError):
    """Every caller of a running denoise went away: it stopped between steps."""

    status = 499
    code = "cancelled"


def start_of(request: dict) -> int:
    """The step a request's identity starts at (the service sends it; 0 where a caller leaves it out)."""
    return request.get("identity_start", 0)


def sampler_of(request: dict):
    """The request's scheduler (schedulers.py): a bad name or setting fails its own group in one line."""
    from ray_faceid.pipelines.schedulers import Sampler

    return Sampler.parse(request.get("scheduler"), request.get("scheduler_config") or {}, where="scheduler")


def true_cfg(request: dict) -> float:
    return request.get("true_cfg", 1.0)  # requests made before it existed (and inpaint's): off


def failure_body(exc: Exception) -> dict:
    """The error body of one request that failed: typed errors as they are; anything else (a bug, a
    store that broke mid-read) a 500 of that request alone, logged with its traceback."""
    if isinstance(exc, FaceIdError):
        return {"error": exc.code, "message": exc.message, "status": exc.status}
    logging.getLogger("ray.serve").error("a generate request failed", exc_info=exc)
    return {"error": "internal_error", "status": 500,
            "message": f"this request failed on the generator ({type(exc).__name__}); it is logged there, and the "
                       "requests batched with it were not affected"}


def step_callback(requests: list[dict], turns: PipelineTurns | None):
    """Between two denoising steps: stop once every request of the job was cancelled; a large job
    (`turns` given) then lets waiting small jobs run."""

    def check(step: int, total: int) -> None:
        for r in requests:  # read by generate_stream
            r["progress"] = (step, total)
        if all(r["cancelled"].is_set() for r in requests):
            raise Cancelled(f"the caller went away; stopped after {step} of {total} steps")
        if turns is not None and 0 < step < total:
            turns.between_steps()

    return check


class Generator:
    def __init__(self, config_json: str):
        from ray_faceid.face.analyzer import FaceAnalyzer
        from ray_faceid.identity.adapter import NO_ADAPTER, shared_adapter
        from ray_faceid.identity.face_plus import attach_image_encoder
        from ray_faceid.identity.instantid import attach_identitynet
        from ray_faceid.pipelines.edit_modules import load_edit_modules
        from ray_faceid.pipelines.generate import IdentityPipeline
        from ray_faceid.pipelines.models import load_base

        self.config = ServeConfig.model_validate_json(config_json)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        never_create_here()  # the registry secret comes from the cluster's configuration (registry_secret.py)
        base = load_base(self.config.model)
        # Identities are checked against the adapter's encoder spec when they are used. A real base
        # without an adapter is refused when the config is read (deployments/app.py).
        adapter = shared_adapter(self.config.adapter, base, None if self.config.adapter else
                                 FaceAnalyzer(self.config.face).spec)
        if adapter is not None and adapter.published and not adapter.takes(FaceAnalyzer(self.config.face).spec):
            raise EncoderMismatch(f"{self.config.adapter} takes {adapter.encoder_spec.dim}-d insightface ArcFace "
                                  "embeddings: set face.backend: insightface and face.insightface_root in the Serve config")
        attach_image_encoder(adapter, self.config.image_encoder, device, "image_encoder in the Serve config")
        if adapter is None and self.config.backend != "torch":
            raise BadInput(NO_ADAPTER.format(model=self.config.model) + "; compiled engines are built around one")
        imr, flow = load_edit_modules(adapter, self.config.imr, self.config.flow)  # before the cast
        self.pipeline = IdentityPipeline(base, adapter, imr, device=device, backend=self.config.backend,
                                         precision=self.config.precision, flow=flow)
        attach_identitynet(self.pipeline, self.config.identitynet, self.config.identitynet_scale,
                           "identitynet in the Serve config")
        self.warm_up_report = self._warm_up()  # in __init__: Serve routes nothing to a replica still compiling
        self.pipeline.compile_new_shapes = False  # an unwarmed size runs eager: no request waits for a compile
        self._serving_state()

    def _serving_state(self) -> None:
        """The replica's registry, identity cache, erasure bookkeeping and batching, once its pipeline is loaded."""
        from ray_faceid.registry import Registry

        self.registry = Registry(self.config.registry)
        self.adapter_hash = self.pipeline.adapter_hash
        self.loads, self.cancelled = 0, 0
        self.turns = PipelineTurns()
        self.load_identity = multiplex.identity_cache(self._load_identity, self.config.identities_per_replica)
        # What this replica holds of each person, for the erasure sweep (Serve's LRU owns the objects).
        self.held: weakref.WeakValueDictionary[str, LoadedIdentity] = weakref.WeakValueDictionary()
        self.versions_of: dict[str, set[str]] = {}  # identity key -> own-adapter versions it ever loaded
        self._sweeper: asyncio.Task | None = None
        self.generate_batch.set_max_batch_size(self.config.generator_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def _warm_up(self) -> dict:
        """Build every configured (size, identity count, batch bucket) engine of the backend (torch: none)."""
        from ray_faceid.pipelines.generate import parse_size

        sizes = [parse_size(size, "warm_up_sizes") for size in self.config.warm_up_sizes]
        sizes = sizes or [self.pipeline.base.native_size]  # the family's own size
        # A batch holds up to generator_batch_size requests of up to max_images images each.
        most_images = self.config.generator_batch_size * self.config.limits.max_images
        started = time.perf_counter()
        report = self.pipeline.warm_up(sizes, self.config.warm_up_identities, most_images, self.config.warm_up_photos)
        return dict(report, seconds=round(time.perf_counter() - started, 1))

    def ping(self) -> bool:
        return True

    def memory(self, reset_peak: bool = False) -> dict:
        return replica_memory(reset_peak)

    def defaults(self) -> dict:
        """Steps, guidance and size of requests that do not say: the deployment's, else the base model's own."""
        base = self.pipeline.base
        width, height = base.native_size
        return {"steps": self.config.steps or base.default_steps, "width": width, "height": height,
                "guidance": base.default_guidance if self.config.guidance is None else self.config.guidance,
                "served": served_line(self.pipeline), "controls": self.controls()}

    def controls(self) -> dict[str, bool]:
        """Which of a request's settings and actions this deployment takes: the page shows only these."""
        adapter = self.pipeline.adapter  # InstantID's IdentityNet draws the face at every step: no later start
        return dict(TAKEN_UNSAID, identity_start=not (adapter is not None and adapter.kind.identitynet))

    def info(self) -> dict:
        return {"model": self.pipeline.base.model_id, "adapter": self.adapter_hash,
                "adapter_trained_steps": None if self.pipeline.adapter is None else self.pipeline.adapter.trained_steps,
                "adapter_published": None if self.pipeline.adapter is None else self.pipeline.adapter.published,
                "identity_loads": self.loads,
                "backend": self.pipeline.backend, "warm_up": self.warm_up_report, "cancelled": self.cancelled,
                "lent_to_small_requests": self.turns.lent,
                "imr": getattr(self.pipeline.imr, "weights_hash", None),
                "flow": getattr(self.pipeline.flow, "weights_hash", None)}

    async def _load_identity(self, key: str) -> LoadedIdentity:
        tenant, identity = multiplex.split_key(key)
        from ray_faceid.identity.personalization import load_personal

        adapter = self.pipeline.adapter  # embeddings it takes: the enrollment's or added by `identities embed`
        embeddings, quality, spec = self.registry.embeddings(tenant, identity,
                                                             accept=None if adapter is None else adapter.takes)
        self.loads += 1
        personal = load_personal(self.registry, tenant, identity, self.adapter_hash, adapter)
        encoder = self.pipeline.adapter.image_encoder if self.pipeline.adapter is not None else None
        features = None if encoder is None else await asyncio.to_thread(
            encoder.enrolled_features, self.registry.references(tenant, identity))
        loaded = LoadedIdentity(key, embeddings, quality, spec, personal, features)
        self.held[key] = loaded
        self._note_version(key, personal)
        return loaded

    def _refresh_personal(self, tenant: str, identity: str, meta: dict, key: str, loaded: LoadedIdentity) -> None:
        """A per-identity adapter newer than the one this replica cached with the identity replaces it."""
        from ray_faceid.identity.personalization import load_personal, made_with

        newest = newest_adapter(meta, self.adapter_hash, made_with=made_with(self.pipeline.adapter))
        if (newest and newest["version"]) != (loaded.personal and version_of(loaded.personal[0])):
            loaded.personal = load_personal(self.registry, tenant, identity, self.adapter_hash, self.pipeline.adapter)
            self._note_version(key, loaded.personal)

    def _note_version(self, key: str, personal) -> None:
        """Which adapter versions of whom the pipeline may hold (device bank, engines): an erasure
        must find them even after Serve's LRU dropped the loaded identity."""
        if personal is not None:
            self.versions_of.setdefault(key, set()).add(personal[0])

    def forget_erased(self) -> int:
        """Finish erasures that stopped midway, then drop the embeddings and adapters this replica
        holds of identities erased since it loaded them (an erased person leaves no copy in a
        replica's memory either). Returns how many it dropped."""
        from ray_faceid.erasure import resume_pending

        try:
            resume_pending(self.registry)
        except Exception:  # noqa: BLE001 - an erasure it cannot finish must not keep others in memory
            logging.getLogger("ray.serve").warning("finishing a stopped erasure failed; retrying", exc_info=True)
        forgotten = 0
        for key in set(self.held) | set(self.versions_of):
            try:
                self.registry.get(*multiplex.split_key(key))
                continue
            except (Erased, NotFound):
                pass
            for version in self.versions_of.pop(key, set()):  # in the device bank or an engine
                self.pipeline.forget_personal(version)
            loaded = self.held.pop(key, None)
            if loaded is not None:
                loaded.embeddings = loaded.quality = loaded.personal = loaded.image_features = None
                forgotten += 1
        return forgotten

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.erasure_sweep_s)
            try:
                await asyncio.to_thread(self.forget_erased)
            except Exception:  # noqa: BLE001 - a store that cannot be read now is read again next time
                logging.getLogger("ray.serve").warning("erasure sweep failed; retrying", exc_info=True)

    async def _conditions(self, tenant: str, requested: list[dict]):
        from ray_faceid.identity.adapter import NO_ADAPTER
        from ray_faceid.pipelines.generate import IdentityCondition

        if requested and self.pipeline.adapter is None:
            raise BadInput(NO_ADAPTER.format(model=self.config.model))

        conditions, hits = [], 0
        for item in requested:
            key = multiplex.identity_key(tenant, item["id"])
            meta = self.registry.get(tenant, item["id"])  # a deleted identity is never served from the cache
            before = self.loads
            loaded = await self.load_identity(key)
            self._refresh_personal(tenant, item["id"], meta, key, loaded)
            hits += self.loads == before
            expected = self.pipeline.adapter.encoder_spec.key()
            if not self.pipeline.adapter.takes(loaded.spec):
                raise EncoderMismatch(f"identity {item['id']} was enrolled with {loaded.spec_key}; "
                                      f"this generator's adapter needs {expected}: re-enroll the identity")
            edits = item.get("edits")
            if edits:  # per request, so one request's bad edit never fails the batch it joins
                self.pipeline.check_edits(item["id"], edits)
            conditions.append(IdentityCondition(meta.get("name") or item["id"], loaded.embeddings, loaded.quality,
                                                item.get("region"), item.get("expression"), item.get("scale", 1.0),
                                                loaded.personal, edits=edits, id=item["id"],
                                                image_features=loaded.image_features, pose=item.get("pose"),
                                                encoder=loaded.spec_key))
        return conditions, hits

    @staticmethod
    def _refuse_unbuilt(request: dict) -> None:
        """What this base does not take, refused for its request alone (FluxServeGenerator: FLUX's list)."""
        if true_cfg(request) != 1:
            raise BadInput("true_cfg: for FLUX bases; this deployment's base guides with guidance (classifier-free "
                           "guidance runs already)")

    def _denoiser_call(self, request: dict):
        """What denoises a group of generate requests like `request` (FLUX's adds its true CFG)."""
        return self.pipeline.generate_items

    async def _inpaint(self, request: dict) -> dict:
        from ray_faceid.face.decode import decode_image
        from ray_faceid.pipelines.inpaint import inpaint

        conditions, hits = await self._conditions(request["tenant"], request["identities"])
        decode = self.config.limits.decode()
        image, mask = decode_image(request["image"], decode), decode_image(request["mask"], decode)
        width, height = self.pipeline.base.native_size  # inpainting denoises at most at the native size
        repaint = functools.partial(inpaint, sampler=sampler_of(request), identity_start=start_of(request))
        result = await self._run([request], width * height * request["steps"], repaint, self.pipeline, image, mask,
                                 conditions[0], request["prompt"], request["negative_prompt"], request["seed"],
                                 request["steps"], request["guidance"], request["feather"])
        return self._response(result.png, result.provenance, result.seeds, hits, len(conditions))

    async def _run(self, requests: list[dict], cost: int, fn, *args):
        """`fn(*args)` on a worker thread when the pipeline is this job's (turns.py), stopped between
        denoising steps once all `requests` are cancelled. `cost` in pixel-steps decides whether the
        job is small (it may run inside a large job's pause) or large (it lends the pipeline)."""
        small = cost <= self.config.limits.small_request_cost

        def job():
            borrowed = self.turns.acquire(small)
            try:
                self.pipeline.on_step = step_callback(requests, None if small else self.turns)
                return fn(*args)
            finally:
                self.turns.release(borrowed)

        try:
            return await asyncio.to_thread(job)
        except Cancelled:
            self.cancelled += 1
            raise

    @staticmethod
    def _response(png, provenance, seeds, hits: int, lookups: int) -> dict:
        return {"png": [base64.b64encode(p).decode() for p in png], "provenance": provenance, "seeds": seeds,
                "cache_hits": hits, "cache_misses": lookups - hits}

    async def _generate_group(self, requests: list[dict]) -> list[dict]:
        """Requests of the same size, steps, guidance, scheduler, true CFG and identity count: one denoiser
        batch for all their images; what the base does not take, or a request's people, fail it alone."""
        from ray_faceid.pipelines.generate import GenerationItem, check_identity_start

        out: list[dict | None] = [None] * len(requests)
        items, owners, lookups = [], [], {}
        for i, r in enumerate(requests):
            try:
                self._refuse_unbuilt(r)
                conditions, hits = await self._conditions(r["tenant"], r["identities"])
                self.pipeline.check_people(conditions)
                check_identity_start([GenerationItem(r["prompt"], conditions, identity_start=start_of(r))], r["steps"])
            except Exception as exc:  # noqa: BLE001 - one request's damaged record or people fail that request alone
                out[i] = failure_body(exc)
                continue
            lookups[i] = (hits, len(conditions))
            for k in range(r["num_images"]):
                items.append(GenerationItem(r["prompt"], conditions, r["negative_prompt"], r["seed"] + k, start_of(r)))
                owners.append(i)
        # People with and without their own adapters share the UNet batch: each row carries its own
        # weights (identity/personal_bank.py); the pipeline splits only what its engine cannot mix.
        png, provenance, seeds = [None] * len(items), [None] * len(items), [None] * len(items)
        if items:
            first = requests[owners[0]]
            cost = first["width"] * first["height"] * first["steps"] * len(items) * (2 if true_cfg(first) > 1 else 1)
            try:
                result = await self._run([requests[i] for i in lookups], cost, self._denoiser_call(first), items,
                                         first["steps"], first["guidance"], first["width"], first["height"],
                                         sampler_of(first))
            except Cancelled as exc:
                result = None
                for i in lookups:
                    out[i] = {"error": exc.code, "message": exc.message, "status": exc.status}
            except Exception as exc:  # noqa: BLE001 - the batch's failure is its requests'; refused ones keep theirs
                result = None
                for i in lookups:
                    out[i] = failure_body(exc)
            if result is not None:
                png, provenance, seeds = result.png, result.provenance, result.seeds
        for i, (hits, count) in lookups.items():
            if out[i] is not None:
                continue
            mine = [k for k, owner in enumerate(owners) if owner == i]
            out[i] = self._response([png[k] for k in mine], [provenance[k] for k in mine], [seeds[k] for k in mine],
                                    hits, count)
        return out

    # Two batches at once: a large one and the small ones that run in its pauses (turns.py); with
    # max_ongoing_requests = 2 x batch size, Serve never has more to hand a replica.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=2)
    async def generate_batch(self, requests: list[dict]) -> list[dict]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = ("inpaint", i) if r["kind"] == "inpaint" else (
                r["steps"], r["guidance"], r["width"], r["height"], len(r["identities"]), r.get("scheduler"),
                tuple(sorted((r.get("scheduler_config") or {}).items())), true_cfg(r))
            groups.setdefault(key, []).append(i)
        results: list[dict] = [{}] * len(requests)
        for key, members in groups.items():
            try:
                if key[0] == "inpaint":
                    found = [await self._inpaint(requests[members[0]])]
                else:
                    found = await self._generate_group([requests[i] for i in members])
            except Exception as exc:  # noqa: BLE001 - this group's requests fail; the batch's other groups keep theirs
                found = [failure_body(exc)] * len(members)
            for i, res in zip(members, found):
                results[i] = dict(res, batch_size=len(requests))
        return results

    async def generate(self, request: dict) -> dict:
        if self._sweeper is None:  # started from a request: the replica's event loop runs it
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        request = dict(request, cancelled=threading.Event())
        try:
            return await self.generate_batch(request)
        except asyncio.CancelledError:  # the ingress's call was cancelled: its client disconnected
            request["cancelled"].set()
            raise

    async def generate_stream(self, request: dict):
        """`generate`, streamed: {"progress": (step, total)} as the denoising advances (at most every
        PROGRESS_EVERY_S), then the result. The request is batched like any other."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        request = dict(request, cancelled=threading.Event(), progress=None)
        result = asyncio.ensure_future(self.generate_batch(request))
        try:
            shown = None
            while not result.done():
                await asyncio.wait({result}, timeout=PROGRESS_EVERY_S)
                if request["progress"] not in (None, shown) and not result.done():
                    shown = request["progress"]
                    yield {"progress": shown}
            yield result.result()
        except (asyncio.CancelledError, GeneratorExit):  # the caller cancelled or went away
            request["cancelled"].set()
            result.cancel()
            raise
