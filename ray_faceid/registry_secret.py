"""The registry's secret: the key of what tombstones keep (erased names, face sketches), held
outside the store, so that the store alone says nothing of the people erased from it.

Where it comes from, first found wins:

1. `RAY_FACEID_REGISTRY_SECRET`: the secret itself (at least 32 characters);
2. `RAY_FACEID_REGISTRY_SECRET_FILE`: a file holding it (a mounted Kubernetes secret, a vault's file);
3. `~/.config/ray_faceid/registry-secret` (mode 0600): made on first use, only for a store that has
   never been keyed (a local machine's default; a cluster gives 1 or 2 to every node).

The store keeps only a check of the secret (`_secret.check`: an HMAC of a constant), so a wrong
secret is told apart from a right one. A store keyed before refuses to run with no secret or with
another one (one line, RegistrySecretError), and nothing ever makes a new secret for it: erased
people would stop being recognised. `ray-faceid identities rotate-secret` re-keys every tombstone
(secret_rotation.py). A secret kept in the store by earlier versions (`_secret.key`) is refused
until it is moved out (`ray-faceid identities move-secret-out FILE`).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ray_faceid import storage
from ray_faceid.errors import FaceIdError, NotFound

ENV_SECRET, ENV_FILE = "RAY_FACEID_REGISTRY_SECRET", "RAY_FACEID_REGISTRY_SECRET_FILE"
CHECK_FILE, LEGACY_FILE = "_secret.check", "_secret.key"
MIN_LENGTH = 32
_MAY_CREATE = {"default": True}  # off in Serve replicas: a pod's home folder does not outlive the pod


def never_create_here() -> None:
    """In this process a missing secret is an error, never a new default file (Serve replicas)."""
    _MAY_CREATE["default"] = False


class RegistrySecretError(FaceIdError):
    """The registry's secret is missing, wrong, or in the store: nothing is enrolled or erased."""

    status = 503
    code = "registry_secret"


def default_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ray_faceid" / "registry-secret"


def inside_store(path: str | Path, store: str) -> bool:
    """Whether a secret file lies in the (local) store it keys: beside the data it protects."""
    if "://" in str(store) and not str(store).startswith("file://"):
        return False
    root = os.path.realpath(str(store).removeprefix("file://"))
    return os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)


def _given() -> tuple[bytes | None, str]:
    """The secret from outside the store and where it came from (None where none is set up)."""
    if os.environ.get(ENV_SECRET):
        return os.environ[ENV_SECRET].strip().encode(), f"${ENV_SECRET}"
    where = Path(os.environ[ENV_FILE]) if os.environ.get(ENV_FILE) else default_file()
    try:
        return where.read_bytes().strip(), str(where)
    except FileNotFoundError:
        if os.environ.get(ENV_FILE):
            raise RegistrySecretError(f"${ENV_FILE} names {where}, which does not exist") from None
        return None, str(where)


@dataclass(frozen=True)
class Keys:
    """Keys derived from one secret and the store's own salt, one per use (HKDF-SHA256): two stores
    under one secret key the same name differently."""

    secret: bytes
    salt: str = ""

    def derive(self, purpose: str, size: int = 32) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=size, salt=self.salt.encode() or None,
                    info=purpose.encode()).derive(self.secret)

    @property
    def check(self) -> str:
        """What the store keeps to recognise this secret (an HMAC of a constant: it reveals nothing)."""
        return hmac.new(self.secret, f"ray_faceid registry secret check\0{self.salt}".encode(),
                        hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """A short name of this secret that tombstones record (which key made them)."""
        return self.check[:16]


def make_secret() -> str:
    return secrets.token_urlsafe(48)


def _read_check(store: str) -> dict | None:
    try:
        record = json.loads(storage.read_bytes(storage.join(store, CHECK_FILE)))
    except NotFound:
        return None
    except ValueError as exc:
        raise RegistrySecretError(f"the registry's secret check ({CHECK_FILE}) is damaged ({exc}): restore it "
                                  "from a backup") from None
    return record


def _has_tombstones(store: str) -> bool:
    fs, root = storage.filesystem(store)
    if not fs.exists(root):
        return False
    return any(fs.exists(f"{entry.rstrip('/')}/_erased") for entry in fs.ls(root, detail=False)
               if not entry.rstrip("/").rsplit("/", 1)[-1].startswith(("_", ".")))


def write_check(store: str, record: dict) -> None:
    storage.write_bytes(storage.join(store, CHECK_FILE), json.dumps(record, indent=2).encode())


def keys_for(store: str) -> Keys:
    """The checked keys of `store`'s secret; RegistrySecretError in one line where they cannot be had.
    Checked at every call (a few small reads, per enrollment or erasure): a rotation elsewhere is seen."""
    secret, where = _given()
    if secret is not None and not where.startswith("$") and inside_store(where, store):
        raise RegistrySecretError(f"the registry secret {where} lies inside the registry it keys: move it out of "
                                  f"{store} (the store alone must say nothing of the people erased from it)")
    if secret is not None and len(secret) < MIN_LENGTH:
        raise RegistrySecretError(f"the registry secret from {where} has {len(secret)} characters; it needs at "
                                  f"least {MIN_LENGTH} (make one with: python -c 'import secrets; "
                                  "print(secrets.token_urlsafe(48))')")
    if storage.exists(storage.join(store, LEGACY_FILE)):
        raise RegistrySecretError(f"this registry keeps its secret inside the store ({LEGACY_FILE}), beside the "
                                  "data it protects: move it out with `ray-faceid identities move-secret-out FILE "
                                  f"--registry {store}` and set ${ENV_FILE}=FILE")
    check = _read_check(store)
    if check is not None and check.get("rotating_to"):
        raise RegistrySecretError("a rotation of this registry's secret stopped midway: finish it by running "
                                  "`ray-faceid identities rotate-secret` again with the same secrets")
    if secret is None:
        if check is not None or _has_tombstones(store):
            raise RegistrySecretError(f"this registry was keyed with a secret that is not set up here: set "
                                      f"${ENV_FILE} (or ${ENV_SECRET}) to the secret it was made with; a new one "
                                      "would forget who was erased")
        if not _MAY_CREATE["default"]:
            raise RegistrySecretError(f"no registry secret is set up for this process: set ${ENV_FILE} or "
                                      f"${ENV_SECRET} (cluster.yaml and deployments/kuberay*.yaml show how); it is "
                                      "never made inside a replica, whose home folder does not outlive it")
        secret = _create_default(Path(where))
    if check is None:
        if _has_tombstones(store):
            raise RegistrySecretError(f"this registry has erasure records but no secret check ({CHECK_FILE}): "
                                      "restore the check from a backup; it is never made again over old records")
        fresh = Keys(secret, secrets.token_hex(16))
        storage.create_exclusive(storage.join(store, CHECK_FILE), json.dumps(
            {"check": fresh.check, "key_id": fresh.key_id, "salt": fresh.salt}, indent=2).encode())
        check = _wait_for_check(store)
    keys = Keys(secret, str(check.get("salt", "")))
    if not hmac.compare_digest(str(check.get("check", "")), keys.check):
        raise RegistrySecretError(f"the registry secret from {where} is not the one this registry is keyed with "
                                  f"(key id {check.get('key_id', '?')}; this one is {keys.key_id}): set ${ENV_FILE} "
                                  "to the file holding it (after a rotation: the new secret's file)")
    return keys


def _wait_for_check(store: str) -> dict:
    """The check file, once its first writer's bytes are there (it exists before they are)."""
    for attempt in range(50):
        try:
            record = json.loads(storage.read_bytes(storage.join(store, CHECK_FILE)))
            if record.get("check"):
                return record
        except (NotFound, ValueError):
            pass
        time.sleep(0.01 * (attempt + 1))
    raise RegistrySecretError(f"the registry's secret check ({CHECK_FILE}) stays empty: restore it from a backup")


def _create_default(where: Path) -> bytes:
    """The local default secret, made once (exclusively: two first users agree), mode 0600."""
    where.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(make_secret() + "\n")
        logging.getLogger(__name__).warning(
            "made this machine's registry secret at %s (mode 0600): keep a copy; without it the people erased from "
            "the registries it keys are no longer recognised", where)
    for attempt in range(50):  # the first writer's file exists before its bytes do: wait for them
        secret = where.read_bytes().strip()
        if len(secret) >= MIN_LENGTH:
            return secret
        time.sleep(0.01 * (attempt + 1))
    raise RegistrySecretError(f"the registry secret at {where} is damaged ({len(secret)} characters)")
