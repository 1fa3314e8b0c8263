"""The other clusterings of the kNN graph that the benchmarks compare with the default (Leiden):
Infomap on the same edges, and average linkage within each connected component of the graph (so
that it cannot merge people the graph does not connect, and never needs all pairs of the archive)."""
from __future__ import annotations

import numpy as np

from ray_faceid.data.knn_graph import graph_edges
from ray_faceid.face.spec import EncoderSpec


def infomap_clusters(neighbours: np.ndarray, distances: np.ndarray, cut: float, seed: int = 1) -> np.ndarray:
    """Infomap's two-level modules of the kNN graph's edges closer than `cut`, weighted as Leiden's."""
    import infomap

    n = len(neighbours)
    edges, weights = graph_edges(neighbours, distances, cut)
    flows = infomap.Infomap(two_level=True, silent=True, seed=seed, flow_model="undirected")
    flows.add_nodes(range(n))
    flows.add_links((int(a), int(b), float(w)) for (a, b), w in zip(edges, weights))
    flows.run()
    modules = flows.get_modules()
    labels = np.array([modules.get(i, -1 - i) for i in range(n)])  # a node Infomap left out: its own
    return np.unique(labels, return_inverse=True)[1]


def component_average_linkage(embeddings: np.ndarray, spec: EncoderSpec, neighbours: np.ndarray,
                              distances: np.ndarray, cut_share: float) -> np.ndarray:
    """Exact average linkage inside each connected component of the kNN graph (edges under the cut)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from ray_faceid.data.clustering import cluster_faces

    n = len(embeddings)
    edges, _ = graph_edges(neighbours, distances, cut_share * spec.threshold)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    labels, taken = np.empty(n, dtype=int), 0
    for members in np.split(np.argsort(component, kind="stable"), np.cumsum(np.bincount(component))[:-1]):
        inside = cluster_faces(embeddings[members], spec, cut_share, "average") if len(members) > 1 else np.zeros(1, int)
        labels[members] = inside + taken
        taken += int(inside.max()) + 1
    return labels
