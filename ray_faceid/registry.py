"""The identity registry: per-identity folders under a store URI (any fsspec URI).

    <store>/<tenant>/<identity id>/meta.json          name, consent, times, encoder spec, photo report
                                   /embeddings.npz     (R, D) embeddings + quality, one per reference
                                   /embeddings-<k>.npz the same references by another encoder (meta "encoders")
                                   /references/<k>.png aligned reference crops
                                   /adapters/<version>/ per-identity adapters
    <store>/<tenant>/_locks/       one lock file per identity or name while it is written
    <store>/<tenant>/_erased/      tombstones of erased people (tombstones.py)
    <store>/<tenant>/_outputs/     render outputs made from this registry (erased with their people)

Ids are unguessable (128 random bits). An identity is visible only to its tenant: any other
tenant gets NotFound, exactly as for an id that does not exist.

Every write is conditional: it holds the identity's lock (store_lock.py), re-reads meta.json,
checks its `generation` and writes it bumped, so a writer never overwrites another's record and a
deleted identity is never written again (Erased). Enrollment holds the name's lock, so names are
unique per tenant even under concurrent enrollments, and an erased person is refused unless the
operator gives a new consent reference (`reconsent`). Erasing a person is erasure.py's: it calls
`withdraw` (the tombstone, then the identity is gone from every read) and, last, `remove_files`;
the registry only ever erases its own store.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
import unicodedata
import zipfile
from typing import Callable

import numpy as np
from PIL import Image

from ray_faceid import storage, tombstones
from ray_faceid.errors import (
    BadInput,
    Conflict,
    ConsentWithdrawn,
    EncoderMismatch,
    Erased,
    ErasedPerson,
    NameTaken,
    NotFound,
    StorageError,
)
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.store_lock import StoreLock

log = logging.getLogger(__name__)
NAME_EXISTS = ("refuse", "rename", "replace")
MAX_NAME = 100
REFERENCE_CROP = 256  # side of the aligned reference crops (the loose diffusion template)
_ID = re.compile(r"^id_[A-Za-z0-9_-]{16,64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_identity_id(text: str) -> bool:
    """Whether `text` is an identity id (names never look like one)."""
    return bool(_ID.match(text or ""))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def newest_adapter(meta: dict, base_adapter: str, settings: str | None = None,
                   made_with: dict | None = None) -> dict | None:
    """From an identity's metadata: its newest adapter record for this base adapter (and settings;
    and, with `made_with`, trained beside that CLIP image encoder and IdentityNet: see made_with_of)."""
    found = [a for a in meta.get("adapters", [])
             if a.get("base_adapter") == base_adapter and (settings is None or a.get("settings") == settings)
             and (made_with is None or made_with_of(a) == made_with)]
    return found[-1] if found else None


def made_with_of(record: dict) -> dict:
    """The weights a personal adapter's record says it was trained beside: FaceID-Plus's CLIP image
    encoder, InstantID's IdentityNet (None where the kind reads neither)."""
    return {"image_encoder": record.get("image_encoder"),
            "identitynet": (record.get("identitynet") or {}).get("weights_sha256")}


def check_name(name: str | None) -> str:
    """A person's name as stored: trimmed, at most MAX_NAME characters, no control characters (it is
    printed in tables and logs and returned by every list call)."""
    name = (name or "").strip()
    if len(name) > MAX_NAME:
        raise BadInput(f"a name has at most {MAX_NAME} characters, got {len(name)}")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise BadInput("a name cannot hold control characters (newlines, tabs, NUL)")
    return name


def new_identity_id() -> str:
    return "id_" + secrets.token_urlsafe(16)


class Registry:
    def __init__(self, store: str):
        self.store = str(store)

    def require(self) -> "Registry":
        """This registry, or NotFound when its store does not exist (a mistyped --registry lists no
        one rather than saying so)."""
        if not storage.exists(self.store):
            raise NotFound(f"no identity registry at {self.store}: enroll someone first "
                           "(ray-faceid identities enroll) or pass --registry")
        return self

    def _lock(self, tenant: str, *key: str) -> StoreLock:
        """The lock of one identity or one name (the file is named by a hash: it never holds either)."""
        return StoreLock(storage.join(self.store, tenant, "_locks", tombstones.digest(*key) + ".lock"),
                         "this identity" if key[0] == "id" else "this name")

    def _name_lock(self, tenant: str, name: str):
        """Held while a name is enrolled or its holder erased; unnamed identities share nothing."""
        key = tombstones.lock_key(self.store, tenant, name)
        return self._lock(tenant, "name", key) if key else contextlib.nullcontext()

    def faces_lock(self, tenant: str):
        """Held while an enrollment checks faces against the erased and writes, and while an erasure
        writes its tombstone (erasure.py): a face check is never overtaken by a concurrent erasure of
        the same person, named or not."""
        return self._lock(tenant, "faces")

    @staticmethod
    def _check_tenant(tenant: str) -> str:
        if not _TENANT.match(tenant or ""):
            raise BadInput(f"tenant {tenant!r}: use letters, digits, '-' or '_'")
        return tenant

    def _dir(self, tenant: str, identity: str) -> str:
        self._check_tenant(tenant)
        if not _ID.match(identity or ""):
            raise NotFound(f"identity {identity!r} not found")
        return storage.join(self.store, tenant, identity)

    def create(self, tenant: str, name: str, consent: str, embeddings: np.ndarray, quality: np.ndarray,
               spec: EncoderSpec, crops: list[np.ndarray], photos: list[dict], source: dict | None = None,
               name_exists: str = "refuse", reconsent: str | None = None) -> dict:
        """A new identity. Names are unique per tenant (people are asked for by name): a taken name is
        refused (NameTaken), or with `name_exists` "rename" gets a suffix ("ann-2"), or "replace"
        erases the identity that held it. An empty name is allowed and never clashes. A person erased
        before (by name or dataset label) is refused (ErasedPerson) unless `reconsent` gives the new
        consent reference they signed; it is then the identity's consent."""
        if not consent or not consent.strip():
            raise BadInput("consent is required: a reference to the person's recorded consent")
        if len(embeddings) == 0:
            raise BadInput("no usable face in the photos; see the per-photo reasons")
        name = check_name(name)
        if name_exists not in NAME_EXISTS:
            raise BadInput(f"name_exists must be one of {', '.join(NAME_EXISTS)}, not {name_exists!r}")
        self._check_tenant(tenant)
        with self._name_lock(tenant, name), self.faces_lock(tenant):
            consent = self._consent_for(tenant, name, (source or {}).get("identity"), consent, reconsent,
                                        embeddings, spec)
            holders = self.named(tenant, name) if name else []
            if holders and name_exists == "refuse":
                raise NameTaken(f"the name {name!r} is taken by {holders[0]['id']}: enroll under another name, or "
                                "ask to rename (a suffix) or replace (erases the other identity): --name-exists "
                                "rename|replace on the command line, name_exists in the API")
            if holders and name_exists == "rename":
                taken = {(m.get("name") or "").casefold() for m in self.list(tenant)}
                name = next(f"{name}-{k}" for k in range(2, len(taken) + 3) if f"{name}-{k}".casefold() not in taken)
            meta = self._write_new(tenant, name, consent, embeddings, quality, spec, crops, photos, source)
            for holder in holders if name_exists == "replace" else []:  # only now: a failed enrollment loses no one
                self.withdraw(tenant, holder["id"], withdrawn=False)  # the person stays enrolled, as the new identity
                self.remove_files(tenant, holder["id"])
        return meta

    def _consent_for(self, tenant: str, name: str, label: str | None, consent: str, reconsent: str | None,
                     embeddings: np.ndarray, spec: EncoderSpec) -> str:
        """The consent an enrollment is made under. On every route: a consent reference withdrawn in
        the tenant (by an erasure) is refused for good, whatever the name; a person erased before,
        found by name, dataset label or face (their tombstone's sketch, at a point that tightens as
        erased people accumulate: face_sketch.py), needs a new consent reference (`reconsent`)."""
        by_name = tombstones.erased_person(self.store, tenant, name, label or "")
        by_face = tombstones.erased_face(self.store, tenant, embeddings, spec)
        erased = sorted({t["id_sha256"]: t for t in by_name + by_face}.values(),
                        key=lambda t: (t["erased"], t.get("sequence", 0)))
        withdrawn = tombstones.withdrawn_consents(self.store, tenant)
        if not erased:
            if tombstones.consent_key(consent) in withdrawn:
                raise ConsentWithdrawn(f"the consent reference {consent.strip()!r} was withdrawn in this registry "
                                       "(a person enrolled under it was erased): it is never used again; give the "
                                       "person's own, current consent reference")
            return consent.strip()
        if not reconsent or not reconsent.strip():
            if by_name:
                raise ErasedPerson(f"a person called {name or label!r} was erased from this registry on "
                                   f"{erased[-1]['erased']}; enrolling them again needs the new consent reference "
                                   "they gave: --reconsent NEW_REF on the command line, reconsent in the API")
            raise ErasedPerson("the face in these photos matches a person erased from this registry (or someone who "
                               "looks much like them): enrolling it needs this person's new consent reference: "
                               "--reconsent REF on the command line, reconsent in the API and on the page")
        if tombstones.consent_key(reconsent) in withdrawn:  # any consent ever withdrawn in the tenant, not only theirs
            raise BadInput("reconsent must be a new consent reference, not one the person withdrew (or another "
                           "erased person's)")
        return reconsent.strip()

    def _write_new(self, tenant, name, consent, embeddings, quality, spec, crops, photos, source) -> dict:
        identity = new_identity_id()
        folder = self._dir(tenant, identity)
        for k, crop in enumerate(crops):
            buf = io.BytesIO()
            Image.fromarray(crop).save(buf, "PNG")
            storage.write_bytes(storage.join(folder, "references", f"{k}.png"), buf.getvalue())
        buf = io.BytesIO()
        np.savez(buf, embeddings=np.asarray(embeddings, np.float32), quality=np.asarray(quality, np.float32))
        storage.write_bytes(storage.join(folder, "embeddings.npz"), buf.getvalue())
        now = _now()
        meta = {
            "id": identity, "tenant": tenant, "name": name, "consent": consent, "created": now, "updated": now,
            "generation": 1, "encoder": spec.model_dump(), "faces_used": int(len(embeddings)), "photos": photos,
            "adapters": [],
        }
        if source:
            meta["source"] = source
        # meta.json last: an identity exists only once all its files are written.
        storage.write_bytes(storage.join(folder, "meta.json"), json.dumps(meta, indent=2).encode())
        return meta

    def get(self, tenant: str, identity: str) -> dict:
        try:
            return json.loads(storage.read_bytes(storage.join(self._dir(tenant, identity), "meta.json")))
        except ValueError as exc:
            raise StorageError(f"identity {identity}'s record in the store is unreadable ({exc})") from exc
        except NotFound:
            if tombstones.erased_id(self.store, tenant, identity):
                raise Erased(f"identity {identity} was erased") from None
            raise NotFound(f"identity {identity} not found") from None

    def update(self, tenant: str, identity: str, change, generation: int | None = None) -> dict:
        """Apply `change(meta)` to an identity's metadata as one conditional write: under the identity's
        lock, on the current meta.json, which must still be at `generation` when one is given
        (Conflict otherwise); the generation is bumped. A deleted identity raises Erased or NotFound."""
        with self._lock(tenant, "id", identity):
            meta = self.get(tenant, identity)
            found = int(meta.get("generation", 0))
            if generation is not None and found != generation:
                raise Conflict(f"identity {identity} changed (generation {found}, expected {generation}): "
                               "read it again and retry")
            change(meta)
            meta["generation"], meta["updated"] = found + 1, _now()
            storage.write_bytes(storage.join(self._dir(tenant, identity), "meta.json"),
                                json.dumps(meta, indent=2).encode())
            return meta

    def embeddings(self, tenant: str, identity: str, spec: EncoderSpec | None = None,
                   accept: Callable[[EncoderSpec], bool] | None = None) -> tuple[np.ndarray, np.ndarray, EncoderSpec]:
        """(R, D) embeddings, quality and encoder of an identity's references: the enrollment's; with
        `spec`, that encoder's; with `accept`, the first encoder it accepts (the enrollment's, then those
        `identities embed` added; an adapter's `takes`). None fitting is EncoderMismatch saying how to
        add them."""
        file, chosen = self._embedding_file(self.get(tenant, identity), identity, spec, accept, tenant)
        raw = storage.read_bytes(storage.join(self._dir(tenant, identity), file))
        try:
            data = np.load(io.BytesIO(raw))
            return data["embeddings"], data["quality"], chosen
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:  # a damaged file, not a bad request
            again = "re-enroll the identity" if file == "embeddings.npz" else "run `ray-faceid identities embed` again"
            raise StorageError(f"identity {identity}'s embeddings in the store are unreadable ({exc}); {again}") from exc

    def embedding_encoder(self, tenant: str, identity: str,
                          accept: Callable[[EncoderSpec], bool] | None = None) -> EncoderSpec:
        """The encoder whose embeddings `embeddings(accept=...)` would give, from the record alone (a
        job's driver checks its people before any worker); EncoderMismatch as there."""
        return self._embedding_file(self.get(tenant, identity), identity, None, accept, tenant)[1]

    def _embedding_file(self, meta: dict, identity: str, spec: EncoderSpec | None,
                        accept: Callable[[EncoderSpec], bool] | None, tenant: str) -> tuple[str, EncoderSpec]:
        found = [("embeddings.npz", EncoderSpec(**meta["encoder"]))]
        found += [(e["file"], EncoderSpec(**e["spec"])) for e in (meta.get("encoders") or {}).values()]
        fits = [(f, s) for f, s in found if (spec is None or s.key() == spec.key()) and (accept is None or accept(s))]
        if not fits:
            wanted = spec.key() if spec is not None else "the adapter's encoder"
            import shlex

            who = meta.get("name") or identity
            # This person (by id: a name may be taken twice) and tenant; the store a placeholder like the
            # pack (an API caller is told no server path).
            command = (f"ray-faceid identities embed {shlex.quote(meta.get('id') or identity)} --tenant "
                       f"{shlex.quote(tenant)} --registry REGISTRY")
            if spec is not None and spec.name.startswith("dlib"):
                how = f"`{command} --face-backend dlib`"
            else:
                how = (f"`{command} --insightface-root PACK` (insightface's ArcFace, what published FaceID and "
                       "InstantID files take; an ArcFace ONNX of your own: --recognizer-onnx FILE)")
            raise EncoderMismatch(f"identity {who} has embeddings of {', '.join(s.key() for _, s in found)}, not of "
                                  f"{wanted}: add them from the reference crops it keeps (no photo needed) with {how}")
        return fits[0]

    def add_embeddings(self, tenant: str, identity: str, embeddings: np.ndarray, quality: np.ndarray,
                       spec: EncoderSpec) -> dict:
        """Another encoder's embeddings of the identity's references (`identities embed`), so a person
        enrolled once works with adapters of every encoder. Under the identity's lock (an erasure
        cannot pass in between and leave the file behind): the file first, then meta.json names it; a
        crash between leaves an unnamed file that a re-run replaces and the identity's erasure removes."""
        file = f"embeddings-{hashlib.sha256(spec.key().encode()).hexdigest()[:12]}.npz"
        buf = io.BytesIO()
        np.savez(buf, embeddings=np.asarray(embeddings, np.float32), quality=np.asarray(quality, np.float32))

        def write_and_name(meta: dict) -> None:
            if spec.key() == EncoderSpec(**meta["encoder"]).key():
                raise BadInput(f"identity {meta.get('name') or identity} was enrolled with {spec.key()}: it has those")
            storage.write_bytes(storage.join(self._dir(tenant, identity), file), buf.getvalue())
            meta.setdefault("encoders", {})[spec.key()] = {"spec": spec.model_dump(), "file": file,
                                                           "faces_used": int(len(embeddings))}

        return self.update(tenant, identity, write_and_name)

    def named(self, tenant: str, name: str) -> list[dict]:
        """The identities called `name` (case-insensitive; one, unless enrolled before names were unique)."""
        wanted = name.strip().casefold()
        return [m for m in self.list(tenant) if (m.get("name") or "").strip().casefold() == wanted]

    def resolve(self, tenant: str, reference: str) -> str:
        """An identity id from an id or a name; an unknown name lists the close matches, an ambiguous
        one the ids to choose from."""
        if is_identity_id(reference):
            self.get(tenant, reference)
            return reference
        found = self.named(tenant, reference or "")
        if len(found) == 1:
            return found[0]["id"]
        if found:
            raise BadInput(f"{len(found)} identities are called {reference!r}: use an id "
                           f"({', '.join(m['id'] for m in found)})")
        stones = tombstones.erased_person(self.store, tenant, reference or "")
        if stones:  # a person asked for by the name they had: say they were erased, not "no one"
            raise Erased(f"{reference!r} was erased from this registry on {stones[-1]['erased']}")
        names = sorted({m["name"] for m in self.list(tenant) if m.get("name")})
        close = difflib.get_close_matches(reference or "", names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            f"; enrolled: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names else
            "; no one is enrolled for this tenant")
        raise NotFound(f"no identity called {reference!r}{hint}")

    def list(self, tenant: str) -> list[dict]:
        fs, path = storage.filesystem(storage.join(self.store, tenant))
        if not _TENANT.match(tenant) or not fs.exists(path):
            return []
        out = []
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _ID.match(name):
                try:
                    out.append(self.get(tenant, name))
                except (NotFound, Erased):  # being written, or erased (its files go last)
                    continue
                except StorageError as exc:  # one damaged record does not hide everyone else
                    log.warning("%s", exc.message)
                    continue
        return out

    def tenants(self) -> list[str]:
        """The tenants that have people here (the erased not counted)."""
        fs, path = storage.filesystem(self.store)
        if not fs.exists(path):
            return []
        found = []
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _TENANT.match(name) and fs.isdir(entry) and self.list(name):
                found.append(name)
        return found

    def name_lock(self, tenant: str, name: str):
        """Held while a name is enrolled or its holder withdrawn (erasure.py takes it too)."""
        return self._name_lock(tenant, name)

    def withdraw(self, tenant: str, identity: str, withdrawn: bool = True) -> str:
        """The tombstone, then meta.json removed: from here on every read says Erased and no write
        lands (both under the identity's lock). The rest of the folder stays until `remove_files`.
        Idempotent (a resumed erasure calls it again); returns the tombstone's URI."""
        with self._lock(tenant, "id", identity):
            where = tombstones.uri(self.store, tenant, identity)
            if not storage.exists(where):
                tombstones.write(self.store, self.get(tenant, identity), withdrawn, self._sketchable(tenant, identity))
            storage.delete(storage.join(self._dir(tenant, identity), "meta.json"))
        return where

    def _sketchable(self, tenant: str, identity: str) -> list[tuple[EncoderSpec, np.ndarray | None]]:
        """(encoder, embeddings) a tombstone sketches: the enrollment's, then each encoder `identities
        embed` added (the person re-enrolled with any of them is recognised); None for embeddings that
        are unreadable, and nothing of a damaged record (the erasure goes on)."""
        try:
            meta = self.get(tenant, identity)
        except (StorageError, NotFound):
            return []
        specs = []
        for record in [meta.get("encoder"), *[e.get("spec") if isinstance(e, dict) else None
                                              for e in (meta.get("encoders") or {}).values()]]:
            try:  # a damaged entry loses its own sketch, not the others'
                specs.append(EncoderSpec(**record))
            except (TypeError, ValueError):
                log.warning("identity %s: an encoder record is damaged; its tombstone keeps no sketch of it", identity)
        faces = []
        for spec in specs:
            try:
                faces.append((spec, self.embeddings(tenant, identity, spec)[0]))
            except (StorageError, NotFound, EncoderMismatch):
                faces.append((spec, None))
        return faces

    def remove_files(self, tenant: str, identity: str) -> int:
        """Delete what is left of a withdrawn identity's folder; how many files there were."""
        count = len(self.files(tenant, identity))
        storage.delete(self._dir(tenant, identity))
        return count

    def folder(self, tenant: str, identity: str) -> str:
        return self._dir(tenant, identity)

    def record_output(self, tenant: str, uri: str) -> None:
        """Remember a render output made from this registry, so that erasing a person reaches it."""
        uri = uri if "://" in str(uri) else os.path.abspath(uri)
        self._check_tenant(tenant)
        key = tombstones.digest("output", uri)
        storage.write_bytes(storage.join(self.store, tenant, "_outputs", key + ".json"),
                            json.dumps({"uri": uri, "kind": "render"}).encode())

    def outputs(self, tenant: str) -> list[str]:
        fs, path = storage.filesystem(storage.join(self.store, tenant, "_outputs"))
        if not fs.exists(path):
            return []
        return [json.loads(fs.cat_file(p))["uri"] for p in sorted(fs.ls(path, detail=False)) if p.endswith(".json")]

    def references(self, tenant: str, identity: str) -> list[np.ndarray]:
        """The aligned reference crops (RGB uint8), in enrollment order."""
        meta = self.get(tenant, identity)
        folder = self._dir(tenant, identity)
        return [np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, "references", f"{k}.png"))))
                           .convert("RGB")) for k in range(meta["faces_used"])]

    def add_adapter(self, tenant: str, identity: str, weights: bytes, record: dict) -> dict:
        """Store a per-identity adapter version; `record` says what it was trained from (base adapter,
        settings). One conditional write: concurrent writers each keep their record; an identity
        deleted meanwhile raises Erased and gets no files."""
        version = "v_" + hashlib.sha256(weights).hexdigest()[:16]
        entry = {**record, "version": version, "created": _now()}

        def store(meta: dict) -> None:  # under the identity's lock, after it was found to exist
            folder = storage.join(self._dir(tenant, identity), "adapters", version)
            storage.write_bytes(storage.join(folder, "weights.safetensors"), weights)
            storage.write_bytes(storage.join(folder, "record.json"), json.dumps(entry, indent=2).encode())
            meta["adapters"] = [a for a in meta.get("adapters", []) if a["version"] != version] + [entry]

        self.update(tenant, identity, store)
        return entry

    def adapter_record(self, tenant: str, identity: str, base_adapter: str, settings: str | None = None,
                       made_with: dict | None = None) -> dict | None:
        """The newest per-identity adapter made for this base adapter (and these settings, and beside
        these weights, when given: newest_adapter)."""
        return newest_adapter(self.get(tenant, identity), base_adapter, settings, made_with)

    def adapter_weights(self, tenant: str, identity: str, version: str) -> bytes:
        return storage.read_bytes(storage.join(self._dir(tenant, identity), "adapters", version, "weights.safetensors"))

    def files(self, tenant: str, identity: str) -> list[str]:
        fs, path = storage.filesystem(self._dir(tenant, identity))
        return sorted(fs.find(path)) if fs.exists(path) else []
