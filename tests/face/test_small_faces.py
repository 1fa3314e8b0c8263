"""Group photos keep their far-away people: the small-face pass (MTCNN) and when it runs."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from ray_faceid.config import DetectionConfig, FaceConfig
from ray_faceid.face.backends.base import Detection
from ray_faceid.face.detect import detect_faces

if importlib.util.find_spec("facenet_pytorch") is None:  # located, never imported (it needs torchvision)
    pytest.skip("the small-face pass needs MTCNN's weights: pip install --no-deps facenet-pytorch (make setup does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def far_group(sample_photos):
    """insightface's t1.jpg (six people, faces ~100 px) shrunk to faces of ~22 px in a 2400 x 1600 photo."""
    photo = Image.open(sample_photos["t1.jpg"]).convert("RGB")
    small = photo.resize((round(photo.width * 0.22), round(photo.height * 0.22)), Image.Resampling.LANCZOS)
    ramp = np.linspace(90, 200, 2400, dtype=np.float32)
    canvas = Image.fromarray(np.stack([np.tile(ramp, (1600, 1))] * 3, -1).astype(np.uint8))
    canvas.paste(small, (900, 700))
    return np.asarray(canvas)


def test_far_away_people_are_found_and_flagged_small(far_group):
    from ray_faceid.face.analyzer import FaceAnalyzer

    fast_only = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all", small_faces=False)))
    assert fast_only.analyze(far_group) == []  # what the reporter saw: HOG at its working size sees no one
    faces = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all"))).analyze(far_group)
    assert 5 <= len(faces) <= 6
    assert all(900 <= f.bbox[0] and 700 <= f.bbox[1] for f in faces)  # on the people, not the background
    assert all(f.quality["small"] == 1.0 and f.embedding is not None for f in faces)


class Fixed:
    def __init__(self, boxes):
        self.boxes, self.calls = boxes, 0

    def detect(self, image, min_face=None):
        self.calls += 1
        return [Detection(b, 1.0) for b in self.boxes]


def test_the_small_face_pass_runs_only_without_a_dominant_face_and_adds_only_new_faces():
    config = DetectionConfig(policy="all", upsample_below_side=0)
    image = np.zeros((600, 800, 3), np.uint8)
    portrait, small = Fixed([(300, 100, 500, 300)]), Fixed([(320, 120, 480, 280), (10, 10, 30, 30)])
    assert len(detect_faces(image, portrait, config, small=small)) == 1 and small.calls == 0  # 200 px of 600: dominant
    group, small = Fixed([(100, 100, 160, 160), (300, 100, 360, 160)]), Fixed([(105, 105, 155, 155), (10, 10, 30, 30)])
    found = detect_faces(image, group, config, small=small)
    assert small.calls == 1 and sorted(d.bbox for d in found)[0] == (10, 10, 30, 30) and len(found) == 3


def test_without_mtcnns_weights_the_pass_is_off_and_says_so(monkeypatch, caplog):
    from ray_faceid.face.backends import dlib_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    monkeypatch.setattr(dlib_backend, "_SAID_NO_SMALL_FACES", [])
    assert dlib_backend.small_face_detector(14.0) is None
    assert "pip install --no-deps facenet-pytorch" in caplog.text
