"""Optional backends: an ArcFace-shaped ONNX recogniser, and insightface packs from a user folder."""
import numpy as np
import pytest

from ray_faceid.config import FaceConfig
from ray_faceid.errors import BackendUnavailable
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.backends import build_backend


def test_onnx_recogniser_replaces_the_encoder(tiny_arcface_onnx, sample_photos):
    analyzer = FaceAnalyzer(FaceConfig(recognizer_onnx=str(tiny_arcface_onnx)))
    faces = analyzer.analyze(sample_photos["Tom_Hanks_54745.png"])
    assert faces[0].embedding.shape == (64,)
    assert analyzer.spec.name == "arcface_onnx" and analyzer.spec.metric == "cosine"
    assert analyzer.spec.version.startswith("tiny_arcface.onnx@")
    same, dist = analyzer.verify(faces[0], faces[0])
    assert same and dist == pytest.approx(0.0, abs=1e-6)


def test_onnx_recogniser_with_the_wrong_input_shape_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "wrong.onnx"
    torch.onnx.export(torch.nn.Flatten().eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False)
    with pytest.raises(BackendUnavailable, match="not N x 3 x 112 x 112"):
        FaceAnalyzer(FaceConfig(recognizer_onnx=str(path)))


def test_an_onnx_file_that_is_no_recogniser_is_refused_in_one_line(tmp_path):
    """Two inputs, an image out, or not ONNX at all: one typed line naming the file, not onnxruntime's
    traceback at the first face (the new-user trial's crash)."""
    torch = pytest.importorskip("torch")

    class TwoInputs(torch.nn.Module):
        def forward(self, x, y):
            return x.flatten(1)[:, :8] + y

    class ImageOut(torch.nn.Module):
        def forward(self, x):
            return x * 2

    two, image, junk = tmp_path / "two.onnx", tmp_path / "image.onnx", tmp_path / "junk.onnx"
    torch.onnx.export(TwoInputs().eval(), (torch.zeros(1, 3, 112, 112), torch.zeros(1, 8)), str(two), dynamo=False)
    torch.onnx.export(ImageOut().eval(), (torch.zeros(1, 3, 112, 112),), str(image), dynamo=False)
    junk.write_bytes(b"not an onnx model")
    for path, says in ((two, "takes 2 inputs"), (image, "gives outputs of shape"), (junk, "not an ONNX model")):
        with pytest.raises(BackendUnavailable, match=says) as refused:
            FaceAnalyzer(FaceConfig(recognizer_onnx=str(path)))
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_recogniser_exported_at_batch_one_embeds_several_faces(tmp_path):
    """A recogniser exported without a dynamic batch (N fixed at 1) embeds several faces, each as it would
    alone."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 32)).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False)
    encoder = FaceAnalyzer(FaceConfig(recognizer_onnx=str(path))).backend.encoder
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    together = encoder.embed_crops(crops)
    assert together.shape == (3, 32)
    assert np.allclose(together, np.concatenate([encoder.embed_crops(crops[k:k + 1]) for k in range(3)]), atol=1e-5)


def test_insightface_needs_a_user_folder_and_says_why(tmp_path):
    with pytest.raises(BackendUnavailable, match="non-commercial"):
        build_backend(FaceConfig(backend="insightface"))
    pytest.importorskip("insightface")
    with pytest.raises(BackendUnavailable, match="no SCRFD detection ONNX file"):
        build_backend(FaceConfig(backend="insightface", insightface_root=str(tmp_path)))


def test_a_damaged_or_foreign_detector_in_a_pack_is_refused_in_one_line(tmp_path, tiny_arcface_onnx):
    """A pack copied half-way, or a folder whose 'det' file is no SCRFD detector: one line naming the file."""
    pytest.importorskip("insightface")
    (tmp_path / "glintr100.onnx").write_bytes(tiny_arcface_onnx.read_bytes())
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(tiny_arcface_onnx.read_bytes()[:3000])
    with pytest.raises(BackendUnavailable, match="scrfd_10g_bnkps.onnx: not an ONNX model onnxruntime can load"):
        build_backend(FaceConfig(backend="insightface", insightface_root=str(tmp_path)))
    (tmp_path / "scrfd_10g_bnkps.onnx").write_bytes(tiny_arcface_onnx.read_bytes())  # a recogniser named as a detector
    with pytest.raises(BackendUnavailable, match="scrfd_10g_bnkps.onnx: not an SCRFD face detector"):
        build_backend(FaceConfig(backend="insightface", insightface_root=str(tmp_path)))


def test_insightface_07s_detector_class_is_taken_as_the_packs_detector(tmp_path, tiny_arcface_onnx, monkeypatch):
    """insightface 0.7 routes SCRFD files to its RetinaFace class (no SCRFD subclass): a detector by its task."""
    pytest.importorskip("insightface")
    from insightface.model_zoo import model_zoo

    from ray_faceid.face.backends.insightface_backend import ScrfdDetector

    class RetinaFace:  # what 0.7.3's model_zoo.get_model returns for antelopev2's and buffalo_l's detectors
        taskname = "detection"

        def prepare(self, **_):
            pass

        def detect(self, image, **_):
            return np.zeros((0, 5)), None

    monkeypatch.setattr(model_zoo, "get_model", lambda path, **_: RetinaFace())
    assert ScrfdDetector(str(tmp_path / "det_10g.onnx")).detect(np.zeros((8, 8, 3), np.uint8)) == []


def test_jitter_needs_the_dlib_runtime_and_says_so():
    with pytest.raises(BackendUnavailable, match="num_jitters needs the dlib encoder runtime"):
        FaceAnalyzer(FaceConfig(num_jitters=2))
    jittered = FaceAnalyzer(FaceConfig(num_jitters=2, encoder_runtime="dlib"))
    assert jittered.spec.dim == 128
    assert np.isfinite(jittered.threshold)


@pytest.mark.parametrize("pack,detector,recogniser", [
    (("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"), "det_10g.onnx", "w600k_r50.onnx"),
    (("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
     "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
])
def test_an_insightface_pack_folder_gives_its_detector_and_recogniser(tmp_path, pack, detector, recogniser):
    """buffalo_l (FaceID) and antelopev2 (InstantID) as their authors ship them: the 106-point
    landmark model is not the detector, glintr100 is antelopev2's recogniser."""
    from ray_faceid.face.backends.insightface_backend import pack_files

    for name in pack:
        (tmp_path / name).write_bytes(b"")
    assert pack_files(str(tmp_path), "PACK") == (str(tmp_path / detector), str(tmp_path / recogniser))
