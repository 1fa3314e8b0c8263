"""The torch port of dlib's ResNet is the same function as dlib's own runtime."""
import numpy as np
import pytest

from ray_faceid.config import DetectionConfig, FaceConfig
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.backends.dlib_backend import DlibEncoder, DlibTorchEncoder


@pytest.fixture(scope="module")
def encoders():
    return DlibEncoder(), DlibTorchEncoder(device="cpu")


def located(analyzer, paths):
    out = []
    for p in paths:
        image = analyzer.load(str(p))
        out.append((image, [f.landmarks for f in analyzer._locate(image)]))
    return out


def assert_same_descriptors(encoders, items):
    dlib_enc, torch_enc = encoders
    assert dlib_enc.spec == torch_enc.spec
    images, landmarks = [i for i, _ in items], [lm for _, lm in items]
    ours = np.concatenate(torch_enc.embed(images, landmarks))
    theirs = np.concatenate(dlib_enc.embed(images, landmarks))
    assert ours.shape == theirs.shape and len(ours) > 0
    assert np.abs(ours - theirs).max() < 1e-3


def test_matches_dlib_on_the_bundled_photos(encoders, sample_photos):
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    assert_same_descriptors(encoders, located(analyzer, sample_photos.values()))


def test_matches_dlib_on_every_face_of_the_shared_set(encoders, faces_root):
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)))
    paths = sorted(p for p in faces_root.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(paths) > 100
    assert_same_descriptors(encoders, located(analyzer, paths))


def test_exports_to_onnx_with_a_dynamic_batch(encoders, sample_photos, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import torch

    _, torch_enc = encoders
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    (image, lms), = located(analyzer, [sample_photos["t1.jpg"]])
    chips = np.stack(torch_enc.chips(image, lms))
    path = tmp_path / "dlib_resnet.onnx"
    torch.onnx.export(torch_enc.net, (torch.from_numpy(chips[:2]),), str(path), dynamo=False,
                      input_names=["chips"], output_names=["embeddings"], dynamic_axes={"chips": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"chips": chips})[0]
    assert got.shape == (6, 128)
    assert np.abs(got - torch_enc.embed_chips(chips)).max() < 1e-4
