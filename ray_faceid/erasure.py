"""Erasing a person everywhere, crash-safe: `erase_identity` orchestrates it.

1. A journal of what remains to erase (`<store>/<tenant>/_erasing/<sha256 of the id>.json`: the
   person's record, the folders to clean, the steps done) is written before anything is deleted.
2. The registry withdraws the identity (the tombstone; then it is gone from every read and write).
3. Each render output and dataset is cleaned, the journal updated after each.
4. The registry's own folder (references, embeddings, adapters) goes last; then the journal.
A run that stops anywhere is finished by the next `identities delete` of the same id or name, or by
the Serve replicas' erasure sweep (`resume_pending`); Serve replicas drop what they hold of a person
once the registry says Erased. The journal holds the person's name and id only while the erasure
runs: a finished one leaves the tombstone alone.

Render outputs are the ones the registry knows (every `render` run records its output folder there)
and any folders the operator names (`identities delete --also`). What is removed there:

- render outputs: each image that shows the person (its PNG and sidecar), its manifest rows, and
  the folder's eval report and contact sheet (the sheet embeds reference crops; re-run `eval`);
- ingest datasets: the person's faces (rows, crops, embeddings) in faces.parquet, images.parquet
  and the per-run raw parts; every grouping row derived from them (identities.parquet with its
  centre embedding, clusters.parquet), with the other faces the grouping gave them (a group
  photo's faces clustered with her) and every pair that uses any of these.

The operator's source photos are theirs and are never touched; the report counts them.
Images already sent to API clients or written by `generate --out` are outside the system.
"""
from __future__ import annotations

import json
import time

import pyarrow as pa

from ray_faceid import storage, tombstones
from ray_faceid.data import tables
from ray_faceid.errors import Erased, FaceIdError, NotFound
from ray_faceid.quarantine import read_records
from ray_faceid.registry import is_identity_id

MANIFEST, EVAL_FILES = "manifest.parquet", ("eval.json", "contact_sheet.png")
IDENTITIES, PAIRS, CLUSTERS = "identities.parquet", "pairs.parquet", "clusters.parquet"
JOURNALS = "_erasing"
STOPPED_AFTER_S = 300.0  # a journal this long untouched belongs to an erasure that stopped
REGISTRY_FILES = "registry: references, embeddings, per-identity adapters"


def _journal_uri(store: str, tenant: str, identity: str) -> str:
    return storage.join(store, tenant, JOURNALS, tombstones.digest("id", identity) + ".json")


def _write_journal(registry, journal: dict) -> None:
    meta = journal["meta"]
    storage.write_bytes(_journal_uri(registry.store, meta["tenant"], meta["id"]), json.dumps(journal).encode())


def _valid_journal(journal) -> bool:
    meta = journal.get("meta") if isinstance(journal, dict) else None
    return (isinstance(meta, dict) and isinstance(meta.get("id"), str) and isinstance(meta.get("tenant"), str)
            and all(isinstance(journal.get(k), list) for k in ("folders", "done", "removed")))


def journals(registry, tenant: str) -> list[dict]:
    """The erasures of `tenant` that have not finished; a damaged journal is set aside (quarantine.py)."""
    return read_records(storage.join(registry.store, tenant, JOURNALS), "erasure journal", _valid_journal)


def _delete_journal(registry, tenant: str, identity: str) -> None:
    """The journal, and any copy of it a crash left half-written beside it (it names the person)."""
    where = _journal_uri(registry.store, tenant, identity)
    fs, path = storage.filesystem(where)
    parent = path.rsplit("/", 1)[0]
    for entry in fs.ls(parent, detail=False) if fs.exists(parent) else []:
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(path.rsplit("/", 1)[-1] + ".tmp-"):
            storage.delete(fs.unstrip_protocol(entry) if "://" in where else entry)
    storage.delete(where)


def _find_journal(registry, tenant: str, reference: str) -> dict | None:
    """An unfinished erasure of the person `reference` names: by id, or by name only when no
    enrolled identity answers to it (a person re-enrolled after a stopped erasure is erased as
    they are now, not mistaken for the old record)."""
    found = [j for j in journals(registry, tenant) if j["meta"]["id"] == reference]
    if found:
        return found[0]
    try:
        registry.resolve(tenant, reference)
        return None
    except FaceIdError:
        pass
    wanted = reference.strip().casefold()
    return next((j for j in journals(registry, tenant) if (j["meta"].get("name") or "").strip().casefold() == wanted),
                None)


def erase_identity(registry, tenant: str, reference: str, also: list[str] = ()) -> dict:
    """Erase the person `reference` names (an id or a name) everywhere, or finish an erasure of
    them that stopped midway; `also`: more render outputs or datasets to clean. Returns the report
    {id, tenant, tombstone, removed: [{what, where, counts...}]}."""
    journal = _find_journal(registry, tenant, reference)
    if journal is None:
        try:
            identity = registry.resolve(tenant, reference)
        except Erased:
            if also and is_identity_id(reference):
                return _erase_outputs_of_erased(registry, tenant, reference, also)
            stones = tombstones.erased_person(registry.store, tenant, reference)
            if stones:  # a finished erasure, asked for again by name
                raise Erased(f"{reference!r} was erased on {stones[-1]['erased']}; nothing is left to erase") from None
            raise
        meta = registry.get(tenant, identity)
        journal = {"meta": meta, "folders": list(dict.fromkeys(registry.outputs(tenant))), "done": [], "removed": []}
    journal["folders"] = list(dict.fromkeys([*journal["folders"], *also]))
    meta = journal["meta"]
    with registry.name_lock(tenant, meta.get("name") or ""), registry.faces_lock(tenant):
        _write_journal(registry, journal)  # first: from here on whatever stops can be finished
        tombstone = registry.withdraw(tenant, meta["id"])
    source = meta.get("source") or {}
    for folder in dict.fromkeys([*journal["folders"], *([source["dataset"]] if source.get("dataset") else [])]):
        if folder in journal["done"]:
            continue
        found = erase_in(meta, folder, journal.setdefault("plans", {}), lambda: _write_journal(registry, journal))
        journal["done"].append(folder)
        journal["removed"] += [found] if found else []
        _write_journal(registry, journal)
    files = registry.remove_files(tenant, meta["id"])  # last: the journal still names the person until here
    removed = [{"what": REGISTRY_FILES, "where": registry.folder(tenant, meta["id"]),
                "files": files}] + journal["removed"]
    _delete_journal(registry, tenant, meta["id"])
    return {"id": meta["id"], "tenant": tenant, "tombstone": tombstone, "removed": removed}


def _erase_outputs_of_erased(registry, tenant: str, identity: str, folders: list[str]) -> dict:
    """`--also` for a person whose erasure finished: their name is gone with it, so images are
    found by the identity ids their records carry (render records do)."""
    tombstone = tombstones.uri(registry.store, tenant, identity)
    removed = [found for folder in folders if (found := erase_render_rows(folder, identity, set()))]
    return {"id": identity, "tenant": tenant, "tombstone": tombstone, "removed": removed}


def resume_pending(registry, idle_s: float = STOPPED_AFTER_S) -> int:
    """Finish every erasure that stopped midway, in every tenant (the Serve sweep calls this): those
    whose journal has not moved for `idle_s`, so an erasure still running elsewhere is left alone."""
    fs, root = storage.filesystem(registry.store)
    if not fs.exists(root):
        return 0
    finished = 0
    for entry in fs.ls(root, detail=False):
        tenant = entry.rstrip("/").rsplit("/", 1)[-1]
        if tenant.startswith(("_", ".")):
            continue
        for journal in journals(registry, tenant):
            changed = storage.modified(_journal_uri(registry.store, tenant, journal["meta"]["id"]))
            if changed is not None and time.time() - changed < idle_s:
                continue
            if any(not storage.exists(f) for f in journal["folders"] if f not in journal["done"]):
                continue  # folders this host cannot see (another machine's paths): left to `identities delete`
            erase_identity(registry, tenant, journal["meta"]["id"])
            finished += 1
        _remove_withdrawn_leftovers(registry, tenant)
    return finished


def _remove_withdrawn_leftovers(registry, tenant: str) -> None:
    """An identity folder with a tombstone and no record, and no erasure running for it: what a
    replacing enrollment (registry.create, name_exists="replace") left when it stopped midway."""
    fs, path = storage.filesystem(storage.join(registry.store, tenant))
    running = {j["meta"]["id"] for j in journals(registry, tenant)}
    for entry in fs.ls(path, detail=False):
        identity = entry.rstrip("/").rsplit("/", 1)[-1]
        if not identity.startswith("id_") or identity in running:
            continue
        if tombstones.erased_id(registry.store, tenant, identity) and \
                not storage.exists(storage.join(registry.folder(tenant, identity), "meta.json")):
            registry.remove_files(tenant, identity)


def erase_in(meta: dict, folder: str, plan: dict | None = None, save=None) -> dict | None:
    """Erase the person `meta` describes from one render output or ingest dataset; what was removed.
    `plan`, `save`: the journal's record of what a dataset erasure found (erase_dataset_labels)."""
    source = meta.get("source") or {}
    given = {n.strip() for n in (meta.get("name"), source.get("identity")) if n and n.strip()}
    if storage.exists(storage.join(folder, tables.FACES)):
        labels = {source.get("identity")} if folder == source.get("dataset") else given
        return erase_dataset_labels(folder, {label for label in labels if label}, plan, save)
    return erase_render_rows(folder, meta["id"], {n.casefold() for n in given})


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
            # The image first, its sidecar last: the sidecar is how a resumed erasure finds the image.
            for path in (sidecar[: -len(".json")] + ".png", sidecar):
                if fs.exists(path):
                    storage.delete(fs.unstrip_protocol(path) if "://" in out else path)
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


def _person_groups(dataset: str, labels: set[str], face_ids: set[str]) -> tuple[set[str], set[str]]:
    """The grouping rows (identities.parquet, clusters.parquet) derived from the person's faces, and
    every face they hold: a row named by her label or holding one of her faces is hers, with the
    faces (group-photo faces among them) the grouping gave her, its centre and its pairs. One hop:
    a face of hers in another row does not pull in that row's other rows."""
    rows = []
    for grouping in (IDENTITIES, CLUSTERS):
        try:
            rows += tables.read_table(storage.join(dataset, grouping)).to_pylist()
        except NotFound:
            pass
    mine = [r for r in rows if r["identity"] in labels or face_ids.intersection(r["face_ids"] or ())]
    return set(labels) | {r["identity"] for r in mine}, set(face_ids) | {i for r in mine for i in r["face_ids"] or ()}


def erase_dataset_labels(dataset: str, labels: set[str], plan: dict | None = None, save=None) -> dict | None:
    """Erase the people `labels` name from an ingest dataset. `plan` (the erasure journal's) keeps
    what was found to erase before anything is deleted, and `save` writes it: a resumed erasure
    erases the same rows even after the grouping tables that led to them are gone."""
    faces = tables.read_table(storage.join(dataset, tables.FACES)).to_pylist()
    if plan is not None and dataset in plan:
        groups, face_ids = set(plan[dataset]["groups"]), set(plan[dataset]["face_ids"])
    else:
        groups, face_ids = _person_groups(dataset, labels, {f["face_id"] for f in faces if f.get("label") in labels})
        if plan is not None:
            plan[dataset] = {"groups": sorted(groups), "face_ids": sorted(face_ids)}
            save()
    if not face_ids:
        return None
    gone_faces = [f for f in faces if f["face_id"] in face_ids]
    gone = {(f["image_uri"], f["face_index"]) for f in gone_faces}
    from ray_faceid.data.analyze_rows import own_crop  # the face stack, only where a dataset is erased from

    crops = [own_crop(dataset, f["crop_uri"]) for f in gone_faces if f.get("crop_uri")]
    for crop in filter(None, crops):
        storage.delete(crop)
    _filter(storage.join(dataset, IDENTITIES), lambda r: r["identity"] not in groups)
    _filter(storage.join(dataset, CLUSTERS), lambda r: r["identity"] not in groups)
    pairs = _filter(storage.join(dataset, PAIRS), lambda r: r["identity"] not in groups
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
    _filter(storage.join(dataset, tables.FACES), lambda r: r["face_id"] not in face_ids)  # last: the rest is found from it
    return {"what": "ingest dataset: faces, embeddings, crops and pairs", "where": dataset, "faces": len(gone_faces),
            "crops": len(crops), "pairs": pairs,
            "source_photos_kept": len({f["image_uri"] for f in gone_faces})}
