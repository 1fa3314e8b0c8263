"""Grouping a large archive's faces without comparing every pair: a k-nearest-neighbour graph
(FAISS), then communities of that graph (Leiden).

All pairs is n^2: a million faces is 10^12 distances and, for average linkage, terabytes. Here each
face is compared with its k nearest neighbours only (exact search below `EXACT_MAX` faces, an HNSW
index above it), edges farther than the cut are dropped, and Leiden finds the communities of what
remains: a person is a densely linked group, and one stray close pair between two people does not
merge them the way Chinese whispers' chains do. Time and memory grow with n * k, not n^2.

`knn_graph_on_ray` shards the search: the index goes into Ray's object store once and blocks of
queries run on Ray Data actors, so a cluster with more nodes finishes sooner.
"""
from __future__ import annotations

import numpy as np

from ray_faceid.errors import BadInput
from ray_faceid.face.spec import EncoderSpec

K = 20  # neighbours per face: more than a person's photos in most archives, few enough to stay linear
EXACT_MAX = 50_000  # up to this many faces the search is exact (brute force); above, HNSW
HNSW_M, HNSW_EF_BUILD, HNSW_EF_SEARCH = 32, 80, 96


def prepared(embeddings: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    """float32 vectors the index searches: unit vectors for cosine encoders (inner product), the
    embeddings themselves for euclidean ones. Bad rows are refused, never silently clustered."""
    vectors = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != spec.dim:
        raise BadInput(f"embeddings must be (n, {spec.dim}) for {spec.key()}, got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise BadInput(f"{int((~np.isfinite(vectors)).any(axis=1).sum())} embeddings hold NaN or infinity: "
                       "re-run the ingest of those photos")
    norms = np.linalg.norm(vectors, axis=1)
    if (norms < 1e-6).any():
        raise BadInput(f"{int((norms < 1e-6).sum())} embeddings are zero vectors: not a face embedding")
    if spec.metric == "cosine":
        vectors = vectors / norms[:, None]
    return vectors


def build_index(vectors: np.ndarray, spec: EncoderSpec):
    import faiss

    n, d = vectors.shape
    if n <= EXACT_MAX:
        index = faiss.IndexFlatIP(d) if spec.metric == "cosine" else faiss.IndexFlatL2(d)
    else:
        metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(d, HNSW_M, metric)
        index.hnsw.efConstruction = HNSW_EF_BUILD
    index.add(vectors)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def search(index, queries: np.ndarray, k: int, spec: EncoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, distances in the encoder's metric), each (q, k); -1 where fewer exist."""
    scores, neighbours = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if spec.metric == "cosine":
        distances = 1.0 - scores  # inner product of unit vectors
    else:
        distances = np.sqrt(np.maximum(scores, 0.0))  # faiss gives squared L2
    return neighbours, distances.astype(np.float32)


def knn_graph(embeddings: np.ndarray, spec: EncoderSpec, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Each face's k nearest faces (itself excluded) and their distances, in one process."""
    vectors = prepared(embeddings, spec)
    k = min(k + 1, len(vectors))
    neighbours, distances = search(build_index(vectors, spec), vectors, k, spec)
    return _drop_self(neighbours, distances)


def _drop_self(neighbours: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(neighbours))[:, None]
    distances = np.where(neighbours == rows, np.inf, distances)
    return neighbours, distances


def knn_graph_on_ray(embeddings: np.ndarray, spec: EncoderSpec, k: int = K, workers: int = 2,
                     block: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """knn_graph with the queries sharded over Ray Data actors: the index is built once, put in the
    object store, and each actor searches blocks of queries against it."""
    import faiss
    import ray

    vectors = prepared(embeddings, spec)
    k = min(k + 1, len(vectors))
    # The index and the vectors go into the object store once; the dataset itself is only row numbers.
    index_ref = ray.put(np.asarray(faiss.serialize_index(build_index(vectors, spec))))
    vectors_ref = ray.put(vectors)
    # Row-number blocks made here (no read tasks), and actors that leave a CPU's share free for the
    # dataset's own work: actors holding every CPU would wait for blocks that can never be made.
    blocks = [np.arange(start, min(start + block, len(vectors))) for start in range(0, len(vectors), block)]
    free = float(ray.cluster_resources().get("CPU", 1))
    found = ray.data.from_numpy(blocks).map_batches(
        _Searcher, fn_constructor_args=(index_ref, vectors_ref, k, spec.model_dump_json()), batch_size=None,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(workers, len(blocks))),
        num_cpus=max(0.25, min(1.0, (free - 0.5) / max(1, min(workers, len(blocks))))))
    neighbours = np.full((len(vectors), k), -1, dtype=np.int64)
    distances = np.full((len(vectors), k), np.inf, dtype=np.float32)
    for batch in found.iter_batches(batch_size=None, batch_format="numpy"):
        neighbours[batch["data"]] = batch["neighbours"]
        distances[batch["data"]] = batch["distances"]
    return _drop_self(neighbours, distances)


class _Searcher:
    """A Ray Data actor: the index, deserialised once, searched for each block of row numbers."""

    def __init__(self, serialized, vectors, k: int, spec_json: str):
        import faiss
        import ray

        faiss.omp_set_num_threads(1)  # one core per actor: the parallelism is the actors
        if isinstance(serialized, ray.ObjectRef):  # Ray Data passes constructor arguments as they were given
            serialized, vectors = ray.get([serialized, vectors])
        self.index, self.vectors, self.k = faiss.deserialize_index(serialized), vectors, k
        self.spec = EncoderSpec.model_validate_json(spec_json)

    def __call__(self, batch: dict) -> dict:
        neighbours, distances = search(self.index, self.vectors[batch["data"]], self.k, self.spec)
        return {"data": batch["data"], "neighbours": neighbours, "distances": distances}


def graph_edges(neighbours: np.ndarray, distances: np.ndarray, cut: float,
                photos=None) -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph's undirected edges closer than `cut` ((m, 2) face pairs, found from either side
    once) and their weights: how much closer than the cut, so near faces bind tighter. With
    `photos` (each face's photo) no edge joins two faces of one photo: they are different people."""
    n = len(neighbours)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    cols, dist = neighbours.reshape(-1), distances.reshape(-1)
    keep = (cols >= 0) & (dist <= cut) & (rows != cols)
    if photos is not None:
        photo = np.unique(np.asarray(photos, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)
        keep &= photo[rows] != photo[np.where(cols >= 0, cols, rows)]
    a, b, d = rows[keep], cols[keep], dist[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs, first = np.unique(lo * n + hi, return_index=True)
    return np.stack([pairs // n, pairs % n], axis=1), (1.0 - d[first] / max(cut, 1e-12)) + 1e-3


def graph_clusters(neighbours: np.ndarray, distances: np.ndarray, cut: float, seed: int = 0,
                   photos=None) -> np.ndarray:
    """(n,) cluster numbers: Leiden communities (modularity) of the kNN graph's edges closer than
    `cut` (none between two faces of one photo); a face with no such edge is a cluster of its own."""
    import igraph
    import leidenalg

    edges, weights = graph_edges(neighbours, distances, cut, photos)
    graph = igraph.Graph(n=len(neighbours), edges=edges.tolist(), directed=False)
    partition = leidenalg.find_partition(graph, leidenalg.ModularityVertexPartition, weights=weights.tolist(),
                                         seed=seed)
    return np.asarray(partition.membership)
