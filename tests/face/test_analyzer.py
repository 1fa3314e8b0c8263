"""The face stack on real photos with real weights."""
import csv

import numpy as np
import pytest
from PIL import Image

from ray_faceid.config import DetectionConfig, FaceConfig
from ray_faceid.errors import BadImage, EncoderMismatch
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.face.spec import EncoderSpec


def test_finds_the_six_people_in_t1(analyzer, sample_photos):
    faces = analyzer.analyze(sample_photos["t1.jpg"])
    assert len(faces) == 6
    for f in faces:
        assert f.embedding.shape == (128,) and f.spec.name == "dlib_resnet"
        assert f.aligned.shape == (112, 112, 3)
        assert {"yaw", "pitch", "roll", "smile"} <= set(f.attributes)
        assert 0 <= f.quality["score"] <= 1
    # six different people: no two of them verify as the same person
    for i in range(6):
        for j in range(i + 1, 6):
            same, dist = analyzer.verify(faces[i], faces[j])
            assert not same, (i, j, dist)


def test_largest_policy_returns_one_face(analyzer, sample_photos):
    largest = FaceAnalyzer(FaceConfig(), backend=analyzer.backend).analyze(sample_photos["t1.jpg"])
    assert len(largest) == 1
    widths = [f.width for f in analyzer.analyze(sample_photos["t1.jpg"])]
    assert largest[0].width == max(widths)


def test_same_person_survives_mirror_and_grayscale(analyzer, sample_photos):
    img = np.asarray(Image.open(sample_photos["Tom_Hanks_54745.png"]).convert("RGB"))
    base = analyzer.analyze(img)[0]
    mirrored = analyzer.analyze(np.ascontiguousarray(img[:, ::-1]))[0]
    grey = analyzer.analyze(np.asarray(Image.fromarray(img).convert("L").convert("RGB")))[0]
    for other in (mirrored, grey):
        same, dist = analyzer.verify(base, other)
        assert same and dist < 0.45
    # mirrored: the head turns the other way
    assert np.sign(base.attributes["yaw"]) != np.sign(mirrored.attributes["yaw"])


def test_blank_image_has_no_face_and_bad_bytes_raise(analyzer):
    assert analyzer.analyze(np.full((200, 200, 3), 255, np.uint8)) == []
    with pytest.raises(BadImage, match="not an image"):
        analyzer.analyze(b"definitely not a jpeg")
    results = analyzer.analyze_batch([b"", np.full((64, 64, 3), 0, np.uint8)], return_errors=True)
    assert isinstance(results[0], BadImage) and "empty file" in results[0].message
    assert results[1] == []


def test_embeddings_from_another_encoder_are_refused(analyzer, sample_photos):
    face = analyzer.analyze(sample_photos["Tom_Hanks_54745.png"])[0]
    other = EncoderSpec(name="arcface_onnx", dim=512, version="x", license="-", metric="cosine", threshold=0.6)
    face.spec = other
    with pytest.raises(EncoderMismatch, match="arcface_onnx/512/x"):
        analyzer.verify(face, face)


def test_large_photos_are_detected_downscaled_and_mapped_back(analyzer, sample_photos):
    img = np.asarray(Image.open(sample_photos["t1.jpg"]).convert("RGB"))
    big = np.asarray(Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3)))
    small_boxes = np.array(sorted(f.bbox for f in analyzer.analyze(img)))
    big_boxes = np.array(sorted(f.bbox for f in analyzer.analyze(big))) / 3
    assert len(big_boxes) == 6
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    width = small_boxes[:, 2] - small_boxes[:, 0]
    assert (np.linalg.norm(centre(big_boxes) - centre(small_boxes), axis=1) < 0.2 * width).all()


@pytest.mark.parametrize("kind", ["group", "nonface"])
def test_face_counts_on_group_and_nonface_photos(analyzer, faces_root, kind):
    rows = [r for r in csv.DictReader(open(faces_root / "manifest.csv")) if r["kind"] == kind]
    results = analyzer.analyze_batch([str(faces_root / r["path"]) for r in rows])
    for row, faces in zip(rows, results):
        expected = int(row["dlib_hog_faces"] or 0)
        assert len(faces) == expected, row["path"]


def test_hard_faces_are_found(faces_root):
    """The tight 150 px crops, the side profile and the hand-covered face the naive pipeline misses."""
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig()))
    hard = ["compreface_e2e_j/personJ-img4.jpg", "stuart/stuart5.png", "amy/amy1.png", "tom_hanks/Tom_Hanks_54745.png"]
    paths = [str(faces_root / h) for h in hard if (faces_root / h).exists()]
    assert all(len(f) == 1 for f in analyzer.analyze_batch(paths))
