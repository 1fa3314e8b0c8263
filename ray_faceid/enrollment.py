"""Which photos an identity may be enrolled from, and why the others are rejected.

One rule set for the HTTP API and the CLI: exactly one face, wide enough, sharp enough.
"""
from __future__ import annotations

from ray_faceid.config import ServeLimits


def rejection(faces: list[dict], limits: ServeLimits) -> str | None:
    """None if the photo's faces (Face.to_dict form) make a usable reference, else the reason."""
    if not faces:
        return "no face found"
    if len(faces) > 1:
        return f"{len(faces)} faces: send photos of this person alone"
    q = faces[0]["quality"]
    if q["face_px"] < limits.min_face_px:
        return f"face too small ({q['face_px']:.0f} px wide; need {limits.min_face_px:.0f})"
    if q["sharpness"] < limits.min_sharpness:
        return f"too blurry (sharpness {q['sharpness']:.0f}; need {limits.min_sharpness:.0f})"
    return None
