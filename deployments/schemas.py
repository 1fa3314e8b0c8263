"""Request and response models of the HTTP API (OpenAPI at /docs)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_faceid.identity.pose import Pose

# A request's settings and actions a base family may not take (FLUX.1: no sampler, a negative prompt
# through true CFG alone, neither beside the step cache; schnell: no guidance; Fill: inpainting only;
# true CFG: FLUX's alone; InstantID: no identity start); the Generator says which its base takes.
CONTROLS = ("negative_prompt", "sampler", "guidance", "expression", "edits", "generate", "inpaint", "true_cfg",
            "identity_start")
# What a deployment that says nothing of its controls takes (one from before they existed: a UNet's).
TAKEN_UNSAID = dict.fromkeys(CONTROLS, True) | {"true_cfg": False}

MAX_EXPRESSION = 200
MAX_BASE64 = 4 * (64 * 2**20 // 3 + 1)  # a hard ceiling; the configured upload and body limits are lower


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this shape."""

    error: str = Field(description="A short machine code: bad_input, not_found, name_taken, body_too_large, busy, ...")
    message: str = Field(description="What was wrong and what to do; never a storage path.")
    request_id: str | None = Field(None, description="Quote it when reporting a problem (also the X-Request-ID header).")


_MEANING = {
    400: "Malformed request (a body that cannot be parsed).", 401: "Missing or invalid bearer token.",
    404: "No such identity for this tenant (or no such route).", 409: "A name taken, a person erased before (send "
    "reconsent), a concurrent change, or an identity made with another encoder or adapter.",
    410: "The identity was erased.", 413: "The request body is over the size limit.",
    422: "Invalid values: the message names each one.", 500: "An internal error (report its request_id).",
    502: "The identity store could not be read or written.", 503: "Busy (retry after Retry-After seconds) or a "
    "backend unavailable.",
}


def errors(*statuses: int) -> dict:
    """OpenAPI `responses` for the error statuses an operation can return."""
    return {s: {"model": ErrorBody, "description": _MEANING[s]} for s in statuses}


class PhotoReport(BaseModel):
    index: int
    filename: str
    accepted: bool
    reason: str | None = Field(None, description="Why the photo was rejected (no face, several faces, too small, blurry).")
    quality: float | None = None
    face_px: float | None = None
    sharpness: float | None = None


class IdentityOut(BaseModel):
    id: str
    name: str
    created: str
    updated: str
    encoder: str
    faces_used: int
    consent: str
    photos: list[PhotoReport] = []


class IdentityList(BaseModel):
    identities: list[IdentityOut]
    next: str | None = Field(None, description="Pass as `after` for the next page; None on the last page.")


class ErasedArtifacts(BaseModel):
    what: str
    where: str = Field(description="The folder or URI the artifacts were removed from.")
    files: int | None = None
    rows: int | None = None
    faces: int | None = None
    crops: int | None = None
    pairs: int | None = None
    source_photos_kept: int | None = Field(None, description="The operator's own photos that show the person (kept).")


class ErasureReport(BaseModel):
    id: str
    erased: bool = True
    removed: list[ErasedArtifacts] = Field(description="Every place the person was removed from.")


class IdentityRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # NaN / Infinity / 1e309 are a 422, not a 500
    id: str | None = Field(None, description="The identity's id; or give `name`.")
    name: str | None = Field(None, description="The enrolled person's name (unique per tenant), instead of `id`.")
    region: tuple[float, float, float, float] | None = Field(None, description="x0,y0,x1,y1 as fractions of the image.")
    expression: str | dict[str, float] | None = Field(
        None, description="Words ('smile, turn left'), key=value ('smile=0.5,yaw=-30') or a code "
        "({\"smile\": 0.5, \"yaw\": -30, \"pitch\": 10}; smile, mouth_open, eyes_open 0..1, yaw -90..90, "
        "pitch -60..60 degrees). Moves the identity tokens where the server has an IMR.")
    scale: float = Field(1.0, ge=0.0, le=2.0, description="Identity strength.")
    edits: dict[str, float] | None = Field(
        None, description="Attribute targets through the server's attribute flow, e.g. {\"smile\": 0.8, "
        "\"yaw\": -20}: smile, mouth_open, eyes_open 0..1; yaw -90..90, pitch -60..60 degrees.")
    pose: Pose | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> "IdentityRequest":
        if (self.id is None) == (self.name is None):
            raise ValueError("give the identity's `id` or its `name` (one of them)")
        return self

    @field_validator("expression")
    @classmethod
    def _expression(cls, v):
        from ray_faceid.errors import BadInput
        from ray_faceid.identity.expression import parse_expression, structured_expression

        if isinstance(v, str) and len(v) > MAX_EXPRESSION:
            raise ValueError(f"an expression has at most {MAX_EXPRESSION} characters, got {len(v)}")
        try:
            (parse_expression if isinstance(v, str) else structured_expression)(v) if v else None
        except BadInput as exc:
            raise ValueError(exc.message) from exc
        return v

    @field_validator("edits")
    @classmethod
    def _edits(cls, v):
        from ray_faceid.identity.edits import edits_field

        return edits_field(v)

    @field_validator("region")
    @classmethod
    def _box(cls, v):
        if v is not None and not (0 <= v[0] < v[2] <= 1 and 0 <= v[1] < v[3] <= 1):
            raise ValueError("region must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # NaN / Infinity / 1e309 are a 422, not a 500
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    identities: list[IdentityRequest] = Field(min_length=1, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Default: a random seed (returned).")
    steps: int | None = Field(None, ge=1, description="Default: the deployment's, else the base "
                              "model's (30; 4 for an untrained smoke base; a few-step model's own).")
    guidance: float | None = Field(None, ge=0.0, le=30.0, description="Default: the deployment's, else the base "
                                   "model's (5; a few-step model's own, e.g. 1).")
    scheduler: str | None = Field(None, max_length=64, description="Sampler: the model's own by default; ddim, pndm, "
                                  "euler, euler-a, heun, dpm++2m, dpm++2m-karras, dpm++2m-sde-karras, unipc, lcm, "
                                  "tcd, or a diffusers scheduler class name.")
    scheduler_config: dict[Annotated[str, Field(max_length=64)], bool | int | float | str] = Field(
        default_factory=dict, max_length=8, description="Settings of the scheduler's config, e.g. "
        "{\"timestep_spacing\": \"trailing\", \"use_karras_sigmas\": true}.")
    width: int | None = Field(None, ge=8, description="Default: the base model's native size (512 for SD 1.x).")
    height: int | None = Field(None, ge=8, description="Default: the base model's native size (512 for SD 1.x).")
    num_images: int = Field(1, ge=1)
    min_identity_score: float | None = Field(None, ge=-1.0, le=1.0, description="Reseed (bounded) until every face scores this.")
    identity_start: int = Field(0, ge=0, le=199, description="The denoising step (from 0) the identity starts at; "
                                "earlier steps run without it (later: less likeness, more of the prompt; PuLID-FLUX's "
                                "start_step, 4 suggested for photographs). Below the request's steps.")
    true_cfg: float = Field(1.0, ge=1.0, le=30.0, description="FLUX bases: true classifier-free guidance away from "
                            "negative_prompt, which a FLUX base takes only with it (over 1; each step runs the "
                            "transformer twice and costs twice). Other bases: 1 (they guide with guidance).")


class InpaintRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # NaN / Infinity / 1e309 are a 422, not a 500
    identity: IdentityRequest
    image: str = Field(max_length=MAX_BASE64, description="Base64 image (PNG/JPEG/WEBP).")
    mask: str = Field(max_length=MAX_BASE64, description="Base64 mask of the same size; white = repaint.")
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, description="Default: the deployment's, else the base "
                              "model's (30; 4 for an untrained smoke base; a few-step model's own).")
    guidance: float | None = Field(None, ge=0.0, le=30.0, description="Default: the deployment's, else the base "
                                   "model's (5; a few-step model's own, e.g. 1).")
    scheduler: str | None = Field(None, max_length=64, description="Sampler: the model's own by default; ddim, pndm, "
                                  "euler, euler-a, heun, dpm++2m, dpm++2m-karras, dpm++2m-sde-karras, unipc, lcm, "
                                  "tcd, or a diffusers scheduler class name.")
    scheduler_config: dict[Annotated[str, Field(max_length=64)], bool | int | float | str] = Field(
        default_factory=dict, max_length=8, description="Settings of the scheduler's config, e.g. "
        "{\"timestep_spacing\": \"trailing\", \"use_karras_sigmas\": true}.")
    feather: float = Field(4.0, ge=0.0, le=64.0)
    min_identity_score: float | None = Field(None, ge=-1.0, le=1.0)
    identity_start: int = Field(0, ge=0, le=199, description="The denoising step (from 0) the identity starts at; "
                                "earlier steps run without it (later: less likeness, more of the prompt; PuLID-FLUX's "
                                "start_step, 4 suggested for photographs). Below the request's steps.")


class IdentityScore(BaseModel):
    id: str
    face_found: bool
    similarity: float | None = Field(None, description="Cosine similarity of the generated face to the enrolled identity.")
    same_person: bool | None = Field(None, description="At the encoder's own verification threshold.")
    wrong_identity_similarity: float | None = Field(None, description="Multi-ID: highest similarity to another identity.")


class GeneratedImage(BaseModel):
    png_base64: str
    seed: int
    scores: list[IdentityScore]
    provenance: dict


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    attempts: int
