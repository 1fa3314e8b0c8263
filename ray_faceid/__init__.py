"""ray_faceid: identity-preserving face customization on Ray.

The public API is re-exported here; everything else may change. The names load on first use
(PEP 562): importing any ray_faceid module (a CLI start, a Ray worker unpickling a job's function,
a Serve replica) does not load the face stack (scikit-image, SciPy, the detectors) unless it uses it.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "DecodeConfig": "ray_faceid.config",
    "DetectionConfig": "ray_faceid.config",
    "FaceConfig": "ray_faceid.config",
    "BackendUnavailable": "ray_faceid.errors",
    "BadImage": "ray_faceid.errors",
    "BadInput": "ray_faceid.errors",
    "BaseModelMismatch": "ray_faceid.errors",
    "EncoderMismatch": "ray_faceid.errors",
    "FaceIdError": "ray_faceid.errors",
    "NoFace": "ray_faceid.errors",
    "NotFound": "ray_faceid.errors",
    "StorageError": "ray_faceid.errors",
    "TooManyFaces": "ray_faceid.errors",
    "FaceAnalyzer": "ray_faceid.face.analyzer",
    "decode_image": "ray_faceid.face.decode",
    "Face": "ray_faceid.face.face",
    "EncoderSpec": "ray_faceid.face.spec",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ray_faceid' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
