"""Quality of a face shot, for picking references and weighting their fusion.

- face_px     face box width in original pixels.
- sharpness   variance of the Laplacian of the aligned 112x112 grey crop; below ~50 looks blurred.
- pose        0 (frontal) .. 1 (profile or steeply up/down), from yaw and pitch.
- score       0..1, the product of a size, a sharpness and a pose term; 1 is a large, sharp, frontal face.
- small       1 for a face narrower than SMALL_FACE_PX (group photos' far-away people): its landmarks and
              embedding are less reliable; enrollment refuses faces under its own minimum, saying so.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# Faces this wide, and crops this sharp, get a full size / sharpness term.
FULL_SIZE_PX = 112.0
SMALL_FACE_PX = 40.0
SHARP_LAPLACIAN_VAR = 100.0


def sharpness(aligned_rgb: np.ndarray) -> float:
    gray = aligned_rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(ndimage.laplace(gray).var())


def face_quality(face_px: float, aligned_rgb: np.ndarray, yaw: float, pitch: float) -> dict[str, float]:
    sharp = sharpness(aligned_rgb)
    pose = float(np.clip(max(abs(yaw), abs(pitch)) / 90.0, 0, 1))
    size_term = float(np.clip(face_px / FULL_SIZE_PX, 0, 1))
    sharp_term = sharp / (sharp + SHARP_LAPLACIAN_VAR)
    return {
        "face_px": float(face_px),
        "sharpness": sharp,
        "pose": pose,
        "score": size_term * sharp_term * (1.0 - pose),
        "small": float(face_px < SMALL_FACE_PX),
    }
