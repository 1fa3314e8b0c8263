"""How well a clustering of faces matches known identities (when the archive's folders name them).

- purity: share of faces whose cluster's majority person is their own;
- BCubed precision / recall / F1 (Bagga & Baldwin): per face, the share of its cluster that is
  its person, and the share of its person that is in its cluster, averaged over faces;
- clusters per person and people per cluster (mean and worst), so a split person and a merged
  cluster are both visible.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def clustering_scores(clusters: Sequence[Hashable], people: Sequence[Hashable]) -> dict:
    """Vectorised (a million faces in seconds): counts of each (cluster, person) pair do it all."""
    if len(clusters) != len(people):
        raise ValueError(f"{len(clusters)} cluster labels for {len(people)} faces")
    n = len(clusters)
    if n == 0:
        return {"faces": 0}
    cluster = np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)
    person = np.unique(np.asarray(people), return_inverse=True)[1].reshape(-1)
    people_count = int(person.max()) + 1
    pairs, joint = np.unique(cluster.astype(np.int64) * people_count + person, return_counts=True)
    pair_cluster, pair_person = pairs // people_count, pairs % people_count
    cluster_size, person_size = np.bincount(cluster), np.bincount(person)
    majority = np.zeros(len(cluster_size), dtype=np.int64)
    np.maximum.at(majority, pair_cluster, joint)
    purity = majority.sum() / n
    precision = float((joint ** 2 / cluster_size[pair_cluster]).sum() / n)  # each face of a pair counts once
    recall = float((joint ** 2 / person_size[pair_person]).sum() / n)
    clusters_per_person, people_per_cluster = np.bincount(pair_person), np.bincount(pair_cluster)
    return {
        "faces": n,
        "people": len(person_size),
        "clusters": len(cluster_size),
        "purity": round(float(purity), 4),
        "bcubed_precision": round(precision, 4),
        "bcubed_recall": round(recall, 4),
        "bcubed_f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
        "clusters_per_person_mean": round(float(clusters_per_person.mean()), 3),
        "clusters_per_person_max": int(clusters_per_person.max()),
        "people_per_cluster_mean": round(float(people_per_cluster.mean()), 3),
        "people_per_cluster_max": int(people_per_cluster.max()),
    }
