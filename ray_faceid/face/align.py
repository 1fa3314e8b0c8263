"""Alignment: a similarity transform of named landmarks onto a named template.

The recognition template is ArcFace's 112x112 (the same values as insightface's
`face_align.arcface_dst`); the diffusion template is a loose 512x512 crop of the same face
geometry with room for hair, ears and some background. Only the points the face's scheme and the
template share are used, so dlib's 5 points (eye corners, nose base) align by the eye centres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

from ray_faceid.face.landmarks import Landmarks

_ARCFACE_POINTS = {
    "right_eye": (38.2946, 51.6963),
    "left_eye": (73.5318, 51.5014),
    "nose_tip": (56.0252, 71.7366),
    "mouth_right": (41.5493, 92.3655),
    "mouth_left": (70.7299, 92.2041),
}


@dataclass(frozen=True)
class Template:
    name: str
    size: int
    points: dict[str, tuple[float, float]]

    def scaled(self, name: str, size: int, face_scale: float, center_y: float) -> "Template":
        """The same geometry on a `size` canvas, the face `face_scale` times larger, its centre at `center_y`."""
        k = size / self.size * face_scale
        cx, cy = self.size / 2, (self.points["right_eye"][1] + self.points["mouth_right"][1]) / 2
        pts = {n: ((x - cx) * k + size / 2, (y - cy) * k + center_y * size) for n, (x, y) in self.points.items()}
        return Template(name, size, pts)


ARCFACE_112 = Template("arcface_112", 112, _ARCFACE_POINTS)


def loose_template(size: int) -> Template:
    """Face about 40% of the width: hair, ears, neck and background stay in the crop for diffusion."""
    return ARCFACE_112.scaled(f"loose_{size}", size, face_scale=0.62, center_y=0.47)


LOOSE_512 = loose_template(512)


def estimate_transform(landmarks: Landmarks, template: Template) -> np.ndarray:
    """The 2x3 similarity matrix taking image pixels to template pixels, from the shared point names."""
    names = [n for n in template.points if landmarks.has(n)]
    if len(names) < 2:
        raise ValueError(f"scheme {landmarks.scheme.name} shares fewer than 2 points with template {template.name}")
    src = np.array([landmarks.point(n) for n in names])
    dst = np.array([template.points[n] for n in names])
    tform = SimilarityTransform.from_estimate(src, dst)
    if not tform:
        raise ValueError(f"degenerate landmarks for template {template.name}: {src.tolist()}")
    return tform.params[:2]


def template_transform(source: Template, target: Template) -> np.ndarray:
    """The 2x3 similarity matrix taking a crop aligned on `source` to one aligned on `target`: both
    place the same face geometry, so a crop can be re-aligned without its photo."""
    names = [n for n in target.points if n in source.points]
    tform = SimilarityTransform.from_estimate(np.array([source.points[n] for n in names]),
                                              np.array([target.points[n] for n in names]))
    return tform.params[:2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp an RGB uint8 image by a 2x3 matrix (image -> crop) into a size x size crop."""
    # Landmarks put pixel centres on integers; Pillow puts them on .5: shift in and out.
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    full = half @ np.vstack([matrix, [0, 0, 1]]) @ np.linalg.inv(half)
    inverse = np.linalg.inv(full)[:2]
    crop = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, data=tuple(inverse.ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(crop)


def align(image: np.ndarray, landmarks: Landmarks, template: Template = ARCFACE_112) -> tuple[np.ndarray, np.ndarray]:
    """The aligned crop and the image -> crop matrix."""
    matrix = estimate_transform(landmarks, template)
    return warp(image, matrix, template.size), matrix
