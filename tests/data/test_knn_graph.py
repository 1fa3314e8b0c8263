"""Large-archive grouping: the kNN graph (FAISS) and its communities (Leiden) recover synthetic
people as well as exact average linkage does, the search sharded over Ray workers gives the same
graph, and bad embeddings are refused instead of silently clustered."""
import numpy as np
import pytest

from ray_faceid.data.knn_graph import graph_clusters, knn_graph, knn_graph_on_ray
from ray_faceid.errors import BadInput
from ray_faceid.eval.clustering import clustering_scores
from ray_faceid.face.spec import EncoderSpec

SPEC = EncoderSpec(name="synthetic", dim=128, version="1", license="-", metric="euclidean", threshold=0.6)


def people(count: int, seed: int = 0):
    """Identities as dlib's encoder spreads them: within a person ~0.4 apart, between people ~0.9."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, count)
    centres = rng.normal(size=(count, 128)) * (0.63 / np.sqrt(128))
    truth = np.repeat(np.arange(count), sizes)
    faces = centres[truth] + rng.normal(size=(len(truth), 128)) * (0.28 / np.sqrt(128))
    return faces.astype(np.float32), truth


def test_the_knn_graph_groups_people_like_exact_average_linkage():
    from ray_faceid.data.clustering import cluster_faces

    faces, truth = people(300)
    exact = clustering_scores(list(cluster_faces(faces, SPEC, method="average")), list(truth))
    graph = clustering_scores(list(graph_clusters(*knn_graph(faces, SPEC), 0.85 * SPEC.threshold)), list(truth))
    assert graph["bcubed_f1"] >= exact["bcubed_f1"] - 0.02 and graph["purity"] >= 0.98, (graph, exact)


def test_the_search_sharded_over_two_ray_workers_gives_the_same_graph(ray_cluster):
    faces, _ = people(120, seed=1)
    local, local_d = knn_graph(faces, SPEC, k=8)
    sharded, sharded_d = knn_graph_on_ray(faces, SPEC, k=8, workers=2, block=50)  # 3 blocks, 2 actors
    assert np.array_equal(np.sort(local, axis=1), np.sort(sharded, axis=1))
    assert np.allclose(np.sort(local_d, axis=1), np.sort(sharded_d, axis=1), atol=1e-5)


@pytest.mark.parametrize("damage, message", [("nan", "NaN or infinity"), ("zero", "zero vectors")])
def test_bad_embeddings_are_refused(damage, message):
    faces, _ = people(10)
    faces[3] = np.nan if damage == "nan" else 0.0
    with pytest.raises(BadInput, match=message):
        knn_graph(faces, SPEC)
