"""Identities and cross-training pairs from an ingest output.

- identities.parquet: one row per identity: its face ids, a quality-weighted mean embedding, counts.
  `folders`: the identity is the photo's parent folder, from photos with exactly one face (a group
  photo cannot be labelled by its folder). `cluster`: faces grouped by dlib's Chinese-whispers
  graph clustering at the encoder's own threshold.
- near-duplicates (consecutive video frames of one person) are flagged by embedding and pose
  distance, so a pair never uses two of them as "different shots".
- pairs.parquet (CrossFaceID): for every identity with >= min_shots distinct shots, pairs of a
  source face A and a target face B != A, not near-duplicates, with B's crop, keypoints,
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
from ray_faceid.errors import BadInput
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.expression import code_from_attributes

IDENTITIES, PAIRS = "identities.parquet", "pairs.parquet"
# Near-duplicate: closer than this share of the same-person threshold, and head pose within this many degrees.
NEAR_DUP_DISTANCE_SHARE, NEAR_DUP_POSE_DEG = 0.3, 6.0


def cluster_labels(embeddings: np.ndarray, spec: EncoderSpec) -> list[str]:
    """Chinese-whispers clustering (dlib) with an edge wherever two faces verify as the same person."""
    import dlib

    vecs = np.asarray(embeddings, dtype=np.float64)
    threshold = spec.threshold
    if spec.metric == "cosine":  # on unit vectors, cosine distance d <=> euclidean sqrt(2 d)
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
        threshold = float(np.sqrt(2 * spec.threshold))
    ids = dlib.chinese_whispers_clustering([dlib.vector(v.tolist()) for v in vecs], threshold)
    return [f"cluster_{i:05d}" for i in ids]


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


def _labelled_faces(faces: list[dict], images: list[dict], labels: str, spec: EncoderSpec) -> list[dict]:
    if labels == "folders":
        single = {r["uri"] for r in images if r["n_faces"] == 1}
        return [dict(f, identity=f["label"]) for f in faces if f["image_uri"] in single and f["label"]]
    if labels == "cluster":
        names = cluster_labels(np.array([f["embedding"] for f in faces]), spec) if faces else []
        return [dict(f, identity=n) for f, n in zip(faces, names)]
    raise BadInput(f"labels must be folders or cluster here, not {labels!r}")


def build_pairs(dst: str, labels: str | None = None, min_shots: int = 2, max_pairs_per_identity: int = 100,
                captioner: Captioner | None = None, seed: int = 0) -> dict:
    summary = json.loads(storage.read_bytes(storage.join(dst, tables.SUMMARY)))
    labels = labels or summary["labels"]
    if labels == "none":
        return {"identities": 0, "pairs": 0, "labels": "none"}
    if summary["encoder_spec"] is None:
        raise BadInput(f"{dst}: no faces were found, nothing to group")
    spec = EncoderSpec(**summary["encoder_spec"])
    faces = tables.read_table(storage.join(dst, tables.FACES)).to_pylist()
    images = tables.read_table(storage.join(dst, tables.IMAGES)).to_pylist()
    labelled = _labelled_faces(faces, images, labels, spec)
    captioner = captioner or TemplateCaptioner()
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
        identity_rows.append({
            "identity": name, "face_ids": [m["face_id"] for m in members], "n_faces": len(members),
            "n_distinct": len(distinct), "near_duplicates": json.dumps(dups), "embedding": mean.tolist(),
            "encoder": spec.key(),
        })
        if len(distinct) < min_shots:
            continue
        candidates = [(a, b) for a in members for b in distinct if a["face_id"] != b["face_id"]
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
    return {"labels": labels, "identities": len(identity_rows), "pairs": len(pair_rows),
            "identities_with_pairs": len({p["identity"] for p in pair_rows}),
            "near_duplicates": sum(len(json.loads(r["near_duplicates"])) for r in identity_rows)}
