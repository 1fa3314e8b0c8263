"""Detection policy around any detector: bounded working resolution, small-image upsampling,
padding for tight crops, a small-face pass on photos without a dominant face, a high-recall
fallback, and boxes mapped back to original pixels.

Why: detector cost grows with pixels, so large photos are detected downscaled (a 4600 px photo
costs the same as a 1024 px one); dlib's HOG window is 80 px, so small images are upsampled;
a face cropped tight to its chin and brow has no context around it, so the image is padded.
At the working resolution HOG misses faces under ~80 px: group and event photos lose their
far-away people. Where the fast pass finds no dominant face (one at least `portrait_share` of the
shorter side: a portrait), a small-face detector (MTCNN, down to `small_face_px`) runs too and
adds the faces the fast pass missed; portraits, most photos, stay as fast as before.
(benchmarks/group_faces.py measured the choice.)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ray_faceid.config import DetectionConfig
from ray_faceid.face.backends.base import Detection, Detector
from ray_faceid.face.landmarks import Landmarks


def working_scale(height: int, width: int, config: DetectionConfig) -> float:
    long_side = max(height, width)
    if long_side > config.working_max_side:
        return config.working_max_side / long_side
    if long_side < config.upsample_below_side:
        return min(2.0, config.working_max_side / long_side)
    return 1.0


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _pad(image: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """Pad with the image's mean colour: flat, so it adds no false edges for HOG."""
    pad = int(round(max(image.shape[:2]) * fraction))
    mean = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    out = np.empty((image.shape[0] + 2 * pad, image.shape[1] + 2 * pad, 3), np.uint8)
    out[:] = mean
    out[pad : pad + image.shape[0], pad : pad + image.shape[1]] = image
    return out, pad


def _run(detector: Detector, image: np.ndarray, scale: float, offset: float) -> list[Detection]:
    found = detector.detect(_resize(image, scale))
    out = []
    for d in found:
        box = tuple(v / scale - offset for v in d.bbox)
        lm = None
        if d.landmarks is not None:
            lm = Landmarks(d.landmarks.scheme, d.landmarks.points / scale - offset)
        out.append(Detection(box, d.score, lm))
    return out


def _clip(d: Detection, height: int, width: int) -> Detection:
    x0, y0, x1, y1 = d.bbox
    box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
    return Detection(box, d.score, d.landmarks)


def _centre_inside(a: tuple, b: tuple) -> bool:
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return b[0] <= cx <= b[2] and b[1] <= cy <= b[3]


def _small_faces(image: np.ndarray, small: Detector, config: DetectionConfig, found: list[Detection]) -> list[Detection]:
    """The small-face pass's faces that the fast pass did not find."""
    h, w = image.shape[:2]
    scale = min(1.0, config.small_face_max_side / max(h, w))
    extra = []
    for d in small.detect(_resize(image, scale), min_face=config.small_face_px * scale):
        box = tuple(v / scale for v in d.bbox)
        if not any(_centre_inside(box, f.bbox) or _centre_inside(f.bbox, box) for f in found + extra):
            extra.append(Detection(box, d.score, d.landmarks))
    return extra


def detect_faces(
    image: np.ndarray, detector: Detector, config: DetectionConfig, fallback: Detector | None = None,
    small: Detector | None = None,
) -> list[Detection]:
    """Faces in `image` (original pixels), largest first."""
    h, w = image.shape[:2]
    scale = working_scale(h, w, config)
    found = _run(detector, image, scale, 0)
    dominant = any(d.bbox[2] - d.bbox[0] >= config.portrait_share * min(h, w) for d in found)
    if small is not None and not dominant:
        found += _small_faces(image, small, config, found)
    # Only small images are padded: that is where tight face crops live, and padding a large
    # photo would shrink its faces below the detector's window at the working resolution.
    small = max(h, w) < config.upsample_below_side and config.pad_fraction > 0
    if not found and (small or fallback is not None):
        target, offset = _pad(image, config.pad_fraction) if small else (image, 0)
        target_scale = working_scale(*target.shape[:2], config)
        if small:
            found = _run(detector, target, target_scale, offset)
        if not found and fallback is not None:
            found = _run(fallback, target, target_scale, offset)
    faces = [_clip(d, h, w) for d in found]
    faces = [d for d in faces if d.bbox[2] - d.bbox[0] >= config.min_face_px]
    return sorted(faces, key=lambda d: (d.bbox[2] - d.bbox[0]) * (d.bbox[3] - d.bbox[1]), reverse=True)
