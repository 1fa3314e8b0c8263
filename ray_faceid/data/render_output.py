"""What a finished render output holds for a person looking at it: the contact sheet `eval` made,
the render's and the evaluation's figures, and the rows that failed."""
from __future__ import annotations

import dataclasses
import json

from ray_faceid import storage
from ray_faceid.data import tables
from ray_faceid.data.render import MANIFEST, SUMMARY
from ray_faceid.eval.run import REPORT, SHEET


@dataclasses.dataclass
class RenderOutput:
    sheet_png: bytes | None  # None where `eval` has not run on the output
    figures: dict[str, int | float | str]
    failed: list[tuple[str, str]]  # (row id, error)


def read_render_output(uri: str) -> RenderOutput:
    def optional(name: str) -> bytes | None:
        path = storage.join(uri, name)
        return storage.read_bytes(path) if storage.exists(path) else None

    summary = json.loads(optional(SUMMARY) or b"{}")
    report = json.loads(optional(REPORT) or b"{}")
    figures = {k: v for k, v in {**summary, **report}.items() if isinstance(v, (int, float, str))}
    failed = []
    if storage.exists(storage.join(uri, MANIFEST)):
        failed = [(r["id"], r["error"] or "") for r in tables.read_table(storage.join(uri, MANIFEST)).to_pylist()
                  if r["status"] != "ok"]
    return RenderOutput(sheet_png=optional(SHEET), figures=figures, failed=failed)
