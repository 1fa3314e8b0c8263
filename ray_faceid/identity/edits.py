"""Attribute edits through the trained attribute flow (identity/flow.py), as users ask for them.

A user asks in the attributes' own units (face/attributes.py): `smile=0.8,yaw=-20` sets the
smile to 0.8 of a broad smile and the head turn to 20 degrees right. Values are targets, not
steps (`+0.8` reads as 0.8). The flow's coordinates hold the same attributes in code units
(expression.py: angles / 90); the conversion happens here and nowhere else.

The edit applies to the embedding the token mapper reads: the fused reference embedding (one
mapper input), or each reference (the multi-reference mapper). The fused embedding is a mean of
unit vectors; it is scaled to the references' own norm first, so the flow sees embeddings like
those it was trained on and the reported move is in the encoder's distance units.
"""
from __future__ import annotations

import math

import torch

from ray_faceid.errors import BadEdit
from ray_faceid.face.attributes import RANGES, UNITS
from ray_faceid.identity.expression import CODE_SCALE, EXPRESSION_KEYS


def describe(attributes: tuple[str, ...]) -> str:
    """'smile 0..1, yaw -90..90 degrees, ...': the names and ranges a flow accepts."""
    return ", ".join(f"{name} {RANGES[name][0]:g}..{RANGES[name][1]:g}{' ' + UNITS[name] if name in UNITS else ''}"
                     for name in attributes)


def parse_edits(text: str) -> dict[str, float]:
    """'smile=+0.8,yaw=-20' -> {"smile": 0.8, "yaw": -20.0}; names and ranges are checked by check_edits."""
    edits: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, raw = part.partition("=")
        if not sep:
            raise BadEdit(f"edit {part!r}: expected NAME=VALUE, e.g. smile=0.8,yaw=-20")
        try:
            edits[name.strip().lower()] = float(raw)
        except ValueError as exc:
            raise BadEdit(f"edit {part!r}: {raw.strip()!r} is not a number") from exc
    return edits


def check_edits(edits: dict, attributes: tuple[str, ...] = EXPRESSION_KEYS) -> dict[str, float]:
    """The edits as floats; BadEdit lists the valid names and ranges on any problem. `attributes`:
    those of the flow at hand (every flow we train has the expression keys)."""
    valid = describe(attributes)
    checked = {}
    for name, value in edits.items():
        if name not in attributes:
            raise BadEdit(f"edit {name!r} is not an attribute of the flow; valid: {valid}")
        low, high = RANGES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise BadEdit(f"edit {name}={value!r} is out of range; valid: {valid}")
        checked[name] = float(value)
    return checked


def edits_field(value: dict | None) -> dict | None:
    """check_edits for a pydantic field validator (catalog rows, API requests): a ValueError, so
    the row's or request's validation error names the field."""
    if value is None:
        return None
    try:
        return check_edits(value)
    except BadEdit as exc:
        raise ValueError(exc.message) from exc


def to_flow_units(edits: dict[str, float]) -> dict[str, float]:
    return {name: value / CODE_SCALE.get(name, 1.0) for name, value in edits.items()}


def from_flow_units(name: str, value: torch.Tensor | float):
    return value * CODE_SCALE.get(name, 1.0)


@torch.no_grad()
def edit_embeddings(flow, embeddings: torch.Tensor, edits: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, D) embeddings -> edited (R, D) in their dtype, and how far each moved (R,), L2."""
    checked = check_edits(edits, flow.attributes)
    x = embeddings.float()
    edited, moved = flow.edit(x, to_flow_units(checked))
    return edited.to(embeddings.dtype), moved


@torch.no_grad()
def edit_fused(flow, fused: torch.Tensor, references: torch.Tensor, edits: dict[str, float]):
    """Edit a fused (D,) embedding of unit references at the references' mean norm; returns the edited
    (D,) embedding and how far it moved."""
    norm = references.float().norm(dim=-1).mean()
    x = fused.float() / fused.float().norm().clamp_min(1e-12) * norm
    edited, moved = edit_embeddings(flow, x.unsqueeze(0), edits)
    return edited[0].to(fused.dtype), moved[0]
