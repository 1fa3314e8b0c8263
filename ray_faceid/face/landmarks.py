"""Landmark schemes: every point has a name, so alignment and attributes work from names.

Left and right are the subject's own (iBUG convention): the subject's right eye appears on the
image's left. Derived points (an eye centre from its corners) are means of named points, so a
5-point and a 68-point scheme both answer `point("right_eye")`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LandmarkScheme:
    name: str
    names: tuple[str, ...]
    derived: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.names or name in self.derived


def _ibug68_names() -> tuple[str, ...]:
    groups = [
        ("jaw", 17),
        ("right_brow", 5),
        ("left_brow", 5),
        ("nose_bridge", 4),
        ("nostril", 5),
        ("right_eye", 6),
        ("left_eye", 6),
        ("outer_lip", 12),
        ("inner_lip", 8),
    ]
    return tuple(f"{group}_{i}" for group, count in groups for i in range(count))


# dlib's shape_predictor_5_face_landmarks: eye corners and the base of the nose.
DLIB5 = LandmarkScheme(
    name="dlib5",
    names=("left_eye_outer", "left_eye_inner", "right_eye_outer", "right_eye_inner", "nose_base"),
    derived={
        "right_eye": ("right_eye_outer", "right_eye_inner"),
        "left_eye": ("left_eye_outer", "left_eye_inner"),
    },
)

# iBUG 300-W 68 points (dlib's shape_predictor_68_face_landmarks).
IBUG68 = LandmarkScheme(
    name="dlib68",
    names=_ibug68_names(),
    derived={
        "right_eye": tuple(f"right_eye_{i}" for i in range(6)),
        "left_eye": tuple(f"left_eye_{i}" for i in range(6)),
        "right_eye_outer": ("right_eye_0",),
        "right_eye_inner": ("right_eye_3",),
        "left_eye_inner": ("left_eye_0",),
        "left_eye_outer": ("left_eye_3",),
        "nose_tip": ("nose_bridge_3",),
        "nose_base": ("nostril_2",),
        "mouth_right": ("outer_lip_0",),
        "mouth_left": ("outer_lip_6",),
        "upper_lip_inner": ("inner_lip_2",),
        "lower_lip_inner": ("inner_lip_6",),
        "chin": ("jaw_8",),
    },
)

# insightface / SCRFD / RetinaFace 5 key points, the ArcFace template's points.
INSIGHTFACE5 = LandmarkScheme(
    name="insightface5",
    names=("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"),
)

SCHEMES = {s.name: s for s in (DLIB5, IBUG68, INSIGHTFACE5)}


@dataclass(frozen=True)
class Landmarks:
    """Points (K x 2, x then y, in image pixels) of one face, in a named scheme."""

    scheme: LandmarkScheme
    points: np.ndarray

    def __post_init__(self):
        if self.points.shape != (len(self.scheme.names), 2):
            raise ValueError(f"{self.scheme.name} needs {len(self.scheme.names)} points, got {self.points.shape}")

    def point(self, name: str) -> np.ndarray:
        if name in self.scheme.names:
            return self.points[self.scheme.names.index(name)].astype(np.float64)
        if name in self.scheme.derived:
            return np.mean([self.point(n) for n in self.scheme.derived[name]], axis=0)
        raise KeyError(f"landmark scheme {self.scheme.name} has no point {name!r}")

    def has(self, name: str) -> bool:
        return self.scheme.has(name)

    def transformed(self, matrix: np.ndarray) -> "Landmarks":
        """The same points under a 2x3 affine matrix."""
        pts = self.points @ matrix[:, :2].T + matrix[:, 2]
        return Landmarks(self.scheme, pts)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme.name, "points": self.points.round(2).tolist()}
