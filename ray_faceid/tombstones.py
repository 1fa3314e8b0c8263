"""Tombstones: what the registry remembers of an erased person, so that they stay erased.

    <store>/<tenant>/_erased/<sha256 of the id>.json

A tombstone holds the sha256 of the id, the tenant, the time (and a sequence that orders two
erasures of the same second), the consent reference the person was enrolled under, their name and
dataset label as tokens (the SHA-256 of the name, encrypted deterministically with AES-SIV under a
key derived from the registry's secret, which lives outside the store: registry_secret.py), so
that a scheduled `enroll-dataset` or a new enrollment under that name is refused without
`--reconsent`, and a name cannot be recovered by hashing guesses without the secret; and a face
sketch per encoder they had embeddings of (face_sketch.py: 512 sign bits of their mean embedding,
masked with a key derived from the secret: the enrollment's encoder under `face_sketch`, those
`identities embed` added under `other_face_sketches`), so that their face enrolled again is refused
too, whichever of those encoders enrolls it. Both can be re-keyed to a new secret
(secret_rotation.py). It holds no photo, no embedding, no name and not the id itself: a byte search
of the stores finds none. Every consent the person ever withdrew stays refused, for every person of
the tenant.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import numpy as np

from ray_faceid import face_sketch, storage
from ray_faceid.errors import NotFound
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.quarantine import read_records
from ray_faceid.registry_secret import Keys, keys_for

log = logging.getLogger(__name__)

FOLDER = "_erased"
SCHEME = "aes-siv-v2"  # earlier tombstones: "hmac-sha256" (keyed with the same secret), or none (plain hashes)


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _folded(name: str) -> str:
    return (name or "").strip().casefold()


def _name_cipher(keys: Keys):
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    return AESSIV(keys.derive("tombstone names", 64))


def name_token(keys: Keys, tenant: str, name: str) -> str:
    """A name's token within a tenant (case-insensitive): deterministic, so it can be looked up, and
    reversible with the key to the name's hash only, so it can be re-keyed."""
    plain = hashlib.sha256("\0".join(("name", tenant, _folded(name))).encode()).digest()
    return _name_cipher(keys).encrypt(plain, None).hex()


def rekey_token(token: str, old: Keys, new: Keys) -> str:
    return _name_cipher(new).encrypt(_name_cipher(old).decrypt(bytes.fromhex(token), None), None).hex()


def _legacy_hmac(keys: Keys, tenant: str, name: str) -> str:
    return hmac.new(keys.secret, "\0".join(("name", tenant, _folded(name))).encode(), hashlib.sha256).hexdigest()


def _legacy_key(tenant: str, name: str) -> str:
    """The plain hash the first tombstones hold (still matched, never written)."""
    return digest("name", tenant, _folded(name)) if _folded(name) else ""


def person_key(store: str, tenant: str, name: str) -> str:
    """A name's token within a tenant; '' for no name."""
    return name_token(keys_for(store), tenant, name) if _folded(name) else ""


def lock_key(store: str, tenant: str, name: str) -> str:
    """What a name's lock file is named after (keyed: the file name says nothing of the name)."""
    if not _folded(name):
        return ""
    return hmac.new(keys_for(store).derive("name locks"), "\0".join((tenant, _folded(name))).encode(),
                    hashlib.sha256).hexdigest()


def sketch_mask(keys: Keys, id_sha256: str, encoder: str | None = None) -> bytes:
    """The mask of one tombstone's face sketch (its own: sketches cannot be compared with each other);
    `encoder`: of another encoder's sketch than the enrollment's (each its own mask: one mask on two
    sketches would give away how they differ)."""
    label = f"face sketch mask\0{id_sha256}" + ("" if encoder is None else f"\0{encoder}")
    return keys.derive(label, face_sketch.BITS // 8)


def _masked(keys: Keys, id_sha256: str, spec: EncoderSpec, bits: bytes, own_mask: bool) -> dict:
    mask = sketch_mask(keys, id_sha256, spec.key() if own_mask else None)
    return {"encoder": spec.key(), "bits": _xor(bits, mask).hex()}


def _sketches(stone: dict) -> list[tuple[dict, bool]]:
    """(sketch, masked with its encoder's own mask) of every face sketch a tombstone keeps."""
    first = [(stone["face_sketch"], False)] if isinstance(stone.get("face_sketch"), dict) else []
    others = stone.get("other_face_sketches")
    return first + [(s, True) for s in (others if isinstance(others, list) else []) if isinstance(s, dict)]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def rekey(stone: dict, old: Keys, new: Keys) -> dict:
    """A tombstone of key scheme SCHEME made with `old`, re-keyed to `new`. A damaged face sketch is
    dropped, with a warning: the tombstone and its other sketches stay."""
    out = dict(stone, person_keys=sorted(rekey_token(t, old, new) for t in stone.get("person_keys", [])),
               key_id=new.key_id)

    def again(sketch: dict, own_mask: bool) -> dict | None:
        try:
            encoder = sketch["encoder"] if own_mask else None
            bits = _xor(bytes.fromhex(sketch["bits"]), sketch_mask(old, stone["id_sha256"], encoder))
            return dict(sketch, bits=_xor(bits, sketch_mask(new, stone["id_sha256"], encoder)).hex())
        except (KeyError, TypeError, ValueError):
            log.warning("tombstone %s: a damaged face sketch is dropped while re-keying", stone.get("id_sha256"))
            return None

    out.pop("face_sketch", None)
    if "other_face_sketches" in stone:
        out["other_face_sketches"] = []
    for sketch, own_mask in _sketches(stone):
        rekeyed = again(sketch, own_mask)
        if rekeyed is not None and own_mask:
            out["other_face_sketches"].append(rekeyed)
        elif rekeyed is not None:
            out["face_sketch"] = rekeyed
    return out


def uri(store: str, tenant: str, identity: str) -> str:
    return storage.join(store, tenant, FOLDER, digest("id", identity) + ".json")


def write(store: str, meta: dict, withdrawn: bool = True,
          faces: list[tuple[EncoderSpec, np.ndarray | None]] | None = None) -> str:
    """The tombstone of the identity `meta` describes; returns its URI. `withdrawn`: the person is
    gone (their name, label and face, sketched from `faces`: (encoder, embeddings) of each encoder
    they have embeddings of, the enrollment's first, are refused from now on); False for an identity
    replaced by a newer enrollment of the same person, whose id alone is retired."""
    tenant, keys = meta["tenant"], keys_for(store)
    names = (meta.get("name") or "", (meta.get("source") or {}).get("identity") or "")
    tokens = sorted({name_token(keys, tenant, n) for n in names if _folded(n)}) if withdrawn else []
    id_sha = digest("id", meta["id"])
    record = {"id_sha256": id_sha, "tenant": tenant, "erased": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sequence": time.time_ns(), "consent": meta.get("consent"), "withdrawn": withdrawn, "person_keys": tokens,
              "key_scheme": SCHEME, "key_id": keys.key_id}
    for k, (spec, embeddings) in enumerate((faces or []) if withdrawn else []):
        try:
            bits = None if embeddings is None else face_sketch.sketch(embeddings, spec)
        except (TypeError, ValueError):  # damaged embeddings: the erasure goes on without that sketch
            bits = None
        if bits is None:
            log.warning("identity %s's %s embeddings are not usable: its tombstone keeps no sketch of them",
                        meta["id"], spec.key())
        elif k == 0:
            record["face_sketch"] = _masked(keys, id_sha, spec, bits, own_mask=False)
        else:
            record.setdefault("other_face_sketches", []).append(_masked(keys, id_sha, spec, bits, own_mask=True))
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


def consent_key(consent: str) -> str:
    """A consent reference as compared: trimmed, case-folded ('FORM-9 ' is 'form-9')."""
    return (consent or "").strip().casefold()


def withdrawn_consents(store: str, tenant: str) -> set[str]:
    """Every consent reference an erasure withdrew in the tenant (consent_key), not those of identities
    merely replaced by a newer enrollment of the same person."""
    return {consent_key(t["consent"]) for t in all_for(store, tenant)
            if isinstance(t.get("consent"), str) and consent_key(t["consent"])
            and t.get("withdrawn", bool(t.get("person_keys") or t.get("face_sketch")))}


def erased_person(store: str, tenant: str, *names: str) -> list[dict]:
    """Every tombstone of a person known by any of `names` (their name or dataset label), oldest first."""
    names = [n for n in names if _folded(n)]
    if not names:
        return []
    keys = keys_for(store)
    wanted = {SCHEME: {name_token(keys, tenant, n) for n in names},
              "hmac-sha256": {_legacy_hmac(keys, tenant, n) for n in names},
              None: {_legacy_key(tenant, n) for n in names}}
    found = [t for t in all_for(store, tenant) if wanted.get(t.get("key_scheme"), set()) & set(t.get("person_keys", []))]
    return sorted(found, key=lambda t: (t["erased"], t.get("sequence", 0)))


def erased_face(store: str, tenant: str, embeddings: np.ndarray, spec: EncoderSpec) -> list[dict]:
    """Every tombstone whose face sketch (same encoder) the embeddings verify against, oldest first;
    the matching point tightens with the number of sketches compared (face_sketch.py)."""
    sketches = [(t, sketch, own_mask) for t in all_for(store, tenant) for sketch, own_mask in _sketches(t)
                if sketch.get("encoder") == spec.key()]
    if not sketches or embeddings is None or not len(embeddings):
        return []
    keys = keys_for(store)
    probe, legacy = face_sketch.Probe(embeddings, spec), None
    found = {}
    for stone, sketch, own_mask in sketches:
        try:
            bits = bytes.fromhex(sketch["bits"])
            if stone.get("key_scheme") == SCHEME:
                if stone.get("key_id") != keys.key_id:
                    raise ValueError("made with another secret")
                mask = sketch_mask(keys, stone["id_sha256"], spec.key() if own_mask else None)
                matched = probe.matches(_xor(bits, mask), len(sketches))
            else:  # sketched on the secret's own planes, unmasked
                legacy = legacy or face_sketch.Probe(embeddings, spec, face_sketch.legacy_planes(keys.secret, spec))
                matched = legacy.matches(bits, len(sketches))
        except (KeyError, TypeError, ValueError) as exc:  # a damaged sketch, as a damaged tombstone: skipped, said
            log.warning("tombstone %s has an unreadable face sketch (%s): its face is not checked",
                        stone.get("id_sha256"), exc)
            continue
        if matched:
            found[stone["id_sha256"]] = stone
    return sorted(found.values(), key=lambda t: (t.get("erased", ""), t.get("sequence", 0)))
