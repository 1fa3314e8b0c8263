"""SFace, the embedded independent recogniser: OpenCV's own numbers, real verification, eval's default."""
from __future__ import annotations

import numpy as np
import pytest

from ray_faceid.config import FaceConfig
from ray_faceid.face.backends.sface_encoder import sface_available

pytestmark = pytest.mark.skipif(sface_available() is not None, reason=f"SFace not installed: {sface_available()}")


@pytest.fixture(scope="module")
def sface():
    from ray_faceid.face.analyzer import FaceAnalyzer

    return FaceAnalyzer(FaceConfig(recognizer="sface"))


def test_each_crop_gets_the_embedding_opencvs_own_recogniser_gives(sface, sample_photos):
    import cv2
    from PIL import Image

    from ray_faceid.face.backends.sface_encoder import bundled_weights

    crops = np.stack([np.asarray(Image.open(p).convert("RGB").resize((112, 112))) for p in sample_photos.values()]
                     + [np.full((112, 112, 3), 90, np.uint8)])
    reference = cv2.FaceRecognizerSF.create(str(bundled_weights()), "")
    expected = np.concatenate([reference.feature(np.ascontiguousarray(c[..., ::-1])) for c in crops])
    # Several crops in one call: OpenCV gives garbage rows when this file runs a batch in one forward.
    np.testing.assert_allclose(sface.backend.encoder.embed_crops(crops), expected, atol=1e-5)


def test_sface_verifies_the_shared_pairs(sface, faces_root):
    from ray_faceid.eval.verification import evaluate_pairs, read_pairs

    def embed(paths):
        return [f[0].embedding if f else None for f in sface.analyze_batch(paths)]

    report = evaluate_pairs(embed, read_pairs(faces_root / "pairs.csv"), faces_root, sface.spec.key(),
                            sface.spec.distance, sface.threshold)
    assert report.no_face_pairs == 0
    assert report.accuracy >= 0.97 and report.roc_auc >= 0.98  # measured: 0.985, 0.990 (benchmarks/recognizers.py)


def test_its_spec_names_its_weights_and_licence_and_differs_from_the_default(sface, analyzer):
    assert sface.spec.key().startswith("sface/128/face_recognition_sface_2021dec_int8bq.onnx@fb143eea0783")
    assert sface.spec.license == "Apache-2.0 (OpenCV Zoo)"
    assert sface.spec.key() != analyzer.spec.key()


def test_one_recogniser_at_a_time():
    with pytest.raises(ValueError, match="pick one"):
        FaceConfig(recognizer="sface", recognizer_onnx="model.onnx")
