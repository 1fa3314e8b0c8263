"""ray_faceid: identity-preserving face customization on Ray.

The public API is re-exported here; everything else may change.
"""
from ray_faceid.config import DecodeConfig, DetectionConfig, FaceConfig
from ray_faceid.errors import (
    BackendUnavailable,
    BadImage,
    BadInput,
    BaseModelMismatch,
    EncoderMismatch,
    FaceIdError,
    NoFace,
    NotFound,
    StorageError,
    TooManyFaces,
)
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.decode import decode_image
from ray_faceid.face.face import Face
from ray_faceid.face.spec import EncoderSpec

__all__ = [
    "BackendUnavailable",
    "BadImage",
    "BadInput",
    "BaseModelMismatch",
    "DecodeConfig",
    "DetectionConfig",
    "EncoderMismatch",
    "EncoderSpec",
    "Face",
    "FaceAnalyzer",
    "FaceConfig",
    "FaceIdError",
    "NoFace",
    "NotFound",
    "StorageError",
    "TooManyFaces",
    "decode_image",
]
