"""Tombstones: what the registry remembers of an erased person, so that they stay erased.

    <store>/<tenant>/_erased/<sha256 of the id>.json

A tombstone holds the sha256 of the id, the tenant, the time (and a sequence that orders two
erasures of the same second), the consent reference the person was enrolled under, and keyed
hashes (HMAC-SHA256 with the registry's own secret, `<store>/_secret.key`) of their name and
dataset label, so that a scheduled `enroll-dataset` or a new enrollment under that name is refused
without `--reconsent`, and a name cannot be recovered by hashing guesses without the secret; and a
face sketch (face_sketch.py: 512 sign bits of secret projections of their mean embedding), so that
their face enrolled again without a name is refused too. It holds no photo, no
embedding, no name and not the id itself: a byte search of the stores finds none. Every consent the
person ever withdrew stays refused as a re-consent.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time

import numpy as np

from ray_faceid import face_sketch, storage
from ray_faceid.errors import NotFound, StorageError
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.quarantine import read_records

log = logging.getLogger(__name__)

FOLDER = "_erased"
SECRET_FILE = "_secret.key"
_SECRETS: dict[str, bytes] = {}  # per store, read once per process


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def registry_secret(store: str) -> bytes:
    """The registry's own key for its keyed hashes, made once (exclusively: two first writers agree)."""
    if store not in _SECRETS:
        where = storage.join(store, SECRET_FILE)
        storage.create_exclusive(where, secrets.token_hex(32).encode())
        for attempt in range(50):  # the first writer's file exists before its bytes do: wait for them
            secret = storage.read_bytes(where).strip()
            if len(secret) == 64:
                break
            time.sleep(0.01 * (attempt + 1))
        else:
            raise StorageError(f"the registry's secret at {where} is damaged ({len(secret)} bytes, not 64): restore "
                               "it from a backup; without it erased people's names are no longer recognised")
        _SECRETS[store] = secret
    return _SECRETS[store]


def person_key(store: str, tenant: str, name: str) -> str:
    """A name's keyed hash within a tenant (case-insensitive); '' for no name."""
    name = (name or "").strip().casefold()
    if not name:
        return ""
    return hmac.new(registry_secret(store), "\0".join(("name", tenant, name)).encode(), hashlib.sha256).hexdigest()


def _legacy_key(tenant: str, name: str) -> str:
    """The plain hash tombstones written before the keyed one hold (still matched, never written)."""
    name = (name or "").strip().casefold()
    return digest("name", tenant, name) if name else ""


def uri(store: str, tenant: str, identity: str) -> str:
    return storage.join(store, tenant, FOLDER, digest("id", identity) + ".json")


def write(store: str, meta: dict, withdrawn: bool = True, embeddings: np.ndarray | None = None) -> str:
    """The tombstone of the identity `meta` describes; returns its URI. `withdrawn`: the person is
    gone (their name, label and face, sketched from `embeddings`, are refused from now on); False for
    an identity replaced by a newer enrollment of the same person, whose id alone is retired."""
    tenant = meta["tenant"]
    keys = sorted({k for k in (person_key(store, tenant, meta.get("name") or ""),
                               person_key(store, tenant, (meta.get("source") or {}).get("identity") or "")) if k})
    keys = keys if withdrawn else []
    record = {"id_sha256": digest("id", meta["id"]), "tenant": tenant,
              "erased": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sequence": time.time_ns(),
              "consent": meta.get("consent"), "person_keys": keys, "key_scheme": "hmac-sha256"}
    if withdrawn and embeddings is not None:
        try:
            spec = EncoderSpec(**meta["encoder"])
            bits = face_sketch.sketch(embeddings, spec, registry_secret(store))
        except (KeyError, TypeError, ValueError):  # a damaged record: the erasure goes on without a sketch
            bits = None
        if bits is None:
            log.warning("identity %s's embeddings are not usable: its tombstone keeps no face sketch", meta["id"])
        else:
            record["face_sketch"] = {"encoder": spec.key(), "bits": bits}
    where = uri(store, tenant, meta["id"])
    storage.write_bytes(where, json.dumps(record, indent=2).encode())
    return where


def _valid(stone) -> bool:
    return isinstance(stone, dict) and isinstance(stone.get("id_sha256"), str) and isinstance(stone.get("erased"), str)


def all_for(store: str, tenant: str) -> list[dict]:
    """The tenant's tombstones; a damaged one is set aside with a warning (quarantine.py)."""
    return read_records(storage.join(store, tenant, FOLDER), "tombstone", _valid)


def erased_id(store: str, tenant: str, identity: str) -> dict | None:
    try:
        stone = json.loads(storage.read_bytes(uri(store, tenant, identity)))
    except NotFound:
        return None
    except ValueError:  # its file says the id was erased, whatever else it no longer says
        return {"id_sha256": digest("id", identity), "erased": "unknown (damaged tombstone)"}
    return stone if _valid(stone) else {"id_sha256": digest("id", identity), "erased": "unknown (damaged tombstone)"}


def erased_person(store: str, tenant: str, *names: str) -> list[dict]:
    """Every tombstone of a person known by any of `names` (their name or dataset label), oldest first."""
    names = [n for n in names if n and n.strip()]
    keyed = {person_key(store, tenant, n) for n in names}
    legacy = {_legacy_key(tenant, n) for n in names}
    found = [t for t in all_for(store, tenant)
             if (keyed if t.get("key_scheme") == "hmac-sha256" else legacy) & set(t.get("person_keys", []))]
    return sorted(found, key=lambda t: (t["erased"], t.get("sequence", 0)))


def erased_face(store: str, tenant: str, embeddings: np.ndarray, spec: EncoderSpec) -> list[dict]:
    """Every tombstone whose face sketch (same encoder) the embeddings verify against, oldest first."""
    stones = [t for t in all_for(store, tenant) if isinstance(t.get("face_sketch"), dict)
              and t["face_sketch"].get("encoder") == spec.key()]
    if not stones or embeddings is None or not len(embeddings):
        return []
    probe = face_sketch.Probe(embeddings, spec, registry_secret(store))
    found = []
    for stone in stones:
        try:
            if probe.matches(stone["face_sketch"]["bits"]):
                found.append(stone)
        except (KeyError, TypeError, ValueError):  # a damaged sketch, as a damaged tombstone: skipped, said
            log.warning("tombstone %s has an unreadable face sketch: its face is not checked", stone.get("id_sha256"))
    return sorted(found, key=lambda t: (t.get("erased", ""), t.get("sequence", 0)))
