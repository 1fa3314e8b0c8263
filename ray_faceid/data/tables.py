"""The ingest job's tables: reading the raw per-run parts, building the final images and faces
tables, duplicate flags and the summary. Plain pyarrow, run on the driver."""
from __future__ import annotations

import io
import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from ray_faceid import storage

RAW_DIR = "_raw_images"
IMAGES, FACES, SUMMARY = "images.parquet", "faces.parquet", "summary.json"
RAW_SCHEMA = pa.schema([
    ("uri", pa.string()), ("status", pa.string()), ("message", pa.string()), ("n_faces", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("faces", pa.string()),
])
NOT_USED_SHOWN = 10
FACE_ATTRIBUTES = ("yaw", "pitch", "roll", "smile", "mouth_open", "eyes_open")
FACE_QUALITY = ("face_px", "sharpness", "pose", "score", "small")


def read_raw(dst: str) -> list[dict]:
    """Every row recorded by any run under DST (later runs' rows win per URI)."""
    fs, path = storage.filesystem(storage.join(dst, RAW_DIR))
    if not fs.exists(path):
        return []
    rows: dict[str, dict] = {}
    for part in sorted(fs.find(path)):
        if part.endswith(".parquet"):
            with fs.open(part, "rb") as fh:
                for row in pq.read_table(fh).to_pylist():
                    rows[row["uri"]] = row
    return list(rows.values())


def write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def final_images(raw: list[dict], listed: list[str]) -> list[dict]:
    """One row per listed file; byte-identical files flagged (duplicate_of = first URI with those bytes)."""
    by_uri = {r["uri"]: r for r in raw}
    missing = [u for u in listed if u not in by_uri]
    if missing:
        raise RuntimeError(f"{len(missing)} listed file(s) have no recorded row, e.g. {missing[0]}")
    rows = [dict(by_uri[u]) for u in sorted(listed)]
    first_of: dict[str, str] = {}
    for row in rows:
        sha = row["sha256"]
        row["duplicate_of"] = first_of.get(sha) if sha else None
        if sha and sha not in first_of:
            first_of[sha] = row["uri"]
    return rows


def folder_label(uri: str, root: str) -> str | None:
    """The identity a photo's folder names; None for a loose photo directly under the archive's
    root (the root's name is the archive's, not a person's)."""
    parent = posixpath.dirname(uri.replace("\\", "/"))
    if parent.rstrip("/") == root.replace("\\", "/").rstrip("/"):
        return None
    return posixpath.basename(parent)


def face_rows(images: list[dict], labels: str, root: str) -> list[dict]:
    """Faces of every analysed image that is not a byte-identical copy of another."""
    out = []
    for image in images:
        if image["duplicate_of"] or image["status"] != "ok":
            continue
        for face in json.loads(image["faces"]):
            spec = face["encoder_spec"]
            out.append({
                "face_id": f"{image['sha256'][:16]}_{face['face_index']}",
                "image_uri": image["uri"],
                "face_index": face["face_index"],
                "label": folder_label(image["uri"], root) if labels == "folders" else None,
                "bbox": face["bbox"],
                "det_score": face["score"],
                "landmark_scheme": face["landmarks"]["scheme"],
                "landmarks": [p for xy in face["landmarks"]["points"] for p in xy],
                "embedding": face["embedding"],
                "encoder": f"{spec['name']}/{spec['dim']}/{spec['version']}",
                "encoder_spec": json.dumps(spec, sort_keys=True),
                **{k: face["attributes"].get(k) for k in FACE_ATTRIBUTES},
                **{f"q_{k}": face["quality"].get(k) for k in FACE_QUALITY},  # parts made before "small" lack it
                "crop_uri": face.get("crop_uri"),
                "crop_landmarks": [p for xy in face.get("crop_landmarks", []) for p in xy],
            })
    return out


FACE_SCHEMA = pa.schema([
    ("face_id", pa.string()), ("image_uri", pa.string()), ("face_index", pa.int32()), ("label", pa.string()),
    ("bbox", pa.list_(pa.float32())), ("det_score", pa.float32()), ("landmark_scheme", pa.string()),
    ("landmarks", pa.list_(pa.float32())), ("embedding", pa.list_(pa.float32())), ("encoder", pa.string()),
    ("encoder_spec", pa.string()),
    *[(k, pa.float32()) for k in FACE_ATTRIBUTES],
    *[(f"q_{k}", pa.float32()) for k in FACE_QUALITY],
    ("crop_uri", pa.string()), ("crop_landmarks", pa.list_(pa.float32())),
])


def summarize(images: list[dict], faces: list[dict], seconds: float, new_rows: int, labels: str) -> dict:
    counts: dict[str, int] = {}
    for row in images:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    specs = sorted({f["encoder_spec"] for f in faces})
    return {
        "files": len(images),
        "status_counts": counts,
        "faces": len(faces),
        "byte_identical_duplicates": sum(1 for r in images if r["duplicate_of"]),
        "analysed_this_run": new_rows,
        "seconds": round(seconds, 2),
        "images_per_s": round(new_rows / seconds, 3) if seconds > 0 else None,
        "labels": labels,
        "encoder_spec": json.loads(specs[0]) if specs else None,
        # The first files that gave no face, with why (images.parquet holds every one).
        "not_used": [{"uri": r["uri"], "status": r["status"], "reason": r["message"]}
                     for r in images if r["status"] != "ok"][:NOT_USED_SHOWN],
    }
