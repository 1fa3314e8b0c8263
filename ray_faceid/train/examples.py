"""Training examples from stored rows (plain Python; the Ray Train loops call it).

- `cross_batch(rows, size)`: rows of pairs.parquet -> a CrossBatch; the target crops are read
  through fsspec and resized to the training resolution, their landmarks scaled with them.
- `reference_batch(...)`: one identity's registry references -> a CrossBatch where each reference
  is the target in turn and the other references condition it (per-identity adaptation).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ray_faceid import storage
from ray_faceid.errors import BadImage, BadInput
from ray_faceid.face.align import loose_template
from ray_faceid.identity.cross_training import CrossBatch, Shot, assemble_cross_batch
from ray_faceid.identity.tokens import fuse_embeddings
from ray_faceid.registry import REFERENCE_CROP


def load_crop(uri: str, size: int) -> tuple[np.ndarray, float]:
    """RGB uint8 (size, size, 3) and the factor its pixel coordinates were scaled by."""
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
    except OSError as exc:
        raise BadImage(f"{uri}: cannot read the crop ({exc})") from exc
    factor = size / image.width
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image), factor


def unit(vector) -> np.ndarray:
    """The pipeline conditions on unit embeddings (fuse_embeddings); training must match."""
    v = np.asarray(list(vector), np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def rows_from_columns(batch: dict) -> list[dict]:
    """Ray Data's numpy batch (column -> array) as a list of row dicts."""
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def cross_batch(rows: list[dict], size: int, cwd: str | None = None) -> CrossBatch:
    """`cwd`: where a relative crop path (an older ingest's) is read from."""
    import os

    pairs = []
    for row in rows:
        uri = str(row["target_crop_uri"])
        if cwd and "://" not in uri and not os.path.isabs(uri):
            uri = os.path.join(cwd, uri)
        image, factor = load_crop(uri, size)
        # Stored flat (x0, y0, x1, y1, ...) in crop pixels.
        landmarks = np.asarray(list(row["target_crop_landmarks"]), dtype=np.float32).reshape(-1, 2) * factor
        source = Shot(str(row["source_face_id"]), str(row["identity"]), unit(row["source_embedding"]))
        target = Shot(str(row["target_face_id"]), str(row["identity"]), unit(row["target_embedding"]),
                      image=image, landmarks=landmarks, caption=str(row["caption"]),
                      expression=[float(x) for x in row["target_expression"]])
        pairs.append((source, target))
    return assemble_cross_batch(pairs)


def template_landmarks(size: int) -> np.ndarray:
    """Where the face's landmarks sit in a registry reference crop resized to `size`."""
    points = np.array(list(loose_template(REFERENCE_CROP).points.values()), dtype=np.float32)
    return points * (size / REFERENCE_CROP)


def reference_batch(name: str, crops: list[np.ndarray], embeddings: np.ndarray, quality: np.ndarray,
                    targets: list[int], size: int, caption: str, features: np.ndarray | None = None,
                    per_photo: bool = False, keypoints: bool = False) -> CrossBatch:
    """Reference k is the target; the fused embedding of the others conditions it (itself if it is alone),
    and with `features` (R, S, H: each reference's CLIP image features, FaceID-Plus) their mean, as the
    pipeline reads a person's photos; `per_photo` (FaceID-Portrait): each other's embedding too;
    `keypoints` (InstantID): the target's five points, for its IdentityNet."""
    if len(crops) != len(embeddings):
        raise BadInput(f"identity {name}: {len(crops)} reference crops but {len(embeddings)} embeddings")
    import torch

    landmarks = template_landmarks(size)
    pairs, conditioning_features = [], []
    for k in targets:
        others = [j for j in range(len(crops)) if j != k] or [k]
        if features is not None:
            conditioning_features.append(torch.as_tensor(features[others], dtype=torch.float32).mean(0))
        fused = fuse_embeddings(torch.as_tensor(embeddings[others], dtype=torch.float32),
                                torch.as_tensor(quality[others], dtype=torch.float32)).numpy()
        image = np.asarray(Image.fromarray(crops[k]).resize((size, size), Image.Resampling.LANCZOS))
        source = Shot(f"{name}/conditioning-{k}", name, fused)
        target = Shot(f"{name}/{k}", name, unit(embeddings[k]), image=image, landmarks=landmarks, caption=caption)
        pairs.append((source, target))
    batch = assemble_cross_batch(pairs)
    if features is not None:
        batch.image_features = torch.stack(conditioning_features)
    if per_photo:  # every target has the same number of others: the person's photos but one (or itself)
        batch.photo_embeddings = torch.stack([torch.as_tensor(embeddings[[j for j in range(len(crops)) if j != k] or [k]],
                                                              dtype=torch.float32) for k in targets])
    if keypoints:  # the registry's crops hold the face on one template: its five points, IdentityNet's order
        batch.keypoints = torch.as_tensor(landmarks, dtype=torch.float32).expand(len(targets), -1, -1).clone()
    return batch
