"""Render catalogs: one row per image to make, from JSONL or Parquet (any fsspec URI).

A generate row: `id`, `identities` (registry ids or names, or {id (or name), region, expression, scale,
edits, pose}: pose, InstantID's five face keypoints in the image, identity/pose.py),
`prompt`, optional `negative_prompt`, `seed`, `steps`, `guidance`, `size` ("WxH"), `expression`,
`edits` ({"smile": 0.8, "yaw": -20}: attribute targets through the job's --flow), `scheduler` and
`scheduler_config` (pipelines/schedulers.py; default the base's own), `identity_start` (the step the
identity starts at; default 0), `true_cfg` (FLUX: true CFG away from `negative_prompt`).
An inpaint row adds `image` and `mask` (URIs; white = repaint), takes one identity at most (none: the
prompt alone repaints the mask) and may set its own `feather` (default the job's).
Rows are validated one by one: a bad row becomes an error record, never a failed job.
"""
from __future__ import annotations

import io
import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_faceid import storage
from ray_faceid.errors import BadInput
from ray_faceid.identity.edits import edits_field
from ray_faceid.identity.pose import Pose

ROW_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_PEOPLE = 4  # pipelines/generate.py's MAX_IDENTITIES (not imported: it loads torch)


class RowIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    region: tuple[float, float, float, float] | None = Field(None, description="x0, y0, x1, y1 as fractions.")
    expression: str | None = None
    scale: float = Field(1.0, ge=0, le=4)
    edits: dict[str, float] | None = Field(None, description="Attribute targets through the flow, e.g. {\"smile\": 0.8}.")
    pose: Pose | None = None

    @field_validator("edits")
    @classmethod
    def _edits(cls, value: dict | None) -> dict | None:
        return edits_field(value)

    @model_validator(mode="before")
    @classmethod
    def _name(cls, value):
        """{"name": ...} as an API request names a person: the registry resolves ids and names alike."""
        if isinstance(value, dict) and "name" in value:
            if "id" in value:
                raise ValueError("give the person's id or name, not both")
            value = {("id" if k == "name" else k): v for k, v in value.items()}
        return value


class CatalogRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    identities: list[RowIdentity] = Field(default_factory=list, max_length=MAX_PEOPLE)
    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0, le=30)
    size: str | None = Field(None, description="WxH; default from the job's settings.")
    expression: str | None = Field(None, description="Applies to every identity that does not set its own.")
    edits: dict[str, float] | None = Field(None, description="Applies to every identity that does not set its own.")
    image: str | None = Field(None, description="Inpaint: the image to edit.")
    mask: str | None = Field(None, description="Inpaint: the mask (white = repaint), same size as the image.")
    scheduler: str | None = Field(None, max_length=64, description="Sampler (e.g. dpm++2m-karras); default the base's own.")
    scheduler_config: dict[str, bool | int | float | str] | None = Field(None, description="e.g. {\"timestep_spacing\": "
                                                                         "\"trailing\"}.")
    identity_start: int | None = Field(None, ge=0, le=199, description="The step (from 0) the row's identity starts "
                                       "at; earlier steps run without it (PuLID-FLUX's start_step). Default 0.")
    true_cfg: float | None = Field(None, ge=1, le=30, description="FLUX: true classifier-free guidance away from "
                                   "negative_prompt (over 1; each step runs the transformer twice). Default off.")
    feather: float | None = Field(None, ge=0, le=64, description="Inpaint: the soft edge inside the mask, in pixels; "
                                  "default the job's.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ROW_ID.match(value):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-' (it names the output file)")
        return value

    @field_validator("edits")
    @classmethod
    def _edits(cls, value: dict | None) -> dict | None:
        return edits_field(value)

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value):
        if value is not None and not isinstance(value, str):
            raise ValueError('give it as text "WxH", e.g. "512x512"')
        return value

    @field_validator("identities", mode="before")
    @classmethod
    def _identities(cls, value):
        return [{"id": v} if isinstance(v, str) else v for v in (value or [])]

    @model_validator(mode="after")
    def _inpaint(self) -> "CatalogRow":
        if (self.image is None) != (self.mask is None):
            raise ValueError("an inpaint row needs both image and mask")
        if self.image is not None and len(self.identities) > 1:
            raise ValueError("an inpaint row takes one identity at most (none: the prompt alone repaints the mask)")
        if self.feather is not None and self.image is None:
            raise ValueError("feather: for inpaint rows (image and mask)")
        if self.identity_start and not self.identities:
            raise ValueError("identity_start: the row names nobody for the identity to start on")
        return self

    def feather_or(self, default: float) -> float:
        return default if self.feather is None else self.feather

    def key_fields(self) -> dict:
        """The row as its output key hashes it: fields added since keys were first made (edits, the
        scheduler) are left out where unset, so existing outputs keep their keys."""
        dump = self.model_dump(mode="json")
        for part in [dump, *dump["identities"]]:
            for later, unset in (("edits", None), ("scheduler", None), ("scheduler_config", None), ("pose", None),
                                 ("identity_start", 0), ("true_cfg", 1)):
                if part.get(later) in (None, unset):  # unset, or the default written out: the same image
                    part.pop(later, None)
        dump.pop("feather", None)  # what an inpaint row renders with is keyed, its own or the job's (Renderer.key)
        return dump

    def sampler(self):
        """This row's scheduler (checked here: a bad name or setting is this row's error alone)."""
        from ray_faceid.pipelines.schedulers import Sampler

        try:
            return Sampler.parse(self.scheduler, self.scheduler_config or {}, where="scheduler")
        except BadInput as exc:
            raise BadInput(f"row {self.id}: {exc.message}") from None

    @property
    def inpaint(self) -> bool:
        return self.image is not None

    def inpaint_files(self, catalog: str | None) -> tuple[str, str]:
        """The image and mask to read: a relative path from the catalog's folder (keys keep the row as written)."""
        if catalog is None:
            return self.image, self.mask
        return storage.beside(catalog, self.image), storage.beside(catalog, self.mask)

    def dimensions(self, default: str) -> tuple[int, int]:
        from ray_faceid.pipelines.generate import parse_size

        return parse_size(self.size or default, f"row {self.id}: size")


def parse_row(text: str, index: int) -> CatalogRow:
    """A row from its JSON text; BadInput names the row and every problem."""
    try:
        return CatalogRow.model_validate_json(text)
    except ValidationError as exc:
        try:
            name = json.loads(text).get("id") or f"#{index}"
        except (ValueError, AttributeError):
            name = f"#{index}"
        reasons = "; ".join(_reason(e) for e in exc.errors())
        raise BadInput(f"catalog row {name}: {reasons}") from None


def _reason(error: dict) -> str:
    """One validation error in a row's words: where, and what to write."""
    import difflib

    where = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        person = len(error["loc"]) > 1  # identities.N.field
        fields = RowIdentity.model_fields if person else CatalogRow.model_fields
        near = difflib.get_close_matches(str(error["loc"][-1]), list(fields), n=1)
        return (f"{where}: not a field of a {'person' if person else 'row'}"
                f"{f' (did you mean {near[0]}?)' if near else ''}")
    if error["type"] == "too_long" and where == "identities":
        return f"identities: at most {MAX_PEOPLE} people in one image"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message  # a row-wide check names its own fields


def read_catalog(uri: str) -> list[str]:
    """Every row of a JSONL or Parquet catalog as JSON text (validated later, row by row)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [json.dumps({k: v for k, v in row.items() if v is not None}) for row in rows]
    if not uri.endswith((".jsonl", ".json", ".ndjson")):
        raise BadInput(f"catalog {uri}: use a .jsonl or .parquet file")
    return [line for line in data.decode("utf-8").splitlines() if line.strip()]
