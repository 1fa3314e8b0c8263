"""Face backends behind one protocol; `build_backend(config)` picks one."""
from ray_faceid.face.backends.base import Detection, Detector, Encoder, FaceBackend, Landmarker
from ray_faceid.face.backends.factory import build_backend

__all__ = ["Detection", "Detector", "Encoder", "FaceBackend", "Landmarker", "build_backend"]
