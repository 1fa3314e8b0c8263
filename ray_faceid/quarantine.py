"""Damaged records set aside: a journal or tombstone whose bytes are not the record it should be
is moved into a `_damaged/` folder beside it, with a warning (one the store cannot read now is an
error, never set aside), so that it never blocks the records
around it (one damaged erasure journal stopped every erasure of its tenant) and an operator can
still look at it."""
from __future__ import annotations

import json
import logging

from ray_faceid import storage
from ray_faceid.errors import StorageError

log = logging.getLogger(__name__)
FOLDER = "_damaged"


def set_aside(fs, path: str, kind: str, reason: str) -> None:
    """Move the file at `path` (on `fs`) into `_damaged/` beside it; a move that fails is logged only."""
    parent, name = path.rstrip("/").rsplit("/", 1)
    try:
        fs.makedirs(f"{parent}/{FOLDER}", exist_ok=True)
        fs.mv(path, f"{parent}/{FOLDER}/{name}")
        log.warning("a damaged %s (%s) was set aside in %s/%s: %s", kind, name, FOLDER, name, reason)
    except OSError as exc:
        log.warning("a damaged %s (%s) is skipped (%s); setting it aside failed: %s", kind, name, reason, exc)


def read_records(uri: str, kind: str, valid) -> list[dict]:
    """Every `*.json` record in the folder `uri` that parses and that `valid(record)` accepts, in
    name order; the others are set aside. Files that are not `.json` (a write cut short) are left."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        if not entry.endswith(".json"):
            continue
        try:
            raw = fs.cat_file(entry)
        except FileNotFoundError:  # removed meanwhile (a finished erasure)
            continue
        except OSError as exc:  # the store, not the record: fail, never drop a record that may be sound
            raise StorageError(f"cannot read {kind} {entry}: {exc}; retry") from exc
        try:
            record = json.loads(raw)
        except ValueError as exc:
            set_aside(fs, entry, kind, f"unreadable: {exc}")
            continue
        if not valid(record):
            set_aside(fs, entry, kind, "not the record it should be")
            continue
        out.append(record)
    return out
