"""insightface model packs (SCRFD detector + ArcFace recogniser) from a folder the user provides.

Nothing is downloaded: insightface's pretrained packs are for non-commercial research only, so
the user must bring a pack (or their own ONNX files) and accept its licence.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ray_faceid import storage
from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.backends.base import Detection, FaceBackend
from ray_faceid.face.backends.onnx_encoder import OnnxArcFaceEncoder
from ray_faceid.face.landmarks import INSIGHTFACE5, Landmarks

LICENSE_NOTE = "insightface pretrained model packs: non-commercial research use only (check your pack's terms)."


def _local_folder(uri: str) -> str:
    """A local copy of a model folder given as any fsspec URI."""
    fs, path = storage.filesystem(uri)
    if fs.protocol in ("file", ("file", "local")) or "://" not in uri:
        return path
    local = tempfile.mkdtemp(prefix="ray_faceid_models_")
    fs.get(path.rstrip("/") + "/", local, recursive=True)
    return local


class ScrfdDetector:
    def __init__(self, onnx_path: str, det_size: int = 640, threshold: float = 0.5):
        from insightface.model_zoo import model_zoo

        self._model = model_zoo.get_model(onnx_path)
        self._model.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=threshold)

    def detect(self, image: np.ndarray) -> list[Detection]:
        bboxes, kpss = self._model.detect(image[:, :, ::-1].copy(), max_num=0, metric="default")
        found = []
        for i, box in enumerate(bboxes):
            lm = Landmarks(INSIGHTFACE5, kpss[i].astype(np.float64)) if kpss is not None else None
            found.append(Detection(tuple(float(v) for v in box[:4]), float(box[4]), lm))
        return found


def build_insightface_backend(root: str | None, det_threshold: float = 0.5, recognizer_onnx: str | None = None):
    if not root:
        raise BackendUnavailable(
            "backend 'insightface' needs insightface_root: a folder with a detection (SCRFD) and a recognition "
            "(ArcFace) ONNX file. insightface's pretrained packs are non-commercial; bring your own."
        )
    try:
        import insightface  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable("backend 'insightface' needs: pip install 'ray_faceid[insightface]'") from exc
    folder = _local_folder(root)
    if not os.path.isdir(folder):
        raise BackendUnavailable(f"insightface model folder {root} does not exist")
    onnx_files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".onnx"))
    detectors = [f for f in onnx_files if "det" in os.path.basename(f) or "scrfd" in os.path.basename(f).lower()]
    recognizers = [f for f in onnx_files if f not in detectors and ("w600k" in f or "arcface" in f.lower() or "rec" in f)]
    if not detectors:
        raise BackendUnavailable(f"no SCRFD detection ONNX file (name containing 'det' or 'scrfd') in {root}")
    rec = recognizer_onnx or (recognizers[0] if recognizers else None)
    if rec is None:
        raise BackendUnavailable(f"no ArcFace recognition ONNX file in {root}; set recognizer_onnx")
    return FaceBackend(
        name="insightface",
        # One onnxruntime session serves every thread: its run() is thread-safe.
        make_detector=lambda shared=ScrfdDetector(detectors[0], threshold=det_threshold): shared,
        encoder=OnnxArcFaceEncoder(rec, name="insightface_arcface", license=LICENSE_NOTE),
        license_note=LICENSE_NOTE,
    )
