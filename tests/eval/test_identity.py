import numpy as np
import pytest

from ray_faceid.eval.identity import identity_similarity, leakage, reference_embedding
from ray_faceid.eval.verification import roc_auc
from ray_faceid.face.face import Face
from ray_faceid.face.landmarks import INSIGHTFACE5, Landmarks


def face_with(embedding) -> Face:
    return Face(bbox=(0, 0, 10, 10), score=1.0, landmarks=Landmarks(INSIGHTFACE5, np.zeros((5, 2))),
                embedding=np.asarray(embedding, float))


def test_leakage_assigns_faces_to_identities_by_hungarian_matching():
    a, b = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    # face 0 looks like a blend leaning to b; face 1 is clearly a: greedy would give face 0 to b
    # and then face 1 to a as well, the assignment must be one face per identity.
    faces = [face_with([0.6, 0.8, 0]), face_with([0.95, 0.1, 0])]
    scores = {s.identity: s for s in leakage(faces, {"a": a, "b": b})}
    assert scores["a"].matched_similarity == pytest.approx(0.9945, abs=1e-3)
    assert scores["b"].matched_similarity == pytest.approx(0.8)
    assert scores["b"].wrong_similarity == pytest.approx(0.6)  # the face given to b is 0.6 like a


def test_each_score_names_its_matched_face_not_the_most_similar_one():
    """The API's same_person used the face most similar to the person while similarity came from
    the matched face: here a's most similar face (0) is matched to b."""
    a, b = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    faces = [face_with([0.75, 0.65, 0.12]), face_with([0.7, 0.0, 0.71])]
    scores = {s.identity: s for s in leakage(faces, {"a": a, "b": b})}
    assert scores["a"].face == 1 and scores["b"].face == 0


def test_leakage_reports_missing_faces():
    scores = leakage([face_with([1.0, 0, 0])], {"a": np.array([1.0, 0, 0]), "b": np.array([0, 1.0, 0])})
    assert [s.face_found for s in scores] == [True, False]


def test_reference_embedding_is_quality_weighted():
    ref = reference_embedding(np.array([[1.0, 0], [0, 1.0]]), weights=np.array([3.0, 1.0]))
    assert np.allclose(ref, [0.75, 0.25])


def test_roc_auc_extremes():
    assert roc_auc(np.array([3.0, 2, 1, 0]), np.array([True, True, False, False])) == 1.0
    assert roc_auc(np.array([0.0, 1, 2, 3]), np.array([True, True, False, False])) == 0.0


def test_identity_similarity_on_real_photos(analyzer, faces_root):
    obama = sorted((faces_root / "obama").glob("*"))
    biden = sorted((faces_root / "biden").glob("*"))
    ref = analyzer.analyze(obama[0])[0].embedding
    report = identity_similarity(analyzer, [str(p) for p in obama[1:] + biden] + [b"broken"], ref)
    scores = report.per_image
    assert all(s.same for s in scores[: len(obama) - 1])
    assert not any(s.same for s in scores[len(obama) - 1 : -1])
    assert scores[-1].error and not scores[-1].face_found
    assert report.detection_rate == pytest.approx((len(scores) - 1) / len(scores))
