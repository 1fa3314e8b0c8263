"""Pick a face backend from FaceConfig."""
from __future__ import annotations

from ray_faceid.config import FaceConfig
from ray_faceid.face.backends.base import FaceBackend


def build_backend(config: FaceConfig) -> FaceBackend:
    backend = _detecting_backend(config)
    if config.recognizer == "sface":
        from ray_faceid.face.backends.sface_encoder import SFaceEncoder

        backend.encoder = SFaceEncoder()
    return backend


def _detecting_backend(config: FaceConfig) -> FaceBackend:
    if config.backend == "insightface":
        from ray_faceid.face.backends.insightface_backend import build_insightface_backend

        backend = build_insightface_backend(
            config.insightface_root, config.insightface_det_threshold, config.recognizer_onnx
        )
        return backend
    from ray_faceid.face.backends.dlib_backend import build_dlib_backend

    backend = build_dlib_backend(
        detector=config.detection.dlib_model,
        landmark_points=68 if config.landmarks == "dlib68" else 5,
        cnn_fallback=config.detection.cnn_fallback,
        num_jitters=config.num_jitters,
        encoder_runtime=config.encoder_runtime,
        small_faces=config.detection.small_faces,
        small_face_px=config.detection.small_face_px,
    )
    if config.recognizer_onnx:
        from ray_faceid.face.backends.onnx_encoder import OnnxArcFaceEncoder

        backend.encoder = OnnxArcFaceEncoder(config.recognizer_onnx)
    return backend
