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

        try:
            self._model = model_zoo.get_model(onnx_path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise BackendUnavailable(f"{onnx_path}: not an ONNX model onnxruntime can load "
                                     f"({str(exc).splitlines()[0][:160]}): copy the pack again") from None
        # insightface tells its models apart by their inputs and outputs (0.7's routes SCRFD to RetinaFace).
        if getattr(self._model, "taskname", None) != "detection" or not hasattr(self._model, "detect"):
            raise BackendUnavailable(f"{onnx_path}: not an SCRFD face detector (a file with 'det' or 'scrfd' in its "
                                     "name is read as the pack's detector)")
        self._model.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=threshold)

    def detect(self, image: np.ndarray) -> list[Detection]:
        bboxes, kpss = self._model.detect(image[:, :, ::-1].copy(), max_num=0, metric="default")
        found = []
        for i, box in enumerate(bboxes):
            lm = Landmarks(INSIGHTFACE5, kpss[i].astype(np.float64)) if kpss is not None else None
            found.append(Detection(tuple(float(v) for v in box[:4]), float(box[4]), lm))
        return found


# Other models of insightface's packs (106- and 68-point landmarks, gender and age): never the detector
# or the recogniser, though `2d106det` has "det" in its name.
OTHER_PACK_MODELS = ("2d106det", "1k3d68", "genderage")
RECOGNISER_NAMES = ("w600k", "glintr", "arcface", "rec", "r100", "r50")  # buffalo_l: w600k_r50, antelopev2: glintr100


def pack_files(folder: str, root: str) -> tuple[str, str | None]:
    """(detection, recognition) ONNX files of an insightface pack folder (buffalo_l, antelopev2, or
    a user's own SCRFD and ArcFace files), chosen by name."""
    onnx_files = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
    usable = [f for f in onnx_files if not any(other in f.lower() for other in OTHER_PACK_MODELS)]
    detectors = [f for f in usable if "det" in f.lower() or "scrfd" in f.lower()]
    recognisers = [f for f in usable if f not in detectors and any(n in f.lower() for n in RECOGNISER_NAMES)]
    if not detectors:
        raise BackendUnavailable(f"no SCRFD detection ONNX file (name containing 'det' or 'scrfd') in {root}")
    return (os.path.join(folder, detectors[0]),
            os.path.join(folder, recognisers[0]) if recognisers else None)


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
    detector, rec = pack_files(folder, root)
    rec = recognizer_onnx or rec
    if rec is None:
        raise BackendUnavailable(f"no ArcFace recognition ONNX file in {root}; set recognizer_onnx")
    return FaceBackend(
        name="insightface",
        # One onnxruntime session serves every thread: its run() is thread-safe.
        make_detector=lambda shared=ScrfdDetector(detector, threshold=det_threshold): shared,
        encoder=OnnxArcFaceEncoder(rec, name="insightface_arcface", license=LICENSE_NOTE),
        license_note=LICENSE_NOTE,
    )
