"""The port of dlib's ResNet is the same function as dlib's own runtime, on torch and as an ONNX
Runtime engine."""
import importlib.util

import numpy as np
import pytest
import torch

from ray_faceid.config import DetectionConfig, FaceConfig
from ray_faceid.engines.cache import EngineCache
from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.backends.dlib_backend import DlibEncoder, PortedDlibEncoder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """dlib's own runtime, then the port on every runtime this machine has."""
    ported = [PortedDlibEncoder(device="cpu")]
    if importlib.util.find_spec("onnxruntime"):
        ported.append(PortedDlibEncoder(runtime="onnxruntime", cache=EngineCache(tmp_path_factory.mktemp("engines"))))
    return DlibEncoder(), ported


def located(analyzer, paths):
    out = []
    for p in paths:
        image = analyzer.load(str(p))
        out.append((image, [f.landmarks for f in analyzer._locate(image)]))
    return out


def assert_same_descriptors(encoders, items):
    dlib_enc, ported = encoders
    images, landmarks = [i for i, _ in items], [lm for _, lm in items]
    theirs = np.concatenate(dlib_enc.embed(images, landmarks))
    assert len(theirs) > 0
    for encoder in ported:
        assert encoder.spec == dlib_enc.spec
        ours = np.concatenate(encoder.embed(images, landmarks))
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 1e-3, encoder.engine.backend


def test_matches_dlib_on_the_bundled_photos(encoders, sample_photos):
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    assert_same_descriptors(encoders, located(analyzer, sample_photos.values()))


def test_matches_dlib_on_every_face_of_the_shared_set(encoders, faces_root):
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)))
    paths = sorted(p for p in faces_root.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(paths) > 100
    assert_same_descriptors(encoders, located(analyzer, paths))


def test_the_onnx_engine_matches_the_torch_port_at_any_batch(encoders, sample_photos):
    _, ported = encoders
    if len(ported) < 2:
        pytest.skip("onnxruntime is not installed (the onnx extra)")
    torch_enc, onnx_enc = ported
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    (image, lms), = located(analyzer, [sample_photos["t1.jpg"]])
    chips = np.stack(torch_enc.chips(image, lms))
    for n in (1, len(chips)):
        got = onnx_enc.embed_chips(chips[:n])
        assert got.shape == (n, 128)
        assert np.abs(got - torch_enc.embed_chips(chips[:n])).max() < 1e-4


def test_the_onnx_engine_is_built_once(tmp_path):
    pytest.importorskip("onnxruntime")
    cache = EngineCache(tmp_path)
    PortedDlibEncoder(runtime="onnxruntime", cache=cache)
    (entry,) = tmp_path.iterdir()
    built = (entry / "meta.json").stat().st_mtime_ns
    PortedDlibEncoder(runtime="onnxruntime", cache=cache)
    assert [entry] == list(tmp_path.iterdir()) and (entry / "meta.json").stat().st_mtime_ns == built


def test_tensorrt_runtime_without_tensorrt_says_how_to_install(tmp_path):
    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: benchmarks/gpu_check.py exercises this runtime")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        PortedDlibEncoder(runtime="tensorrt", cache=EngineCache(tmp_path))
    assert not list(tmp_path.iterdir())  # refused before any export


def test_face_config_selects_the_runtime(sample_photos, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path))
    default = FaceAnalyzer(FaceConfig())
    onnx = FaceAnalyzer(FaceConfig(encoder_runtime="onnxruntime"))
    assert onnx.spec == default.spec and FaceConfig(encoder_runtime="onnxruntime").compute_hash() == FaceConfig().compute_hash()
    image = default.load(str(sample_photos["Tom_Hanks_54745.png"]))
    a, b = default.analyze(image), onnx.analyze(image)
    assert len(a) == len(b) == 1 and np.abs(a[0].embedding - b[0].embedding).max() < 1e-4
