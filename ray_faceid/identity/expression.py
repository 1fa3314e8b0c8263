"""Expression / pose codes: the condition for expression guidance and for the identity-motion
reconfigurator. A code is five numbers, each in about [-1, 1]:

    smile (0..1), mouth_open (0..1), eyes_open (0..1), yaw / 90, pitch / 90

Training takes codes from measured attributes of the target shot (face/attributes.py); users ask
in words ("smile, turn left") or with explicit values ("smile=0.5,yaw=-30").
"""
from __future__ import annotations

import math

import torch

from ray_faceid.errors import BadInput

EXPRESSION_KEYS = ("smile", "mouth_open", "eyes_open", "yaw", "pitch")
EXPRESSION_DIM = len(EXPRESSION_KEYS)
# Code units: angles are divided by this so every number is in about [-1, 1].
CODE_SCALE = {"yaw": 90.0, "pitch": 90.0}
NEUTRAL = {"smile": 0.0, "mouth_open": 0.0, "eyes_open": 0.8, "yaw": 0.0, "pitch": 0.0}

# Words a user can ask for; each sets some attributes (degrees for yaw/pitch).
PRESETS: dict[str, dict[str, float]] = {
    "neutral": {},
    "smile": {"smile": 0.8, "mouth_open": 0.2},
    "laugh": {"smile": 1.0, "mouth_open": 0.8},
    "open mouth": {"mouth_open": 0.8},
    "surprised": {"mouth_open": 0.9, "eyes_open": 1.0},
    "eyes closed": {"eyes_open": 0.0},
    "turn left": {"yaw": 35.0},
    "turn right": {"yaw": -35.0},
    "look up": {"pitch": 20.0},
    "look down": {"pitch": -20.0},
    "profile left": {"yaw": 75.0},
    "profile right": {"yaw": -75.0},
}


def code_from_attributes(attributes: dict[str, float | None]) -> list[float]:
    """A code from measured attributes; unknown ones take the neutral value."""
    values = {k: (NEUTRAL[k] if attributes.get(k) is None else float(attributes[k])) for k in EXPRESSION_KEYS}
    return [values[k] / CODE_SCALE.get(k, 1.0) for k in EXPRESSION_KEYS]


def parse_expression(request: str) -> dict[str, float]:
    """'smile, turn left' or 'smile=0.5,yaw=-30' -> attribute values (neutral where not said)."""
    values = dict(NEUTRAL)
    for part in (p.strip().lower() for p in request.split(",") if p.strip()):
        if "=" in part:
            key, _, raw = part.partition("=")
            key = key.strip().replace(" ", "_")
            if key not in EXPRESSION_KEYS:
                raise BadInput(f"expression key {key!r} unknown; use {', '.join(EXPRESSION_KEYS)}")
            try:
                values[key] = float(raw)
            except ValueError as exc:
                raise BadInput(f"expression {key}={raw!r}: not a number") from exc
            if not math.isfinite(values[key]):
                raise BadInput(f"expression {key}={raw!r}: not a finite number")
        elif part in PRESETS:
            values.update(PRESETS[part])
        else:
            raise BadInput(f"expression {part!r} unknown; use one of {', '.join(PRESETS)} or key=value")
    return values


def structured_expression(request: dict) -> dict[str, float]:
    """{"smile": 0.5, "yaw": -30} -> attribute values (neutral where not said); checks names and ranges."""
    from ray_faceid.face.attributes import RANGES

    values = dict(NEUTRAL)
    for key, value in request.items():
        if key not in EXPRESSION_KEYS:
            raise BadInput(f"expression key {key!r} unknown; use {', '.join(EXPRESSION_KEYS)}")
        low, high = RANGES[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise BadInput(f"expression {key}={value!r}: must be a number in {low:g}..{high:g}")
        values[key] = float(value)
    return values


def expression_code(request: str | dict | None) -> torch.Tensor | None:
    """(EXPRESSION_DIM,) code for a request, or None (= the learned null expression)."""
    if request is None or request == "":
        return None
    attrs = parse_expression(request) if isinstance(request, str) else structured_expression(request)
    return torch.tensor(code_from_attributes(attrs), dtype=torch.float32)
