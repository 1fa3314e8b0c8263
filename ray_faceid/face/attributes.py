"""Attributes from landmark geometry, for captions, pose buckets and the attribute flow.

All are estimates from 2-D points (no 3-D model), good for labelling shots, not for measurement:

- roll   degrees, -90..90; positive when the subject's left eye (image right) is lower.
- yaw    degrees, about -90..90; positive when the subject turns to their left (nose toward image right).
- pitch  degrees, about -60..60; positive when the subject looks up.
- smile       0..1 from mouth width relative to eye distance (needs mouth corners).
- mouth_open  0..1 from the inner-lip gap relative to mouth width (needs the 68-point scheme).
- eyes_open   0..1 from the eye aspect ratio (needs the 68-point scheme); 0 closed, 1 wide open.

An attribute the landmark scheme cannot tell is None. RANGES holds each range (what an edit of
the attribute may ask for).
"""
from __future__ import annotations

import numpy as np

from ray_faceid.face.landmarks import Landmarks

RANGES: dict[str, tuple[float, float]] = {
    "roll": (-90.0, 90.0), "yaw": (-90.0, 90.0), "pitch": (-60.0, 60.0),
    "smile": (0.0, 1.0), "mouth_open": (0.0, 1.0), "eyes_open": (0.0, 1.0),
}
UNITS = {"roll": "degrees", "yaw": "degrees", "pitch": "degrees"}  # the others are fractions

# Nose depth in front of the eye plane and frontal nose drop below the eye line, in units of
# the eye-centre distance; from mean adult face proportions.
_NOSE = {"nose_tip": (0.62, 0.55), "nose_base": (0.50, 0.72)}
# Mouth width / eye distance of a neutral face, and the extra width of a broad smile.
_NEUTRAL_MOUTH, _SMILE_SPAN = 0.80, 0.35


def _nose_name(lm: Landmarks) -> str | None:
    return next((n for n in _NOSE if lm.has(n)), None)


def head_pose(lm: Landmarks) -> dict[str, float]:
    right, left = lm.point("right_eye"), lm.point("left_eye")
    axis = left - right
    iod = float(np.hypot(*axis))
    roll = float(np.degrees(np.arctan2(axis[1], axis[0])))
    nose_name = _nose_name(lm)
    if nose_name is None or iod < 1e-6:
        return {"roll": roll, "yaw": 0.0, "pitch": 0.0}
    depth, frontal_drop = _NOSE[nose_name]
    unit = axis / iod
    normal = np.array([-unit[1], unit[0]])  # points down the face
    rel = lm.point(nose_name) - (right + left) / 2
    across = float(rel @ unit) / iod
    down = float(rel @ normal) / iod
    yaw = float(np.degrees(np.arctan2(across, depth)))
    pitch = float(np.degrees(np.arctan2(frontal_drop - down, depth)))
    return {"roll": roll, "yaw": yaw, "pitch": pitch}


def _eye_aspect(lm: Landmarks, side: str) -> float:
    p = [lm.point(f"{side}_eye_{i}") for i in range(6)]
    vertical = np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])
    return float(vertical / (2 * max(np.linalg.norm(p[0] - p[3]), 1e-6)))


def expression(lm: Landmarks) -> dict[str, float | None]:
    iod = float(np.linalg.norm(lm.point("left_eye") - lm.point("right_eye")))
    out: dict[str, float | None] = {"smile": None, "mouth_open": None, "eyes_open": None}
    if lm.has("mouth_left") and lm.has("mouth_right") and iod > 1e-6:
        width = float(np.linalg.norm(lm.point("mouth_left") - lm.point("mouth_right")))
        out["smile"] = float(np.clip((width / iod - _NEUTRAL_MOUTH) / _SMILE_SPAN, 0, 1))
        if lm.has("upper_lip_inner"):
            gap = float(np.linalg.norm(lm.point("lower_lip_inner") - lm.point("upper_lip_inner")))
            out["mouth_open"] = float(np.clip(gap / max(width, 1e-6) / 0.5, 0, 1))
    if lm.has("right_eye_5"):
        ear = (_eye_aspect(lm, "right") + _eye_aspect(lm, "left")) / 2
        # EAR is ~0.05 for a closed eye and ~0.35 for a wide-open one.
        out["eyes_open"] = float(np.clip((ear - 0.05) / 0.30, 0, 1))
    return out


def face_attributes(lm: Landmarks) -> dict[str, float | None]:
    return {**head_pose(lm), **expression(lm)}
