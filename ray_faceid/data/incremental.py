"""Grouping new faces into the identities an archive already has, without renaming anyone.

After `ingest --resume` added photos, `pairs --labels cluster` does not cluster the whole archive
again (which renumbers every cluster, and costs what the first run cost): a face already in an
identity keeps it; a new face joins the existing identity whose centre it verifies against at the
clustering cut (the nearest such centre, exact search with FAISS); only the faces that join nobody
are clustered, among themselves, into new identities numbered after the highest existing one.
Identities whose centres then verify against each other at the cut are one person whose few first
photos did not link (the new ones do): the later name joins the earliest. Identities whose faces
did not change keep their cross-training pairs (pairs.py).

Faces of one photo are different people: a new face never joins an identity that already holds a
face of its photo (it tries the next nearest centre), the new faces are clustered with their
photos (clustering.py), and two identities holding faces of one photo are never merged. An
earlier identity holding two faces of one photo (grouped before this rule) is split first.
"""
from __future__ import annotations

import re

import numpy as np

from ray_faceid.data.clustering import _vectors, cluster_faces, separate_same_photo
from ray_faceid.face.spec import EncoderSpec

_CLUSTER_NAME = re.compile(r"^cluster_(\d+)$")


def previous_clusters(rows: list[dict], spec: EncoderSpec, cut_share: float) -> dict[str, set[str]] | None:
    """identity -> face ids of an earlier `--labels cluster` run with the same encoder and cut, or None."""
    if not rows or any(not _CLUSTER_NAME.match(r["identity"]) or r["encoder"] != spec.key()
                       or r.get("cut_share") != cut_share for r in rows):
        return None
    return {r["identity"]: set(r["face_ids"]) for r in rows}


def _centres(members: dict[str, list[np.ndarray]], spec: EncoderSpec) -> tuple[list[str], np.ndarray]:
    names = sorted(members)
    centres = np.stack([_vectors(np.stack(members[n]), spec).mean(axis=0) for n in names])
    return names, _vectors(centres, spec) if spec.metric == "cosine" else centres


def _distances(squared: np.ndarray, spec: EncoderSpec) -> np.ndarray:
    """FAISS's squared euclidean distances in the encoder's metric (on unit vectors cosine distance
    is half the squared euclidean one; cosine centres are renormalised)."""
    squared = np.maximum(squared, 0.0)
    return squared / 2 if spec.metric == "cosine" else np.sqrt(squared)


def _close_pairs(centres: np.ndarray, spec: EncoderSpec, cut: float, neighbours: int = 8) -> list[tuple[int, int]]:
    """Pairs of centres within the cut of each other, from each centre's nearest few (not all pairs)."""
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    squared, found = index.search(np.ascontiguousarray(centres, dtype=np.float32), min(neighbours, len(centres)))
    close = _distances(squared, spec) <= cut
    return [(a, int(b)) for a, row in enumerate(found) for b, ok in zip(row, close[a]) if ok and 0 <= b != a]


def nearest_centres(vectors: np.ndarray, centres: np.ndarray, spec: EncoderSpec,
                    k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """For each vector: its k nearest centres, nearest first, and the distances to them, in the
    encoder's metric ((n, k) each; -1 where fewer centres exist)."""
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    squared, found = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(centres)))
    return found, _distances(squared, spec)


def grow_clusters(faces: list[dict], before: dict[str, set[str]], spec: EncoderSpec,
                  cut_share: float) -> tuple[list[dict], dict]:
    """Faces labelled with their identity (see the module docstring) and what changed."""
    cut = cut_share * spec.threshold
    identity, split, first = _earlier_identities(faces, before, spec)
    kept = [f for f in faces if f["face_id"] in identity]
    new = [f for f in faces if f["face_id"] not in identity]
    members: dict[str, list[np.ndarray]] = {}
    photos: dict[str, set[str]] = {}  # identity -> the photos its faces come from
    for f in kept:
        members.setdefault(identity[f["face_id"]], []).append(np.asarray(f["embedding"]))
        photos.setdefault(identity[f["face_id"]], set()).add(f["image_uri"])
    joined, alone = {}, list(new)
    if new and members:
        names, centres = _centres(members, spec)
        vectors = _vectors(np.array([f["embedding"] for f in new]), spec)
        found, distance = nearest_centres(vectors, centres, spec)
        # The closest matches claim first: of two faces of one photo near one identity, the nearer joins.
        for i in sorted(range(len(new)), key=lambda i: float(distance[i, 0])):
            face = new[i]
            for k, d in zip(found[i], distance[i]):
                if k < 0 or d > cut:
                    break
                if face["image_uri"] not in photos[names[k]]:
                    joined[face["face_id"]] = names[k]
                    photos[names[k]].add(face["image_uri"])
                    break
        alone = [f for f in new if f["face_id"] not in joined]
    numbers = cluster_faces(np.array([f["embedding"] for f in alone]), spec, cut_share,
                            photos=[f["image_uri"] for f in alone]) if alone else []
    fresh = {f["face_id"]: f"cluster_{first + n:05d}" for f, n in zip(alone, numbers)}
    labelled = [dict(f, identity=identity.get(f["face_id"]) or joined.get(f["face_id"]) or fresh[f["face_id"]])
                for f in faces]
    merged = _merge_fragments(labelled, spec, cut)
    labelled = [dict(f, identity=merged.get(f["identity"], f["identity"])) for f in labelled]
    earlier = {name: into for name, into in merged.items() if name in before}
    report = {"faces kept in their identity": len(kept),
              "new faces joining an identity": len(joined) + sum(1 for f in alone if fresh[f["face_id"]] in merged),
              "new identities": len(set(fresh.values()) - set(merged)),
              "identities merged into an earlier one": len(earlier)}
    if split:
        report["earlier identities split (two faces of one photo)"] = split
    if earlier:
        report["merged"] = ", ".join(f"{name} -> {into}" for name, into in sorted(earlier.items()))
    return labelled, report


def _earlier_identities(faces: list[dict], before: dict[str, set[str]],
                        spec: EncoderSpec) -> tuple[dict[str, str], int, int]:
    """face id -> identity of the earlier grouping, how many of its identities were split, and the
    next free cluster number. An identity holding two faces of one photo (grouped before faces of
    one photo were kept apart) is split as a fresh grouping would be: its first part keeps the name."""
    identity = {face_id: name for name, ids in before.items() for face_id in ids}
    by_id = {f["face_id"]: f for f in faces}
    number, split = 1 + max((int(_CLUSTER_NAME.match(n).group(1)) for n in before), default=-1), 0
    for name in sorted(before):
        members = [by_id[i] for i in sorted(before[name]) if i in by_id]
        if len({m["image_uri"] for m in members}) == len(members):
            continue
        parts = separate_same_photo(np.zeros(len(members), dtype=int), np.array([m["embedding"] for m in members]),
                                    [m["image_uri"] for m in members], spec)
        for member, part in zip(members, parts):
            if part:
                identity[member["face_id"]] = f"cluster_{number + int(part) - 1:05d}"
        number += int(parts.max())
        split += 1
    return identity, split, number


def _merge_fragments(labelled: list[dict], spec: EncoderSpec, cut: float) -> dict[str, str]:
    """Identities that turn out to be one person once new photos arrived (their centres verify
    against each other at the cut): the later name -> the earliest one. Earlier runs split a
    person whose few photos did not link; new photos can link them."""
    members: dict[str, list[np.ndarray]] = {}
    photos: dict[str, set[str]] = {}
    for f in labelled:
        members.setdefault(f["identity"], []).append(np.asarray(f["embedding"]))
        photos.setdefault(f["identity"], set()).add(f["image_uri"])
    names, centres = _centres(members, spec)
    if len(names) < 2:
        return {}
    parent = list(range(len(names)))
    held = [photos[name] for name in names]  # a root's photos: two people of one photo never merge

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for a, b in _close_pairs(centres, spec, cut):
        ra, rb = root(a), root(b)
        if ra == rb or held[ra] & held[rb]:
            continue
        keep, gone = min(ra, rb), max(ra, rb)  # names sort by number: the earliest survives
        parent[gone] = keep
        held[keep] = held[keep] | held[gone]
    return {names[k]: names[root(k)] for k in range(len(names)) if root(k) != k}
