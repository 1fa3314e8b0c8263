"""Clustering that does not chain people together, and the scores that say so."""
import numpy as np
import pytest

from ray_faceid.data.clustering import chinese_whispers, cluster_faces, cohesion
from ray_faceid.eval.clustering import clustering_scores
from ray_faceid.face.spec import EncoderSpec

SPEC = EncoderSpec(name="toy", dim=2, version="t", license="-", metric="euclidean", threshold=0.6)


def two_close_people(seed=0):
    """Two people 0.62 apart on average: some cross pairs are under the 0.6 threshold (a chain for
    Chinese whispers), their faces are not close on average."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.07, size=(12, 2))
    b = rng.normal(0, 0.07, size=(12, 2)) + [0.62, 0.0]
    return np.concatenate([a, b]), ["a"] * 12 + ["b"] * 12


def test_average_linkage_keeps_apart_two_people_chinese_whispers_merges():
    embeddings, people = two_close_people()
    assert (np.linalg.norm(embeddings[:12, None] - embeddings[None, 12:], axis=-1) < SPEC.threshold).any()
    old = clustering_scores(list(chinese_whispers(embeddings, SPEC, SPEC.threshold)), people)
    assert old["people_per_cluster_max"] == 2 and old["purity"] == 0.5
    for method in ("graph", "average"):  # the kNN graph's communities (default) and exact average linkage
        new = clustering_scores(list(cluster_faces(embeddings, SPEC, method=method)), people)
        assert new == {**new, "clusters": 2, "purity": 1.0, "bcubed_f1": 1.0, "people_per_cluster_max": 1}, method


def test_cohesion_flags_a_cluster_whose_members_do_not_verify_against_its_centre():
    embeddings, _ = two_close_people()
    assert not cohesion(embeddings[:12], SPEC).flagged
    merged = cohesion(np.concatenate([embeddings[:12], embeddings[12:] + [0.8, 0]]), SPEC)
    assert merged.flagged and merged.centre_distance_max > SPEC.threshold


def test_clustering_scores_on_a_known_case():
    # clusters: {a, a, b} and {b}: one impure cluster, person b split in two
    scores = clustering_scores([0, 0, 0, 1], ["a", "a", "b", "b"])
    assert scores["purity"] == 0.75
    assert scores["bcubed_precision"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1) / 4, abs=1e-4)
    assert scores["bcubed_recall"] == pytest.approx((1 + 1 + 1 / 2 + 1 / 2) / 4, abs=1e-4)
    assert scores["clusters_per_person_max"] == 2 and scores["people_per_cluster_max"] == 2
    with pytest.raises(ValueError, match="3 cluster labels for 4 faces"):
        clustering_scores([0, 0, 1], ["a", "a", "b", "b"])


def test_cluster_numbers_follow_first_appearance_and_cosine_encoders_work():
    spec = SPEC.model_copy(update={"metric": "cosine", "threshold": 0.4})
    embeddings = np.array([[1, 0.01], [0.01, 1], [1, 0.02], [0.02, 1]])
    assert cluster_faces(embeddings, spec).tolist() == [0, 1, 0, 1]
    assert cluster_faces(np.zeros((0, 2)), spec).tolist() == []
