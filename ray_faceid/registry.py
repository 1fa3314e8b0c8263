"""The identity registry: per-identity folders under a store URI (any fsspec URI).

    <store>/<tenant>/<identity id>/meta.json          name, consent, times, encoder spec, photo report
                                   /embeddings.npz     (R, D) embeddings + quality, one per reference
                                   /references/<k>.png aligned reference crops
                                   /adapters/<version>/ per-identity adapters

Ids are unguessable (128 random bits). An identity is visible only to its tenant: any other
tenant gets NotFound, exactly as for an id that does not exist. `delete` removes every artifact.
Names are unique per tenant, so people can be asked for by name (`resolve`); the check reads the
tenant's identities, it is not a lock: two enrollments of one name at the same instant can both pass.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import json
import re
import secrets
import time
import unicodedata

import numpy as np
from PIL import Image

from ray_faceid import storage
from ray_faceid.errors import BadInput, NameTaken, NotFound
from ray_faceid.face.spec import EncoderSpec

NAME_EXISTS = ("refuse", "rename", "replace")
MAX_NAME = 100
REFERENCE_CROP = 256  # side of the aligned reference crops (the loose diffusion template)
_ID = re.compile(r"^id_[A-Za-z0-9_-]{16,64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def newest_adapter(meta: dict, base_adapter: str, settings: str | None = None) -> dict | None:
    """From an identity's metadata: its newest adapter record for this base adapter (and settings)."""
    found = [a for a in meta.get("adapters", [])
             if a.get("base_adapter") == base_adapter and (settings is None or a.get("settings") == settings)]
    return found[-1] if found else None


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

    def _dir(self, tenant: str, identity: str) -> str:
        if not _TENANT.match(tenant or ""):
            raise BadInput(f"tenant {tenant!r}: use letters, digits, '-' or '_'")
        if not _ID.match(identity or ""):
            raise NotFound(f"identity {identity!r} not found")
        return storage.join(self.store, tenant, identity)

    def create(self, tenant: str, name: str, consent: str, embeddings: np.ndarray, quality: np.ndarray,
               spec: EncoderSpec, crops: list[np.ndarray], photos: list[dict], source: dict | None = None,
               name_exists: str = "refuse") -> dict:
        """A new identity. Names are unique per tenant (people are asked for by name): a taken name is
        refused (NameTaken), or with `name_exists` "rename" gets a suffix ("ann-2"), or "replace"
        erases the identity that held it. An empty name is allowed and never clashes."""
        if not consent or not consent.strip():
            raise BadInput("consent is required: a reference to the person's recorded consent")
        if len(embeddings) == 0:
            raise BadInput("no usable face in the photos; see the per-photo reasons")
        name = check_name(name)
        if name_exists not in NAME_EXISTS:
            raise BadInput(f"name_exists must be one of {', '.join(NAME_EXISTS)}, not {name_exists!r}")
        holders = self.named(tenant, name) if name else []
        if holders and name_exists == "refuse":
            raise NameTaken(f"the name {name!r} is taken by {holders[0]['id']}: enroll under another name, or ask "
                            "to rename (a suffix) or replace (erases the other identity): --name-exists on the "
                            "command line, name_exists in the API")
        if holders and name_exists == "rename":
            taken = {(m.get("name") or "").casefold() for m in self.list(tenant)}
            name = next(f"{name}-{k}" for k in range(2, len(taken) + 3) if f"{name}-{k}".casefold() not in taken)
        replaced = holders if name_exists == "replace" else []
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
            "id": identity, "tenant": tenant, "name": name, "consent": consent.strip(), "created": now, "updated": now,
            "encoder": spec.model_dump(), "faces_used": int(len(embeddings)), "photos": photos, "adapters": [],
        }
        if source:
            meta["source"] = source
        # meta.json last: an identity exists only once all its files are written.
        storage.write_bytes(storage.join(folder, "meta.json"), json.dumps(meta, indent=2).encode())
        for holder in replaced:  # only once the new identity exists: a failed enrollment loses no one
            self.delete(tenant, holder["id"])
        return meta

    def get(self, tenant: str, identity: str) -> dict:
        try:
            return json.loads(storage.read_bytes(storage.join(self._dir(tenant, identity), "meta.json")))
        except NotFound:
            raise NotFound(f"identity {identity} not found") from None

    def embeddings(self, tenant: str, identity: str) -> tuple[np.ndarray, np.ndarray, EncoderSpec]:
        meta = self.get(tenant, identity)
        data = np.load(io.BytesIO(storage.read_bytes(storage.join(self._dir(tenant, identity), "embeddings.npz"))))
        return data["embeddings"], data["quality"], EncoderSpec(**meta["encoder"])

    def named(self, tenant: str, name: str) -> list[dict]:
        """The identities called `name` (case-insensitive; one, unless enrolled before names were unique)."""
        wanted = name.strip().casefold()
        return [m for m in self.list(tenant) if (m.get("name") or "").strip().casefold() == wanted]

    def resolve(self, tenant: str, reference: str) -> str:
        """An identity id from an id or a name; an unknown name lists the close matches, an ambiguous
        one the ids to choose from."""
        if _ID.match(reference or ""):
            self.get(tenant, reference)
            return reference
        found = self.named(tenant, reference or "")
        if len(found) == 1:
            return found[0]["id"]
        if found:
            raise BadInput(f"{len(found)} identities are called {reference!r}: use an id "
                           f"({', '.join(m['id'] for m in found)})")
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
                except NotFound:  # being written or deleted
                    continue
        return out

    def delete(self, tenant: str, identity: str) -> None:
        self.get(tenant, identity)  # NotFound for others' and unknown ids
        storage.delete(self._dir(tenant, identity))

    def references(self, tenant: str, identity: str) -> list[np.ndarray]:
        """The aligned reference crops (RGB uint8), in enrollment order."""
        meta = self.get(tenant, identity)
        folder = self._dir(tenant, identity)
        return [np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, "references", f"{k}.png"))))
                           .convert("RGB")) for k in range(meta["faces_used"])]

    def add_adapter(self, tenant: str, identity: str, weights: bytes, record: dict) -> dict:
        """Store a per-identity adapter version; `record` says what it was trained from (base adapter, settings)."""
        meta = self.get(tenant, identity)
        version = "v_" + hashlib.sha256(weights).hexdigest()[:16]
        folder = storage.join(self._dir(tenant, identity), "adapters", version)
        storage.write_bytes(storage.join(folder, "weights.safetensors"), weights)
        entry = {**record, "version": version, "created": _now()}
        storage.write_bytes(storage.join(folder, "record.json"), json.dumps(entry, indent=2).encode())
        meta["adapters"] = [a for a in meta.get("adapters", []) if a["version"] != version] + [entry]
        meta["updated"] = entry["created"]
        storage.write_bytes(storage.join(self._dir(tenant, identity), "meta.json"), json.dumps(meta, indent=2).encode())
        return entry

    def adapter_record(self, tenant: str, identity: str, base_adapter: str, settings: str | None = None) -> dict | None:
        """The newest per-identity adapter made for this base adapter (and these settings, when given)."""
        return newest_adapter(self.get(tenant, identity), base_adapter, settings)

    def adapter_weights(self, tenant: str, identity: str, version: str) -> bytes:
        return storage.read_bytes(storage.join(self._dir(tenant, identity), "adapters", version, "weights.safetensors"))

    def files(self, tenant: str, identity: str) -> list[str]:
        fs, path = storage.filesystem(self._dir(tenant, identity))
        return sorted(fs.find(path)) if fs.exists(path) else []
