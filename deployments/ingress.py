"""The HTTP face of the service (service.py): the FastAPI app (OpenAPI at /docs). Each route reads
the caller's token and the request, and calls one step of the service; errors become the one error
body. The web page is another face over the same service, mounted beside it by app.py."""
from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException

from deployments import body_limit, metrics
from deployments.memory import replica_memory
from deployments.schemas import (
    ErasureReport,
    GenerateRequest,
    GenerateResponse,
    IdentityList,
    IdentityOut,
    InpaintRequest,
    errors,
)
from deployments.service import Busy, FaceService, public_message
from ray_faceid.config import ServeConfig
from ray_faceid.errors import FaceIdError

log = logging.getLogger("ray.serve")
api = FastAPI(title="ray_faceid", version="0.1.0",
              description="Enroll people from photos; render, inpaint and compose them with their identity preserved. "
              "Every error answer is {error, message, request_id}.")
api.add_middleware(body_limit.BodyLimit)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


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


class Ingress:
    def __init__(self, face_encoder, generator, config_json: str):
        self.config = ServeConfig.model_validate_json(config_json)
        self.service = FaceService(self.config, face_encoder, generator)
        body_limit.LIMIT["bytes"] = self.config.limits.max_body_bytes

    def memory(self, reset_peak: bool = False) -> dict:
        return replica_memory(reset_peak)

    def _tenant(self, request: Request) -> str:
        return self.service.tenant(request.headers.get("authorization"))

    # -- identities ----------------------------------------------------------------------------
    @api.post("/v1/identities", status_code=201, response_model=IdentityOut,
              responses=errors(400, 401, 409, 413, 422, 500, 502, 503))
    async def enroll(self, request: Request, photos: list[UploadFile] = File(...), consent: str = Form(...),
                     name: str = Form(""), name_exists: str = Form("refuse"),
                     reconsent: str = Form("", description="For a person erased before: the new consent reference "
                                           "they gave (an erased person is refused without it).")) -> IdentityOut:
        tenant = self._tenant(request)
        await self.service.check_enrollment(tenant, len(photos), name, consent, name_exists)
        for photo in photos:  # every size before any photo is read or analysed
            self.service.check_size(photo.size, f"photo {photo.filename}")
        uploads = []
        for i, photo in enumerate(photos):
            data = await photo.read()
            self.service.check_size(len(data), f"photo {photo.filename}")
            uploads.append((photo.filename or f"photo{i}", data))
        return await self.service.enroll(tenant, uploads, name, consent, name_exists, reconsent, checked=True)

    @api.get("/v1/identities", response_model=IdentityList, responses=errors(401, 422, 500, 502))
    async def list_identities(self, request: Request, limit: int = Query(100, ge=1, le=1000),
                              after: str | None = Query(None, description="The `next` of the previous page.")
                              ) -> IdentityList:
        return await self.service.list_identities(self._tenant(request), limit, after)

    @api.get("/v1/identities/{identity}", response_model=IdentityOut, responses=errors(401, 404, 410, 422, 500, 502))
    async def get_identity(self, identity: str, request: Request) -> IdentityOut:
        return await self.service.identity(self._tenant(request), identity)

    @api.delete("/v1/identities/{identity}", response_model=ErasureReport,
                responses=errors(401, 404, 409, 410, 422, 500, 502))
    async def delete_identity(self, identity: str, request: Request) -> ErasureReport:
        """Erase the person everywhere the system keeps them; says what was removed (storage folders
        are named by the last part of their path only)."""
        return await self.service.erase(self._tenant(request), identity)

    # -- generation ----------------------------------------------------------------------------
    @api.post("/v1/generate", response_model=GenerateResponse,
              responses=errors(400, 401, 404, 409, 410, 413, 422, 500, 502, 503))
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        return await self.service.generate(self._tenant(request), body)

    @api.post("/v1/inpaint", response_model=GenerateResponse,
              responses=errors(400, 401, 404, 409, 410, 413, 422, 500, 502, 503))
    async def inpaint(self, body: InpaintRequest, request: Request) -> GenerateResponse:
        return await self.service.inpaint(self._tenant(request), body)

    # -- operations ----------------------------------------------------------------------------
    @api.get("/healthz", responses=errors(500))
    async def healthz(self) -> dict:
        start = time.perf_counter()
        await self.service.ping()
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


__all__ = ["Ingress", "api"]
