"""Identities and cross-training pairs from an ingest output.

- identities.parquet: one row per identity: its face ids, a quality-weighted mean embedding, counts.
  `folders`: the identity is the photo's parent folder, from photos with exactly one face (a group
  photo cannot be labelled by its folder). `cluster`: faces grouped by average-linkage clustering
  at a share of the encoder's own threshold (clustering.py), never two faces of one photo in one
  identity (they are different people); each identity carries its cohesion,
  and clusters that are not cohesive are flagged and left out of pairs unless asked for.
- near-duplicates (consecutive video frames of one person) are flagged by embedding and pose
  distance, so a pair never uses two of them as "different shots".
- pairs.parquet (CrossFaceID): for every identity with >= min_shots distinct shots, pairs of a
  source face A and a target face B of another photo, not near-duplicates, with B's crop, keypoints,
  expression code and caption.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa

from ray_faceid import storage
from ray_faceid.data import tables
from ray_faceid.data.captions import Captioner, TemplateCaptioner
from ray_faceid.data.clustering import DEFAULT_CUT_SHARE, cluster_faces, cohesion, same_photo_identities
from ray_faceid.data.incremental import grow_clusters, previous_clusters
from ray_faceid.errors import BadInput
from ray_faceid.eval.clustering import clustering_scores
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.expression import code_from_attributes

IDENTITIES, PAIRS = "identities.parquet", "pairs.parquet"
CLUSTERS = "clusters.parquet"
"""The last `--labels cluster` grouping (identity, face ids, encoder, cut): what the next one grows,
whatever `--labels folders` runs came in between."""
# Near-duplicate: closer than this share of the same-person threshold, and head pose within this many degrees.
NEAR_DUP_DISTANCE_SHARE, NEAR_DUP_POSE_DEG = 0.3, 6.0


def near_duplicates(faces: list[dict], spec: EncoderSpec) -> dict[str, str]:
    """face_id -> the earlier face it nearly duplicates (same person, near-identical shot)."""
    flagged: dict[str, str] = {}
    kept: list[dict] = []
    for face in faces:
        for other in kept:
            close = spec.distance(face["embedding"], other["embedding"]) < NEAR_DUP_DISTANCE_SHARE * spec.threshold
            pose = abs((face["yaw"] or 0) - (other["yaw"] or 0)) + abs((face["pitch"] or 0) - (other["pitch"] or 0))
            if close and pose < NEAR_DUP_POSE_DEG:
                flagged[face["face_id"]] = other["face_id"]
                break
        else:
            kept.append(face)
    return flagged


def _table(dst: str, name: str) -> list[dict]:
    uri = storage.join(dst, name)
    return tables.read_table(uri).to_pylist() if storage.exists(uri) else []


def _labelled_faces(faces: list[dict], images: list[dict], labels: str, spec: EncoderSpec,
                    cut_share: float) -> list[dict]:
    if labels == "folders":
        single = {r["uri"] for r in images if r["n_faces"] == 1}
        return [dict(f, identity=f["label"]) for f in faces if f["image_uri"] in single and f["label"]]
    if labels == "cluster":
        numbers = cluster_faces(np.array([f["embedding"] for f in faces]), spec, cut_share,
                                photos=[f["image_uri"] for f in faces]) if faces else []
        return [dict(f, identity=f"cluster_{n:05d}") for f, n in zip(faces, numbers)]
    raise BadInput(f"labels must be folders or cluster here, not {labels!r}")


def _clustering_report(dst: str, labelled: list[dict], images: list[dict]) -> dict:
    """Scores of the clusters against the folder labels the ingest recorded, kept in summary.json.
    Only faces of one-face photos are scored against folders: a folder names the person of a
    portrait, not everyone in a group photo; every face counts for identities holding two faces of one photo."""
    single = {r["uri"] for r in images if r["n_faces"] == 1}
    known = [f for f in labelled if f["label"] and f["image_uri"] in single]
    if not known:
        raise BadInput(f"{dst}: no face has a folder label to score the clustering against: ingest the archive "
                       "with --labels folders (one folder per person) to use --evaluate-clustering")
    scores = clustering_scores([f["identity"] for f in known], [f["label"] for f in known])
    # Over every face, group photos included: faces of one photo are different people (must be 0).
    scores["identities_with_two_faces_of_one_photo"] = same_photo_identities(
        [f["identity"] for f in labelled], [f["image_uri"] for f in labelled])
    summary_uri = storage.join(dst, tables.SUMMARY)
    summary = json.loads(storage.read_bytes(summary_uri))
    summary["clustering"] = scores
    storage.write_bytes(summary_uri, json.dumps(summary, indent=2).encode())
    return scores


def folder_problem(label: str, members: list[dict], images: list[dict], faces: list[dict], spec: EncoderSpec) -> str | None:
    """Why a folder (`--labels folders`) is not one person, or None: most of its photos show several
    people (a folder of group photos), or none of its portraits' faces verifies against another."""
    photos = {f["image_uri"] for f in faces if f["label"] == label}
    crowded = sum(1 for r in images if r["uri"] in photos and r["n_faces"] > 1)
    if photos and crowded * 2 > len(photos):
        return f"{crowded} of its {len(photos)} photos with faces show several people: group photos, not one person"
    vectors = [np.asarray(m["embedding"]) for m in members]
    if len(vectors) >= 2 and not any(spec.distance(a, b) <= spec.threshold
                                     for i, a in enumerate(vectors) for b in vectors[i + 1:]):
        return f"none of its {len(vectors)} portraits' faces verifies against another: not one person"
    return None


def build_pairs(dst: str, labels: str | None = None, min_shots: int = 2, max_pairs_per_identity: int = 100,
                captioner: Captioner | None = None, seed: int = 0, cut_share: float = DEFAULT_CUT_SHARE,
                include_flagged: bool = False, evaluate_clustering: bool = False, recluster: bool = False) -> dict:
    """identities.parquet and pairs.parquet; with `evaluate_clustering` (labels `cluster` on an
    archive ingested with folder labels) also the clustering's scores against the folders. With
    labels `cluster` over an earlier cluster run, new faces grow the existing identities
    (incremental.py) unless `recluster`; identities whose faces did not change keep their pairs."""
    summary = json.loads(storage.read_bytes(storage.join(dst, tables.SUMMARY)))
    labels = labels or ("cluster" if evaluate_clustering else summary["labels"])  # evaluation scores clusters
    if labels == "none":
        return {"identities": 0, "pairs": 0, "labels": "none"}
    if summary["encoder_spec"] is None:
        raise BadInput(f"{dst}: no faces were found, nothing to group")
    spec = EncoderSpec(**summary["encoder_spec"])
    faces = tables.read_table(storage.join(dst, tables.FACES)).to_pylist()
    images = tables.read_table(storage.join(dst, tables.IMAGES)).to_pylist()
    if evaluate_clustering and labels != "cluster":
        raise BadInput("--evaluate-clustering scores --labels cluster against the folder labels: add --labels cluster")
    earlier, earlier_pairs, growth = _table(dst, IDENTITIES), {}, None
    growing = labels == "cluster" and not (recluster or evaluate_clustering)
    before = previous_clusters(_table(dst, CLUSTERS), spec, cut_share) if growing else None
    if before:
        labelled, growth = grow_clusters(faces, before, spec, cut_share)
        if storage.exists(storage.join(dst, PAIRS)):
            for row in tables.read_table(storage.join(dst, PAIRS)).to_pylist():
                earlier_pairs.setdefault(row["identity"], []).append(row)
    else:
        labelled = _labelled_faces(faces, images, labels, spec, cut_share)
    scores = _clustering_report(dst, labelled, images) if evaluate_clustering else None
    captioner = captioner or TemplateCaptioner()
    settings = json.dumps({"min_shots": min_shots, "max_pairs": max_pairs_per_identity, "seed": seed,
                           "include_flagged": include_flagged, "captioner": type(captioner).__name__})
    unchanged = {r["identity"] for r in earlier if before and r.get("pairs_settings") == settings}
    rng = random.Random(seed)

    groups: dict[str, list[dict]] = {}
    for face in sorted(labelled, key=lambda f: (f["identity"], f["face_id"])):
        groups.setdefault(face["identity"], []).append(face)
    identity_rows, pair_rows = [], []
    for name, members in groups.items():
        dups = near_duplicates(members, spec)
        weights = np.array([max(m["q_score"] or 0.0, 1e-3) for m in members])
        mean = (np.array([m["embedding"] for m in members]) * weights[:, None]).sum(0) / weights.sum()
        distinct = [m for m in members if m["face_id"] not in dups]
        tight = cohesion(np.array([m["embedding"] for m in members]), spec)
        if labels == "cluster":
            reason = "not cohesive: its faces spread beyond the encoder's threshold" if tight.flagged else None
        else:
            reason = folder_problem(name, members, images, faces, spec)
        flagged = reason is not None
        identity_rows.append({
            "identity": name, "face_ids": [m["face_id"] for m in members], "n_faces": len(members),
            "n_distinct": len(distinct), "near_duplicates": json.dumps(dups), "embedding": mean.tolist(),
            "encoder": spec.key(), "centre_distance_mean": tight.centre_distance_mean,
            "centre_distance_max": tight.centre_distance_max, "flagged": flagged, "flagged_reason": reason,
            "pairs_settings": settings, "cut_share": cut_share if labels == "cluster" else None,
        })
        if name in unchanged and before and set(before.get(name, ())) == {m["face_id"] for m in members}:
            pair_rows += earlier_pairs.get(name, [])  # the same faces as last time: the same pairs
            continue
        if len(distinct) < min_shots or (flagged and not include_flagged):
            continue
        candidates = [(a, b) for a in members for b in distinct if a["image_uri"] != b["image_uri"]
                      and dups.get(a["face_id"]) != b["face_id"] and dups.get(b["face_id"]) != a["face_id"]]
        rng.shuffle(candidates)
        for a, b in candidates[:max_pairs_per_identity]:
            pair_rows.append({
                "identity": name, "source_face_id": a["face_id"], "target_face_id": b["face_id"],
                "source_embedding": a["embedding"], "target_embedding": b["embedding"], "target_crop_uri": b["crop_uri"],
                "target_crop_landmarks": b["crop_landmarks"], "target_image_uri": b["image_uri"],
                "target_expression": code_from_attributes(b), "caption": captioner.caption(b),
            })
    tables.write_table(storage.join(dst, IDENTITIES), pa.Table.from_pylist(identity_rows))
    tables.write_table(storage.join(dst, PAIRS), pa.Table.from_pylist(pair_rows))
    if labels == "cluster":
        tables.write_table(storage.join(dst, CLUSTERS), pa.Table.from_pylist(
            [{"identity": r["identity"], "face_ids": r["face_ids"], "encoder": r["encoder"], "cut_share": cut_share}
             for r in identity_rows]))
    result = {"labels": labels, "identities": len(identity_rows), "pairs": len(pair_rows),
              "identities_with_pairs": len({p["identity"] for p in pair_rows}),
              "flagged (not cohesive)": sum(r["flagged"] for r in identity_rows),
              "flagged": {r["identity"]: r["flagged_reason"] for r in identity_rows if r["flagged"]},
              "near_duplicates": sum(len(json.loads(r["near_duplicates"])) for r in identity_rows)}
    if labels == "cluster":
        result["cut"] = f"{cut_share:g} x the encoder's threshold {spec.threshold:g} = {cut_share * spec.threshold:.4g}"
        result["grouping"] = ("grown from the last cluster run" if growth is not None else
                              "every face clustered again (--recluster)" if recluster else "every face clustered")
    if growth is not None:
        result.update(growth)
    if scores is not None:
        result.update({f"clustering {k}": v for k, v in scores.items()})
    return result
