import numpy as np
import pytest

from ray_faceid.face.align import ARCFACE_112, LOOSE_512, align, estimate_transform
from ray_faceid.face.landmarks import DLIB5, INSIGHTFACE5, Landmarks


def arcface_points() -> np.ndarray:
    return np.array([ARCFACE_112.points[n] for n in INSIGHTFACE5.names])


def moved(points: np.ndarray, angle=0.3, scale=2.5, shift=(40.0, 25.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ (scale * np.array([[c, -s], [s, c]])).T + np.array(shift)


def test_alignment_puts_named_points_on_the_template():
    lm = Landmarks(INSIGHTFACE5, moved(arcface_points()))
    matrix = estimate_transform(lm, ARCFACE_112)
    assert np.allclose(lm.transformed(matrix).points, arcface_points(), atol=1e-6)


def test_dlib5_aligns_by_eye_centres_from_corners():
    right, left = np.array(ARCFACE_112.points["right_eye"]), np.array(ARCFACE_112.points["left_eye"])
    corners = np.array([left + (8, 0), left - (8, 0), right - (8, 0), right + (8, 0), (56.0, 75.0)])
    lm = Landmarks(DLIB5, moved(corners))
    matrix = estimate_transform(lm, ARCFACE_112)
    out = lm.transformed(matrix)
    assert np.allclose(out.point("right_eye"), right, atol=1e-6)
    assert np.allclose(out.point("left_eye"), left, atol=1e-6)


def test_loose_template_keeps_the_face_smaller_and_centred():
    eyes = np.array(LOOSE_512.points["left_eye"]) - np.array(LOOSE_512.points["right_eye"])
    assert 0.15 < eyes[0] / 512 < 0.3
    assert abs(np.mean([p[0] for p in LOOSE_512.points.values()]) - 256) < 5


def test_matches_insightface_norm_crop():
    face_align = pytest.importorskip("insightface.utils.face_align")
    from PIL import Image, ImageFilter

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2)))
    kps = moved(arcface_points(), angle=0.1, scale=1.7, shift=(60, 50)).astype(np.float32)
    ours, _ = align(image, Landmarks(INSIGHTFACE5, kps.astype(np.float64)))
    theirs = face_align.norm_crop(image, kps)
    assert ours.shape == theirs.shape == (112, 112, 3)
    # Same geometry and pixel-centre convention; only rounding in the bilinear sampling differs.
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 1.0
    ours_matrix = estimate_transform(Landmarks(INSIGHTFACE5, kps.astype(float)), ARCFACE_112)
    assert np.allclose(face_align.estimate_norm(kps), ours_matrix, atol=1e-3)


def test_too_few_shared_points_is_an_error():
    from ray_faceid.face.align import Template

    nose_only = Template("nose", 64, {"nose_tip": (32.0, 32.0)})
    with pytest.raises(ValueError, match="fewer than 2 points"):
        estimate_transform(Landmarks(INSIGHTFACE5, arcface_points()), nose_only)
