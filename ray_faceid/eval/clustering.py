"""How well a clustering of faces matches known identities (when the archive's folders name them).

- purity: share of faces whose cluster's majority person is their own;
- BCubed precision / recall / F1 (Bagga & Baldwin): per face, the share of its cluster that is
  its person, and the share of its person that is in its cluster, averaged over faces;
- clusters per person and people per cluster (mean and worst), so a split person and a merged
  cluster are both visible.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Hashable, Sequence


def clustering_scores(clusters: Sequence[Hashable], people: Sequence[Hashable]) -> dict:
    if len(clusters) != len(people):
        raise ValueError(f"{len(clusters)} cluster labels for {len(people)} faces")
    n = len(clusters)
    if n == 0:
        return {"faces": 0}
    joint = Counter(zip(clusters, people))
    cluster_size, person_size = Counter(clusters), Counter(people)
    purity = sum(max(c for (k, _), c in joint.items() if k == cluster) for cluster in cluster_size) / n
    precision = sum(joint[(k, p)] / cluster_size[k] for k, p in zip(clusters, people)) / n
    recall = sum(joint[(k, p)] / person_size[p] for k, p in zip(clusters, people)) / n
    per_person, per_cluster = defaultdict(set), defaultdict(set)
    for k, p in joint:
        per_person[p].add(k)
        per_cluster[k].add(p)
    return {
        "faces": n,
        "people": len(person_size),
        "clusters": len(cluster_size),
        "purity": round(purity, 4),
        "bcubed_precision": round(precision, 4),
        "bcubed_recall": round(recall, 4),
        "bcubed_f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
        "clusters_per_person_mean": round(sum(len(v) for v in per_person.values()) / len(per_person), 3),
        "clusters_per_person_max": max(len(v) for v in per_person.values()),
        "people_per_cluster_mean": round(sum(len(v) for v in per_cluster.values()) / len(per_cluster), 3),
        "people_per_cluster_max": max(len(v) for v in per_cluster.values()),
    }
