"""Re-keying a registry to a new secret (registry_secret.py), and moving a secret earlier versions
kept inside the store out of it. Both survive a stop at any step and are finished by running them
again with the same secrets:

rotate: 1. the check file records the secret being rotated to (from here on nothing enrolls or
erases: registry_secret.keys_for refuses); 2. tenant by tenant, under the lock enrollments and
erasures write tombstones under (so one that passed its secret check before step 1 has finished),
each tombstone made with the old secret is re-keyed (a tombstone records which secret made it, so
one already re-keyed is left; one that cannot be re-keyed is set aside, quarantine.py); 3. the
check file names the new secret alone.

move out: 1. the secret is written to the file given (mode 0600); 2. the store gets its check
file; 3. the secret is deleted from the store.
"""
from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag

from ray_faceid import storage, tombstones
from ray_faceid.errors import NotFound
from ray_faceid.quarantine import set_aside
from ray_faceid.registry_secret import (
    CHECK_FILE,
    LEGACY_FILE,
    MIN_LENGTH,
    Keys,
    RegistrySecretError,
    _given,
    _read_check,
    write_check,
)


def _tenant_tombstone_folders(store: str) -> list[str]:
    fs, root = storage.filesystem(store)
    if not fs.exists(root):
        return []
    return [storage.join(store, entry.rstrip("/").rsplit("/", 1)[-1], tombstones.FOLDER)
            for entry in sorted(fs.ls(root, detail=False))
            if not entry.rstrip("/").rsplit("/", 1)[-1].startswith(("_", ".")) and fs.isdir(entry)]


def rotate(store: str, new_secret: bytes) -> dict:
    """Re-key every tombstone of `store` from the secret set up now (registry_secret.py) to `new_secret`."""
    old_secret, where = _given()
    if old_secret is None:
        raise RegistrySecretError("set the registry's current secret (RAY_FACEID_REGISTRY_SECRET_FILE) to rotate it")
    if len(new_secret) < MIN_LENGTH:
        raise RegistrySecretError(f"the new secret has {len(new_secret)} characters; it needs at least {MIN_LENGTH}")
    check = _read_check(store)
    if check is None:
        raise RegistrySecretError(f"no registry secret check ({CHECK_FILE}) at {store}: nothing was keyed there yet")
    if old_secret == new_secret:
        raise RegistrySecretError("the new secret is the current one: give a new secret's file")
    salt = str(check.get("salt", ""))
    old, new = Keys(old_secret, salt), Keys(new_secret, salt)
    if check.get("rotating_to") and check["rotating_to"] == new.check and hmac.compare_digest(check["check"], old.check):
        pass  # a rotation to this secret that stopped: finish it
    elif check.get("rotating_to"):
        raise RegistrySecretError("a rotation to another secret stopped midway: finish it with that secret first")
    elif not hmac.compare_digest(str(check.get("check", "")), old.check):
        raise RegistrySecretError(f"the registry secret from {where} is not the one this registry was made with")
    stones = _read_stones(store)
    legacy = [u for u, st in stones.items() if st.get("key_scheme") != tombstones.SCHEME]
    if legacy:
        raise RegistrySecretError(f"{len(legacy)} tombstones predate re-keyable tombstones (they keep one-way "
                                  "hashes): they can only be kept under the current secret, so it is not rotated")
    write_check(store, {**check, "rotating_to": new.check})  # 1: from here on nothing enrolls or erases
    from ray_faceid.registry import Registry

    registry, rekeyed, other, total = Registry(store), 0, 0, 0
    for folder in _tenant_tombstone_folders(store):  # 2, a tenant at a time, after its running writers finished
        tenant = folder.rstrip("/").rsplit("/", 2)[-2]
        with registry.faces_lock(tenant):
            for uri, stone in _read_stones(folder).items():
                total += 1
                if stone.get("key_id") == new.key_id:
                    continue  # re-keyed before a stop
                if stone.get("key_id") != old.key_id:
                    other += 1  # made with neither secret: left, and counted in the report
                    continue
                try:
                    again = tombstones.rekey(stone, old, new)
                except (KeyError, TypeError, ValueError, InvalidTag) as exc:
                    fs, path = storage.filesystem(uri)
                    set_aside(fs, path, "tombstone", f"cannot be re-keyed: {type(exc).__name__}")
                    continue
                storage.write_bytes(uri, json.dumps(again, indent=2).encode())
                rekeyed += 1
    write_check(store, {"check": new.check, "key_id": new.key_id, "salt": salt})  # 3
    return {"tombstones": total, "rekeyed": rekeyed, "other_secret": other, "key_id": new.key_id}


def _read_stones(where: str) -> dict[str, dict]:
    """{uri: tombstone} under `where` (a store: every tenant; or one tenant's tombstone folder)."""
    folders = [where] if where.rstrip("/").endswith(tombstones.FOLDER) else _tenant_tombstone_folders(where)
    found = {}
    for folder in folders:
        fs, path = storage.filesystem(folder)
        if not fs.exists(path):
            continue
        for entry in sorted(fs.ls(path, detail=False)):
            if not entry.endswith(".json"):
                continue
            uri = storage.join(folder, entry.rstrip("/").rsplit("/", 1)[-1])
            try:
                stone = json.loads(storage.read_bytes(uri))
            except (NotFound, ValueError):
                continue  # a damaged tombstone is set aside by its next reader (quarantine.py)
            if isinstance(stone, dict):
                found[uri] = stone
    return found


def move_out(store: str, destination: str | Path) -> dict:
    """Move the secret an earlier version kept in the store (`_secret.key`) to `destination`."""
    destination = Path(destination)
    inside = storage.join(store, LEGACY_FILE)
    try:
        secret = storage.read_bytes(inside).strip()
    except NotFound:
        raise RegistrySecretError(f"no secret inside the store at {store} ({LEGACY_FILE}): nothing to move") from None
    if destination.exists():
        if destination.read_bytes().strip() != secret:
            raise RegistrySecretError(f"{destination} holds another secret: give a new file")
    else:  # 1
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret + b"\n")
    if _read_check(store) is None:  # 2
        keys = Keys(secret)
        write_check(store, {"check": keys.check, "key_id": keys.key_id, "salt": keys.salt})
    storage.delete(inside)  # 3
    return {"secret_file": str(destination)}
