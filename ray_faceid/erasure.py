"""Erasing a person outside the registry: render outputs and ingest datasets.

Called by `Registry.delete` after the tombstone is written and the registry folder is gone, with
the render outputs the registry knows (every `render` run records its output folder there) and
any folders the operator names (`identities delete --also`). What is removed:

- render outputs: each image that shows the person (its PNG and sidecar), its manifest rows, and
  the folder's eval report and contact sheet (the sheet embeds reference crops; re-run `eval`);
- ingest datasets: the person's faces (rows, crops, embeddings) in faces.parquet, images.parquet
  and the per-run raw parts, their identities.parquet row and every pair that uses them.

The operator's source photos are theirs and are never touched; the report counts them.
Images already sent to API clients or written by `generate --out` are outside the system.
"""
from __future__ import annotations

import json

import pyarrow as pa

from ray_faceid import storage
from ray_faceid.data import tables
from ray_faceid.errors import NotFound

MANIFEST, EVAL_FILES = "manifest.parquet", ("eval.json", "contact_sheet.png")
IDENTITIES, PAIRS = "identities.parquet", "pairs.parquet"


def erase_elsewhere(meta: dict, folders: list[str]) -> list[dict]:
    """Erase the person `meta` describes from each render output and ingest dataset among `folders`
    and the dataset they were enrolled from. Returns one report entry per folder that held them."""
    source = meta.get("source") or {}
    given = {n.strip() for n in (meta.get("name"), source.get("identity")) if n and n.strip()}
    names = {n.casefold() for n in given}
    report = []
    for folder in dict.fromkeys([*folders, *([source["dataset"]] if source.get("dataset") else [])]):
        if storage.exists(storage.join(folder, tables.FACES)):
            labels = {source.get("identity")} if folder == source.get("dataset") else given
            found = erase_dataset_labels(folder, {label for label in labels if label})
        else:
            found = erase_render_rows(folder, meta["id"], names)
        if found:
            report.append(found)
    return report


def _names_person(record: dict, identity: str, names: set[str]) -> bool:
    """Whether a render record shows the person: by the resolved ids it records, or (records made
    before those were kept) by the ids or names its scores and provenance give for its identities."""
    if record.get("identity_ids") is not None:
        return identity in record["identity_ids"]
    given = []
    for field, key in (("scores", "identity"), ("provenance", "name")):
        try:
            given += [str(i.get(key, "")) for i in json.loads(record.get(field) or "{}").get("identities", [])]
        except (ValueError, AttributeError):
            continue
    return any(g == identity or g.strip().casefold() in names for g in given)


def erase_render_rows(out: str, identity: str, names: set[str]) -> dict | None:
    fs, root = storage.filesystem(out)
    if not fs.exists(root):
        return None
    removed_rows, files = set(), 0
    for sidecar in sorted(p for p in fs.find(root) if p.endswith(".json") and "/images/" in p.replace("\\", "/")):
        try:
            record = json.loads(fs.cat_file(sidecar))
        except (OSError, ValueError):
            continue
        if _names_person(record, identity, names):
            for path in (sidecar, sidecar[: -len(".json")] + ".png"):
                if fs.exists(path):
                    fs.rm(path)
                    files += 1
            removed_rows.add(record.get("id"))
    manifest = storage.join(out, MANIFEST)
    if storage.exists(manifest):
        table = tables.read_table(manifest)
        rows = table.to_pylist()
        kept = [r for r in rows if not _names_person(r, identity, names)]
        if len(kept) < len(rows):
            removed_rows |= {r["id"] for r in rows if r not in kept}
            tables.write_table(manifest, pa.Table.from_pylist(kept, schema=table.schema))
    if not removed_rows and not _evaluated(out, identity, names):
        return None
    for name in EVAL_FILES:  # summaries over the removed rows; the sheet shows the person's crops
        if storage.exists(storage.join(out, name)):
            storage.delete(storage.join(out, name))
            files += 1
    return {"what": "render output: images, sidecars, manifest rows, eval report and contact sheet",
            "where": out, "rows": len(removed_rows), "files": files}


def _evaluated(out: str, identity: str, names: set[str]) -> bool:
    """Whether an eval report in `out` scored the person (its rows name them by id or name)."""
    try:
        report = json.loads(storage.read_bytes(storage.join(out, EVAL_FILES[0])))
    except (NotFound, ValueError):
        return False
    given = {str(i) for row in report.get("rows", []) for i in row.get("identities", [])}
    return identity in given or any(g.strip().casefold() in names for g in given)


def _filter(uri: str, keep) -> int:
    """Rewrite a parquet table without the rows `keep` rejects; the number removed."""
    try:
        table = tables.read_table(uri)
    except NotFound:
        return 0
    rows = table.to_pylist()
    kept = [r for r in rows if keep(r)]
    if len(kept) < len(rows):
        tables.write_table(uri, pa.Table.from_pylist(kept, schema=table.schema))
    return len(rows) - len(kept)


def _without_faces(row: dict, gone: set[tuple[str, int]]) -> dict:
    """An image row (images table or raw part) without the erased faces in its faces JSON."""
    if not row.get("faces"):
        return row
    faces = [f for f in json.loads(row["faces"]) if (row["uri"], f.get("face_index")) not in gone]
    return {**row, "faces": json.dumps(faces), "n_faces": len(faces)}


def erase_dataset_labels(dataset: str, labels: set[str]) -> dict | None:
    faces = tables.read_table(storage.join(dataset, tables.FACES)).to_pylist()
    face_ids = {f["face_id"] for f in faces if f.get("label") in labels}
    try:
        face_ids |= {i for row in tables.read_table(storage.join(dataset, IDENTITIES)).to_pylist()
                     if row["identity"] in labels for i in row["face_ids"]}
    except NotFound:
        pass
    if not face_ids:
        return None
    gone_faces = [f for f in faces if f["face_id"] in face_ids]
    gone = {(f["image_uri"], f["face_index"]) for f in gone_faces}
    crops = [f["crop_uri"] for f in gone_faces if f.get("crop_uri")]
    for crop in crops:
        storage.delete(crop)
    _filter(storage.join(dataset, tables.FACES), lambda r: r["face_id"] not in face_ids)
    _filter(storage.join(dataset, IDENTITIES), lambda r: r["identity"] not in labels)
    pairs = _filter(storage.join(dataset, PAIRS), lambda r: r["identity"] not in labels
                    and r["source_face_id"] not in face_ids and r["target_face_id"] not in face_ids)
    parts = [storage.join(dataset, tables.IMAGES)]
    fs, raw = storage.filesystem(storage.join(dataset, tables.RAW_DIR))
    if fs.exists(raw):
        parts += [fs.unstrip_protocol(p) if "://" in dataset else p for p in sorted(fs.find(raw)) if p.endswith(".parquet")]
    for part in parts:
        try:
            table = tables.read_table(part)
        except NotFound:
            continue
        rows = table.to_pylist()
        cleaned = [_without_faces(r, gone) for r in rows]
        if cleaned != rows:
            tables.write_table(part, pa.Table.from_pylist(cleaned, schema=table.schema))
    return {"what": "ingest dataset: faces, embeddings, crops and pairs", "where": dataset, "faces": len(gone_faces),
            "crops": len(crops), "pairs": pairs,
            "source_photos_kept": len({f["image_uri"] for f in gone_faces})}
