"""The service: every operation of the API as a plain step that takes a tenant and a validated
request and returns a typed result or raises a typed error (ray_faceid/errors.py).

Two faces sit on it and neither imports the other: the HTTP ingress (ingress.py) and the web page
(web_page.py). Whatever a step refuses, it refuses with one message, the same on both faces.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import re
import secrets
from typing import Callable

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from deployments import auth, metrics, multiplex
from deployments.off_loop import OffLoop
from deployments.schemas import (
    ErasureReport,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    IdentityList,
    IdentityOut,
    IdentityScore,
    InpaintRequest,
    PhotoReport,
)
from ray_faceid.config import ServeConfig
from ray_faceid.enrollment import rejection
from ray_faceid.errors import BadInput, FaceIdError, NameTaken
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.registry import Registry
from ray_faceid.registry_secret import keys_for, never_create_here

log = logging.getLogger("ray.serve")
_STORAGE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+[^\s'\",;)]*")
UNAUTHORIZED = ("missing or invalid bearer token: give the API token `ray-faceid serve` printed (over HTTP as "
                "Authorization: Bearer <token>; on the page in its API token field)")


class Unauthorized(FaceIdError):
    status = 401
    code = "unauthorized"


class Busy(FaceIdError):
    """The Generator's queue is full: retry later (503 with Retry-After)."""

    status = 503
    code = "busy"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def public_message(message: str) -> str:
    """A message as a client sees it: storage paths and URIs replaced."""
    return _STORAGE.sub("<storage>", message)


def file_name(name: str | None) -> str | None:
    """A photo's file name without its folders: people enrolled from the CLI or a dataset have
    server paths (or storage URIs) there, and answers never hold either."""
    return None if name is None else re.split(r"[/\\]", name.rstrip("/\\"))[-1]


def identity_out(meta: dict) -> IdentityOut:
    spec = meta["encoder"]
    photos = [PhotoReport(**{**p, "filename": file_name(p.get("filename"))}) for p in meta.get("photos", [])]
    return IdentityOut(id=meta["id"], name=meta["name"], created=meta["created"], updated=meta["updated"],
                       encoder=f"{spec['name']}/{spec['dim']}/{spec['version']}", faces_used=meta["faces_used"],
                       consent=meta["consent"], photos=photos)


@dataclasses.dataclass
class EnrollmentDraft:
    """What enrollment found in the photos, before anything is saved (the web page shows it first)."""

    reports: list[PhotoReport] = dataclasses.field(default_factory=list)
    embeddings: list = dataclasses.field(default_factory=list)
    quality: list[float] = dataclasses.field(default_factory=list)
    crops: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RenderOutputView:
    """One render output as a tenant may see it: no storage path in any figure or error."""

    sheet_png: bytes | None
    figures: dict[str, str]
    failed: list[tuple[str, str]]


async def _streamed(handle, payload: dict, on_progress) -> dict:
    """The Generator's streamed call: progress events, then the result. Cancelling the caller
    cancels the stream, and the Generator stops at its next step (as for a disconnected client)."""
    stream = handle.options(stream=True).generate_stream.remote(payload)
    try:
        async for event in stream:
            if "progress" not in event:
                return event
            on_progress(*event["progress"])
    except asyncio.CancelledError:
        stream.cancel()
        raise
    raise RuntimeError("the generator's stream ended without a result")


def _remote_error(result: dict) -> None:
    if "error" in result:
        exc = FaceIdError(result["message"])
        exc.status, exc.code = result["status"], result["error"]
        raise exc


def sampling(body, config: ServeConfig) -> dict:
    """A request's scheduler, or the deployment's where it names none; checked by the generator (its
    replica has diffusers; the service does not load it): requests of different schedulers are never
    denoised together."""
    if body.scheduler is None and not body.scheduler_config:
        return {"scheduler": config.scheduler, "scheduler_config": dict(config.scheduler_config)}
    return {"scheduler": body.scheduler, "scheduler_config": dict(body.scheduler_config)}


def _guidance(body, defaults: dict) -> float:
    """A request's guidance, or the deployment's (else the model's own) where it names none: 0 is a
    guidance asked for, not a missing one."""
    return defaults["guidance"] if body.guidance is None else body.guidance


class FaceService:
    """The steps behind both faces, on one Ingress replica: the registry (off the event loop), the
    FaceEncoder and Generator handles, the limits."""

    def __init__(self, config: ServeConfig, face_encoder, generator):
        self.config = config
        self.tokens = dict(config.api_tokens)
        if not self.tokens:
            raise BadInput("no API token configured; the API never runs open (ray-faceid serve generates one)")
        self.face, self.generator = face_encoder, generator
        self.store = Registry(config.registry)
        never_create_here()
        keys_for(config.registry)  # no replica serves a registry whose secret is missing or wrong
        self.registry = OffLoop(self.store)  # `await self.registry.get(...)`: off the event loop
        self.spec: EncoderSpec | None = None
        self.model_defaults: dict | None = None
        # Called with the tenant after each erasure (the page's copies of uploads and answers).
        self.after_erasure: list[Callable[[str], None]] = []

    # -- who, and what the deployment serves -------------------------------------------------------
    def tenant(self, authorization: str | None) -> str:
        """The tenant of an `Authorization` header's value ("Bearer <token>")."""
        tenant = auth.tenant_for(authorization, self.tokens)
        if tenant is None:
            raise Unauthorized(UNAUTHORIZED)
        return tenant

    @property
    def sampler_names(self) -> list[str]:
        """The samplers a request may name by their short names (any diffusers class name works too)."""
        from ray_faceid.pipelines.schedulers import SHORT_NAMES

        return list(SHORT_NAMES)

    async def defaults(self) -> dict:
        """The base model's own steps and size (for requests that leave them out), and what it serves."""
        if self.model_defaults is None:
            self.model_defaults = await self.generator.defaults.remote()
        return self.model_defaults

    async def encoder_spec(self) -> EncoderSpec:
        if self.spec is None:
            self.spec = EncoderSpec(**await self.face.spec.remote())
        return self.spec

    async def _analyze(self, data: bytes) -> dict:
        result = await self.face.analyze.remote(data)
        if "batch_size" in result:
            metrics.BATCH_SIZE.labels("face_encoder").observe(result["batch_size"])
        return result

    def check_size(self, size: int | None, what: str) -> None:
        """An upload within the limit, checked from its size (a file spooled to disk: before it is read)."""
        if size is not None and size > self.config.limits.max_upload_bytes:
            raise BadInput(f"{what} is {size} bytes; the limit is {self.config.limits.max_upload_bytes}")
        if size == 0:
            raise BadInput(f"{what} is empty")

    def check_count(self, count: int) -> None:
        if not 1 <= count <= self.config.limits.max_photos:
            raise BadInput(f"give between 1 and {self.config.limits.max_photos} photos of the person, got {count}")

    # -- people --------------------------------------------------------------------------------
    async def check_enrollment(self, tenant: str, count: int, name: str, consent: str,
                               name_exists: str = "refuse") -> None:
        """What an enrollment is refused for before any photo is read or analysed."""
        if name.strip() and name_exists == "refuse" and await self.registry.named(tenant, name):
            raise NameTaken(f"the name {name.strip()!r} is taken: enroll under another name (the API also takes "
                            "name_exists=rename for a suffix, or replace to erase the other identity)")
        self.check_count(count)
        if not consent.strip():
            raise BadInput("consent is required: a reference to the person's recorded consent")

    async def enroll(self, tenant: str, uploads: list[tuple[str, bytes]], name: str, consent: str,
                     name_exists: str = "refuse", reconsent: str = "", checked: bool = False) -> IdentityOut:
        """A person from (file name, bytes) photos: every photo analysed and judged, then saved.
        `checked`: the caller ran `check_enrollment` on this request already (before reading uploads)."""
        if not checked:
            await self.check_enrollment(tenant, len(uploads), name, consent, name_exists)
        draft = await self.examine_photos(uploads)
        return identity_out(await self.save_enrollment(tenant, draft, name, consent, name_exists, reconsent))

    async def examine_photos(self, uploads: list[tuple[str, bytes]]) -> EnrollmentDraft:
        """Each photo analysed and judged as enrollment judges it; nothing is saved."""
        from ray_faceid.face.decode import decode_image

        self.check_count(len(uploads))
        draft = EnrollmentDraft()
        for i, (filename, data) in enumerate(uploads):
            self.check_size(len(data), f"photo {filename}")
            result = await self._analyze(data)
            report = PhotoReport(index=i, filename=file_name(filename) or f"photo{i}", accepted=False)
            faces = result.get("faces", [])
            report.reason = result["message"] if "error" in result else rejection(faces, self.config.limits)
            if len(faces) == 1:
                q = faces[0]["quality"]
                report.quality, report.face_px, report.sharpness = q["score"], q["face_px"], q["sharpness"]
            if report.reason is None:
                report.accepted = True
                draft.embeddings.append(faces[0]["embedding"])
                draft.quality.append(faces[0]["quality"]["score"])
                draft.crops.append(decode_image(faces[0]["crop_png"]))
            draft.reports.append(report)
        return draft

    async def save_enrollment(self, tenant: str, draft: EnrollmentDraft, name: str, consent: str,
                              name_exists: str = "refuse", reconsent: str = "") -> dict:
        if not draft.embeddings:
            reasons = "; ".join(f"{r.filename}: {r.reason}" for r in draft.reports)
            raise BadInput(f"no usable photo ({reasons})")
        if not consent.strip():
            raise BadInput("consent is required: a reference to the person's recorded consent")
        return await self.registry.create(tenant, name or "", consent, np.array(draft.embeddings),
                                          np.array(draft.quality), await self.encoder_spec(), draft.crops,
                                          [r.model_dump() for r in draft.reports], name_exists=name_exists,
                                          reconsent=reconsent or None)

    async def people(self, tenant: str) -> list[dict]:
        """Everyone the tenant enrolled (the registry's records, sorted by id)."""
        return await self.registry.list(tenant)

    async def list_identities(self, tenant: str, limit: int = 100, after: str | None = None) -> IdentityList:
        everyone = await self.people(tenant)
        page = [m for m in everyone if after is None or m["id"] > after][:limit]
        more = len(page) == limit and page and page[-1]["id"] != everyone[-1]["id"]
        return IdentityList(identities=[identity_out(m) for m in page], next=page[-1]["id"] if more else None)

    async def identity(self, tenant: str, reference: str) -> IdentityOut:
        """One person by id or name (404 for unknown ones and for other tenants' ids)."""
        return identity_out(await self.registry.get(tenant, await self.registry.resolve(tenant, reference)))

    async def references(self, tenant: str, identity: str) -> list[np.ndarray]:
        """The person's aligned reference crops (the registry reads only the tenant's own)."""
        return await self.registry.references(tenant, identity)

    async def erase(self, tenant: str, identity: str) -> ErasureReport:
        """Erase the person everywhere the system keeps them; says what was removed (storage folders
        are named by the last part of their path only)."""
        from ray_faceid.erasure import erase_identity

        try:
            report = await self.registry.call(erase_identity, self.store, tenant, identity)
        finally:  # an erasure stopped midway may have removed some of them: forget the page's copies anyway
            for forget in self.after_erasure:
                try:
                    forget(tenant)
                except Exception:  # noqa: BLE001 - one hook's failure neither hides the erasure nor skips the rest
                    log.exception("after erasure: %s failed", getattr(forget, "__qualname__", forget))
        removed = [dict(r, where=r["where"].rstrip("/").rsplit("/", 1)[-1]) for r in report["removed"]]
        return ErasureReport(id=report["id"], removed=removed)

    # -- generation ----------------------------------------------------------------------------
    def _validate_generation(self, steps: int, width: int = 64, height: int = 64, images: int = 1,
                             passes: int = 1) -> None:
        """`passes`: denoiser runs a step (2 with true CFG)."""
        limits = self.config.limits
        if steps > limits.max_steps:
            raise BadInput(f"steps {steps} is over the limit of {limits.max_steps}")
        if max(width, height) > limits.max_side or width % 8 or height % 8:
            raise BadInput(f"width and height must be multiples of 8 up to {limits.max_side}, got {width}x{height}")
        if images > limits.max_images:
            raise BadInput(f"num_images {images} is over the limit of {limits.max_images}")
        cost = width * height * steps * images * passes
        if cost > limits.max_cost:
            raise BadInput(f"this request is {cost} pixel-steps of work (width x height x steps x images"
                           f"{' x 2 for true CFG' if passes > 1 else ''}); the limit is {limits.max_cost}: ask for "
                           "fewer steps, a smaller size or fewer images")

    async def _score(self, png_b64: str, tenant: str, ids: list[str]) -> list[IdentityScore]:
        from ray_faceid.eval.identity import leakage, reference_embedding
        from ray_faceid.face.face import Face
        from ray_faceid.face.landmarks import INSIGHTFACE5, Landmarks

        spec = await self.encoder_spec()
        result = await self._analyze(base64.b64decode(png_b64))
        faces = [Face(bbox=tuple(f["bbox"]), score=f["score"], landmarks=Landmarks(INSIGHTFACE5, np.zeros((5, 2))),
                      embedding=np.array(f["embedding"])) for f in result.get("faces", [])]
        refs = {i: reference_embedding(*(await self.registry.embeddings(tenant, i, spec))[:2]) for i in ids}
        scores = []
        for s in leakage(faces, refs):
            same = None
            if s.face_found:  # the face `similarity` describes: the one matched to this identity
                same = bool(spec.distance(faces[s.face].embedding, refs[s.identity]) <= spec.threshold)
                metrics.IDENTITY_SCORE.observe(s.matched_similarity)
            scores.append(IdentityScore(id=s.identity, face_found=s.face_found, similarity=s.matched_similarity,
                                        same_person=same, wrong_identity_similarity=s.wrong_similarity))
        return scores

    async def _generate_once(self, handle, payload: dict, on_progress=None) -> dict:
        """One Generator call; a replica that dies mid-request (crash, preemption, scale-in) gets the
        request again on another: the seed fixes the image, so the retry is the same answer. With
        `on_progress(step, total)` the Generator streams its denoising steps to it."""
        limits = self.config.limits
        for attempt in range(2):
            try:
                if on_progress is None:
                    return await handle.generate.remote(payload)
                return await _streamed(handle, payload, on_progress)
            except BackPressureError:
                raise Busy(f"the generator is busy (its queue of {limits.generator_max_queued} is full): retry in "
                           f"{limits.retry_after_s} s", limits.retry_after_s) from None
            except RayActorError:
                log.warning("a Generator replica died during a request%s", "; retrying" if not attempt else " again")
        raise Busy(f"generator replicas failed twice during this request: retry in {limits.retry_after_s} s",
                   limits.retry_after_s)

    async def _generate_scored(self, tenant: str, payload: dict, ids: list[str], min_score: float | None,
                               on_progress=None) -> GenerateResponse:
        attempts, best = 0, None
        for attempt in range(self.config.limits.max_reseeds + 1 if min_score is not None else 1):
            attempts += 1
            payload = dict(payload, seed=payload["seed"] + attempt * 7919)
            handle = multiplex.for_identity(self.generator, tenant, ids[0])
            result = await self._generate_once(handle, payload, on_progress)
            metrics.BATCH_SIZE.labels("generator").observe(result.get("batch_size", 1))
            _remote_error(result)
            metrics.CACHE.labels("hit").inc(result["cache_hits"])
            metrics.CACHE.labels("miss").inc(result["cache_misses"])
            images = []
            for png, seed, record in zip(result["png"], result["seeds"], result["provenance"]):
                images.append(GeneratedImage(png_base64=png, seed=seed, scores=await self._score(png, tenant, ids),
                                             provenance=record))
            worst = min((s.similarity if s.similarity is not None else -1.0) for im in images for s in im.scores)
            if best is None or worst > best[0]:
                best = (worst, images)
            if min_score is None or worst >= min_score:
                break
        return GenerateResponse(images=best[1], attempts=attempts)

    async def generate(self, tenant: str, body: GenerateRequest, on_progress=None) -> GenerateResponse:
        defaults = await self.defaults()
        body = body.model_copy(update={k: getattr(body, k) or defaults[k] for k in ("steps", "width", "height")}
                               | {"guidance": _guidance(body, defaults)})
        self._validate_generation(body.steps, body.width, body.height, body.num_images, 2 if body.true_cfg > 1 else 1)
        # 404 for unknown names and ids, and for other tenants' ids.
        people = [dict(i.model_dump(), id=await self.registry.resolve(tenant, i.id or i.name)) for i in body.identities]
        ids = [p["id"] for p in people]
        if len(set(ids)) != len(ids):
            raise BadInput("an identity appears twice in one request")
        payload = {"kind": "generate", "tenant": tenant, "identities": people,
                   "prompt": body.prompt, "negative_prompt": body.negative_prompt,
                   "seed": body.seed if body.seed is not None else secrets.randbelow(2**31 - 10**6),
                   "steps": body.steps, "guidance": body.guidance, "width": body.width, "height": body.height,
                   "num_images": body.num_images, "identity_start": body.identity_start, "true_cfg": body.true_cfg,
                   **sampling(body, self.config)}
        return await self._generate_scored(tenant, payload, ids, body.min_identity_score, on_progress)

    async def inpaint(self, tenant: str, body: InpaintRequest, on_progress=None) -> GenerateResponse:
        defaults = await self.defaults()
        body = body.model_copy(update={"steps": body.steps or defaults["steps"], "guidance": _guidance(body, defaults)})
        # Inpainting denoises at most at the model's native size, whatever the photo's size.
        self._validate_generation(body.steps, defaults["width"], defaults["height"])
        person = dict(body.identity.model_dump(),
                      id=await self.registry.resolve(tenant, body.identity.id or body.identity.name))
        try:
            image, mask = base64.b64decode(body.image, validate=True), base64.b64decode(body.mask, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadInput("image and mask must be base64-encoded image files") from exc
        self.check_size(len(image), "image")
        self.check_size(len(mask), "mask")
        payload = {"kind": "inpaint", "tenant": tenant, "identities": [person],
                   "image": image, "mask": mask,
                   "prompt": body.prompt, "negative_prompt": body.negative_prompt,
                   "seed": body.seed if body.seed is not None else secrets.randbelow(2**31 - 10**6),
                   "steps": body.steps, "guidance": body.guidance, "feather": body.feather,
                   "identity_start": body.identity_start, **sampling(body, self.config)}
        return await self._generate_scored(tenant, payload, [person["id"]], body.min_identity_score, on_progress)

    # -- render outputs ------------------------------------------------------------------------
    async def render_outputs(self, tenant: str) -> list[str]:
        """The tenant's render outputs, by the last part of their storage path (in the order the
        registry keeps them: `render_output(tenant, k)` reads the k-th)."""
        return [uri.rstrip("/").rsplit("/", 1)[-1] for uri in await self.registry.outputs(tenant)]

    async def render_output(self, tenant: str, which: int | None) -> RenderOutputView:
        from ray_faceid.data.render_output import read_render_output

        outputs = await self.registry.outputs(tenant)
        if which is None or not 0 <= int(which) < len(outputs):
            raise BadInput("pick one of your render outputs (sign in again to refresh the list)")
        found = await self.registry.call(read_render_output, outputs[int(which)])
        return RenderOutputView(sheet_png=found.sheet_png,
                                figures={k: public_message(str(v)) for k, v in found.figures.items()},
                                failed=[(row, public_message(error)) for row, error in found.failed])

    async def ping(self) -> None:
        await self.face.ping.remote()
        await self.generator.ping.remote()
