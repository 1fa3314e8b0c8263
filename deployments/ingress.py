"""Ingress: the FastAPI app (OpenAPI at /docs). Auth, validation, enrollment into the registry,
generation through the Generator, scoring of every output through the FaceEncoder."""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import re
import secrets
import time
import uuid

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from deployments import auth, body_limit, metrics, multiplex, web_page
from deployments.memory import replica_memory
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
    errors,
)
from ray_faceid.config import ServeConfig
from ray_faceid.enrollment import rejection
from ray_faceid.erasure import erase_identity
from ray_faceid.errors import BadInput, FaceIdError, NameTaken
from ray_faceid.eval.identity import leakage, reference_embedding
from ray_faceid.face.face import Face
from ray_faceid.face.landmarks import INSIGHTFACE5, Landmarks
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.registry import Registry
from ray_faceid.registry_secret import keys_for, never_create_here

log = logging.getLogger("ray.serve")
api = FastAPI(title="ray_faceid", version="0.1.0",
              description="Enroll people from photos; render, inpaint and compose them with their identity preserved. "
              "Every error answer is {error, message, request_id}.")
api.add_middleware(body_limit.BodyLimit)
_STORAGE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+[^\s'\",;)]*")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


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


def _error(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error body. Storage paths and URIs never reach a client: they are logged with the request id."""
    rid = getattr(request.state, "request_id", None)
    public = public_message(message)
    if public != message or status >= 500:
        log.warning("request %s: %s %s: %s", rid, status, code, message)
    return JSONResponse({"error": code, "message": public, "request_id": rid}, status_code=status, headers=headers)


@api.exception_handler(FaceIdError)
async def _typed_error(request: Request, exc: FaceIdError):
    retry = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
    return _error(request, exc.status, exc.code, exc.message, retry)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """Routing and parsing errors (unknown path, wrong method, a body that cannot be parsed)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return _error(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    """The offending values are not echoed back: a NaN or an infinity in the request cannot be
    written as JSON (echoing it made a 500)."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return _error(request, 422, "invalid_request", problems)


def sampling(body, config: ServeConfig) -> dict:
    """A request's scheduler, or the deployment's where it names none; checked by the generator (its
    replica has diffusers; the ingress does not load it): requests of different schedulers are never
    denoised together."""
    if body.scheduler is None and not body.scheduler_config:
        return {"scheduler": config.scheduler, "scheduler_config": dict(config.scheduler_config)}
    return {"scheduler": body.scheduler, "scheduler_config": dict(body.scheduler_config)}


def _file_name(name: str | None) -> str | None:
    """A photo's file name without its folders: people enrolled from the CLI or a dataset have
    server paths (or storage URIs) there, and answers never hold either."""
    return None if name is None else re.split(r"[/\\]", name.rstrip("/\\"))[-1]


def _out(meta: dict) -> IdentityOut:
    spec = meta["encoder"]
    photos = [PhotoReport(**{**p, "filename": _file_name(p.get("filename"))}) for p in meta.get("photos", [])]
    return IdentityOut(id=meta["id"], name=meta["name"], created=meta["created"], updated=meta["updated"],
                       encoder=f"{spec['name']}/{spec['dim']}/{spec['version']}", faces_used=meta["faces_used"],
                       consent=meta["consent"], photos=photos)


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


@dataclasses.dataclass
class EnrollmentDraft:
    """What enrollment found in the photos, before anything is saved (the web page shows it first)."""

    reports: list[PhotoReport] = dataclasses.field(default_factory=list)
    embeddings: list = dataclasses.field(default_factory=list)
    quality: list[float] = dataclasses.field(default_factory=list)
    crops: list[np.ndarray] = dataclasses.field(default_factory=list)


def _remote_error(result: dict) -> None:
    if "error" in result:
        exc = FaceIdError(result["message"])
        exc.status, exc.code = result["status"], result["error"]
        raise exc


class Ingress:
    def __init__(self, face_encoder, generator, config_json: str):
        self.config = ServeConfig.model_validate_json(config_json)
        self.tokens = dict(self.config.api_tokens)
        if not self.tokens:
            raise BadInput("no API token configured; the API never runs open (ray-faceid serve generates one)")
        self.face, self.generator = face_encoder, generator
        self.store = Registry(self.config.registry)
        never_create_here()
        keys_for(self.config.registry)  # no replica serves a registry whose secret is missing or wrong
        self.registry = OffLoop(self.store)  # `await self.registry.get(...)`: off the event loop
        body_limit.LIMIT["bytes"] = self.config.limits.max_body_bytes
        self.spec: EncoderSpec | None = None
        self.model_defaults: dict | None = None
        self.page_files = None  # the web page's files (page_gate.PageFiles) where it is mounted

    def _set_asgi_app(self, app) -> None:
        """Serve hands each replica its own copy of `api` here (Ray 2.60's ASGIAppReplicaWrapper):
        the web page is mounted on that copy, with this replica's steps behind it."""
        web_page.mount(app, self)
        super()._set_asgi_app(app)

    def memory(self, reset_peak: bool = False) -> dict:
        return replica_memory(reset_peak)

    async def _defaults(self) -> dict:
        """The base model's own steps and size, for requests that leave them out."""
        if self.model_defaults is None:
            self.model_defaults = await self.generator.defaults.remote()
        return self.model_defaults

    async def _spec(self) -> EncoderSpec:
        if self.spec is None:
            self.spec = EncoderSpec(**await self.face.spec.remote())
        return self.spec

    def _tenant(self, request: Request) -> str:
        tenant = auth.tenant_for(request.headers.get("authorization"), self.tokens)
        if tenant is None:
            raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")
        return tenant

    async def _analyze(self, data: bytes) -> dict:
        result = await self.face.analyze.remote(data)
        if "batch_size" in result:
            metrics.BATCH_SIZE.labels("face_encoder").observe(result["batch_size"])
        return result

    def _check_size(self, size: int | None, what: str) -> None:
        """An upload within the limit, checked from its size (a file spooled to disk: before it is read)."""
        if size is not None and size > self.config.limits.max_upload_bytes:
            raise BadInput(f"{what} is {size} bytes; the limit is {self.config.limits.max_upload_bytes}")
        if size == 0:
            raise BadInput(f"{what} is empty")

    def _check_count(self, count: int) -> None:
        if not 1 <= count <= self.config.limits.max_photos:
            raise BadInput(f"send between 1 and {self.config.limits.max_photos} photos, got {count}")

    # -- identities ----------------------------------------------------------------------------
    @api.post("/v1/identities", status_code=201, response_model=IdentityOut,
              responses=errors(400, 401, 409, 413, 422, 500, 502, 503))
    async def enroll(self, request: Request, photos: list[UploadFile] = File(...), consent: str = Form(...),
                     name: str = Form(""), name_exists: str = Form("refuse"),
                     reconsent: str = Form("", description="For a person erased before: the new consent reference "
                                           "they gave (an erased person is refused without it).")) -> IdentityOut:
        tenant = self._tenant(request)
        if name.strip() and name_exists == "refuse" and await self.registry.named(tenant, name):
            raise NameTaken(f"the name {name.strip()!r} is taken: enroll under another name, or send "
                            "name_exists=rename (a suffix) or replace (erases the other identity)")
        self._check_count(len(photos))
        if not consent.strip():
            raise BadInput("consent is required: a reference to the person's recorded consent")
        for photo in photos:  # every size before any photo is read or analysed
            self._check_size(photo.size, f"photo {photo.filename}")
        uploads = []
        for i, photo in enumerate(photos):
            data = await photo.read()
            self._check_size(len(data), f"photo {photo.filename}")
            uploads.append((photo.filename or f"photo{i}", data))
        draft = await self.examine_photos(uploads)
        return _out(await self.save_enrollment(tenant, draft, name, consent, name_exists, reconsent))

    # The steps of every operation, shared by the HTTP handlers and the web page (web_ui.py).
    async def examine_photos(self, uploads: list[tuple[str, bytes]]) -> EnrollmentDraft:
        """Each photo analysed and judged as enrollment judges it; nothing is saved."""
        from ray_faceid.face.decode import decode_image

        self._check_count(len(uploads))
        draft = EnrollmentDraft()
        for i, (filename, data) in enumerate(uploads):
            self._check_size(len(data), f"photo {filename}")
            result = await self._analyze(data)
            report = PhotoReport(index=i, filename=_file_name(filename) or f"photo{i}", accepted=False)
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
                                          np.array(draft.quality), await self._spec(), draft.crops,
                                          [r.model_dump() for r in draft.reports], name_exists=name_exists,
                                          reconsent=reconsent or None)

    async def erase(self, tenant: str, identity: str) -> ErasureReport:
        report = await self.registry.call(erase_identity, self.store, tenant, identity)
        if self.page_files is not None:  # the page's uploads and answers may show them: gone at once
            self.page_files.forget_tenant(tenant)
        removed = [dict(r, where=r["where"].rstrip("/").rsplit("/", 1)[-1]) for r in report["removed"]]
        return ErasureReport(id=report["id"], removed=removed)

    @api.get("/v1/identities", response_model=IdentityList, responses=errors(401, 422, 500, 502))
    async def list_identities(self, request: Request, limit: int = Query(100, ge=1, le=1000),
                              after: str | None = Query(None, description="The `next` of the previous page.")
                              ) -> IdentityList:
        everyone = await self.registry.list(self._tenant(request))  # sorted by id
        page = [m for m in everyone if after is None or m["id"] > after][:limit]
        more = len(page) == limit and page and page[-1]["id"] != everyone[-1]["id"]
        return IdentityList(identities=[_out(m) for m in page], next=page[-1]["id"] if more else None)

    @api.get("/v1/identities/{identity}", response_model=IdentityOut, responses=errors(401, 404, 410, 422, 500, 502))
    async def get_identity(self, identity: str, request: Request) -> IdentityOut:
        tenant = self._tenant(request)
        return _out(await self.registry.get(tenant, await self.registry.resolve(tenant, identity)))

    @api.delete("/v1/identities/{identity}", response_model=ErasureReport,
                responses=errors(401, 404, 409, 410, 422, 500, 502))
    async def delete_identity(self, identity: str, request: Request) -> ErasureReport:
        """Erase the person everywhere the system keeps them; says what was removed (storage folders
        are named by the last part of their path only)."""
        return await self.erase(self._tenant(request), identity)

    # -- generation ----------------------------------------------------------------------------
    def _validate_generation(self, steps: int, width: int = 64, height: int = 64, images: int = 1) -> None:
        limits = self.config.limits
        if steps > limits.max_steps:
            raise BadInput(f"steps {steps} is over the limit of {limits.max_steps}")
        if max(width, height) > limits.max_side or width % 8 or height % 8:
            raise BadInput(f"width and height must be multiples of 8 up to {limits.max_side}, got {width}x{height}")
        if images > limits.max_images:
            raise BadInput(f"num_images {images} is over the limit of {limits.max_images}")
        cost = width * height * steps * images
        if cost > limits.max_cost:
            raise BadInput(f"this request is {cost} pixel-steps of work (width x height x steps x images); the limit is "
                           f"{limits.max_cost}: ask for fewer steps, a smaller size or fewer images")

    async def _score(self, png_b64: str, tenant: str, ids: list[str]) -> list[IdentityScore]:
        spec = await self._spec()
        result = await self._analyze(base64.b64decode(png_b64))
        faces = [Face(bbox=tuple(f["bbox"]), score=f["score"], landmarks=Landmarks(INSIGHTFACE5, np.zeros((5, 2))),
                      embedding=np.array(f["embedding"])) for f in result.get("faces", [])]
        refs = {i: reference_embedding(*(await self.registry.embeddings(tenant, i))[:2]) for i in ids}
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

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses=errors(400, 401, 404, 409, 410, 413, 422, 500, 502, 503))
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        return await self.run_generate(self._tenant(request), body)

    async def run_generate(self, tenant: str, body: GenerateRequest, on_progress=None) -> GenerateResponse:
        defaults = await self._defaults()
        body = body.model_copy(update={k: getattr(body, k) or defaults[k] for k in ("steps", "width", "height")})
        self._validate_generation(body.steps, body.width, body.height, body.num_images)
        # 404 for unknown names and ids, and for other tenants' ids.
        people = [dict(i.model_dump(), id=await self.registry.resolve(tenant, i.id or i.name)) for i in body.identities]
        ids = [p["id"] for p in people]
        if len(set(ids)) != len(ids):
            raise BadInput("an identity appears twice in one request")
        payload = {"kind": "generate", "tenant": tenant, "identities": people,
                   "prompt": body.prompt, "negative_prompt": body.negative_prompt,
                   "seed": body.seed if body.seed is not None else secrets.randbelow(2**31 - 10**6),
                   "steps": body.steps, "guidance": body.guidance, "width": body.width, "height": body.height,
                   "num_images": body.num_images, **sampling(body, self.config)}
        return await self._generate_scored(tenant, payload, ids, body.min_identity_score, on_progress)

    @api.post("/v1/inpaint", response_model=GenerateResponse,
              responses=errors(400, 401, 404, 409, 410, 413, 422, 500, 502, 503))
    async def inpaint(self, body: InpaintRequest, request: Request) -> GenerateResponse:
        return await self.run_inpaint(self._tenant(request), body)

    async def run_inpaint(self, tenant: str, body: InpaintRequest, on_progress=None) -> GenerateResponse:
        defaults = await self._defaults()
        body = body.model_copy(update={"steps": body.steps or defaults["steps"]})
        # Inpainting denoises at most at the model's native size, whatever the photo's size.
        self._validate_generation(body.steps, defaults["width"], defaults["height"])
        person = dict(body.identity.model_dump(),
                      id=await self.registry.resolve(tenant, body.identity.id or body.identity.name))
        try:
            image, mask = base64.b64decode(body.image, validate=True), base64.b64decode(body.mask, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadInput("image and mask must be base64-encoded image files") from exc
        self._check_size(len(image), "image")
        self._check_size(len(mask), "mask")
        payload = {"kind": "inpaint", "tenant": tenant, "identities": [person],
                   "image": image, "mask": mask,
                   "prompt": body.prompt, "negative_prompt": body.negative_prompt,
                   "seed": body.seed if body.seed is not None else secrets.randbelow(2**31 - 10**6),
                   "steps": body.steps, "guidance": body.guidance, "feather": body.feather, **sampling(body, self.config)}
        return await self._generate_scored(tenant, payload, [person["id"]], body.min_identity_score, on_progress)

    # -- operations ----------------------------------------------------------------------------
    @api.get("/healthz", responses=errors(500))
    async def healthz(self) -> dict:
        start = time.perf_counter()
        await self.face.ping.remote()
        await self.generator.ping.remote()
        return {"status": "ok", "seconds": round(time.perf_counter() - start, 3)}

    @api.get("/metrics", responses=errors(500))
    async def metrics_endpoint(self) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type="text/plain; version=0.0.4")


@api.middleware("http")
async def _count(request: Request, call_next):
    """A request id for every request; every answer counted, an unexpected exception as a 500
    with the one error body (it used to escape uncounted)."""
    start = time.perf_counter()
    given = request.headers.get("x-request-id", "")  # Serve's proxy sets one, and returns it to the client
    request.state.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    try:
        response = await call_next(request)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: logged with the id, answered 500
        log.exception("request %s failed", request.state.request_id)
        response = _error(request, 500, "internal", f"internal error ({type(exc).__name__}); quote the request_id")
    route = request.scope.get("route")
    path = getattr(route, "path", "other")
    metrics.REQUESTS.labels(path, str(response.status_code)).inc()
    metrics.LATENCY.labels(path).observe(time.perf_counter() - start)
    if request.state.request_id != given:
        response.headers["X-Request-ID"] = request.state.request_id
    return response


# Wrapped here, at import time, so every replica process builds the same FastAPI class-based view.
IngressApp = serve.ingress(api)(Ingress)

__all__ = ["Ingress", "IngressApp", "api"]
