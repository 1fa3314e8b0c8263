"""An exclusive lock held as a file in a store (any fsspec URI), for writers in any process or host.

The lock file is created exclusively (`storage.create_exclusive`); whoever creates it holds the lock
until it deletes it. A holder that died leaves its file behind: a lock older than `stale_after`
seconds is taken over (holders keep it for milliseconds: one registry write), by one waiter only
(an exclusive takeover marker per dead holder); an empty or unreadable lock file ages by its
modification time, so a writer that died between creating and writing it does not lock for good. Waiters retry with
jitter until `timeout`, then fail with Conflict rather than wait forever.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
import uuid

from ray_faceid import storage
from ray_faceid.errors import Conflict, NotFound, StorageError


class StoreLock:
    def __init__(self, uri: str, what: str, timeout: float = 30.0, stale_after: float = 300.0):
        self.uri, self.what, self.timeout, self.stale_after = uri, what, timeout, stale_after
        self.token = uuid.uuid4().hex

    def _holder(self) -> tuple[dict, str, float | None] | None:
        """(record, fingerprint, since) of the current holder, or None when the lock is free. A file
        still empty or unreadable (a writer that died between creating and writing it) has an
        empty record, and its age is the file's own."""
        try:
            raw = storage.read_bytes(self.uri)
        except NotFound:
            return None
        except StorageError:
            raw = b""
        try:
            record = json.loads(raw or b"{}")
        except ValueError:
            record = {}
        since = record.get("time") if isinstance(record, dict) else None
        if since is None:
            record, since = {}, storage.modified(self.uri)
        fingerprint = hashlib.sha256(raw + str(since).encode()).hexdigest()[:16]
        return record, fingerprint, since

    def _stale(self, since: float | None) -> bool:
        return since is not None and time.time() - float(since) > self.stale_after

    def _take_over(self, fingerprint: str, record: bytes) -> bool:
        """Delete a dead holder's lock, once: only the waiter that creates this holder's takeover
        marker may, and only if the lock is still that holder's (re-checked under the marker)."""
        marker = f"{self.uri}.takeover-{fingerprint}"
        if not storage.create_exclusive(marker, record):
            if self._stale(storage.modified(marker)):  # a takeover that died midway
                storage.delete(marker)
            return False
        try:
            current = self._holder()
            if current is not None and current[1] == fingerprint:
                storage.delete(self.uri)
        finally:
            storage.delete(marker)
        return True

    def __enter__(self) -> "StoreLock":
        record = json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                             "time": time.time()}).encode()
        deadline, wait = time.monotonic() + self.timeout, 0.005
        while not storage.create_exclusive(self.uri, record):
            found = self._holder()
            if found is None:  # freed meanwhile
                continue
            holder, fingerprint, since = found
            if self._stale(since) and self._take_over(fingerprint, record):
                continue  # the dead holder's lock is gone: try to create ours at once
            if time.monotonic() > deadline:
                by = f" by {holder.get('host')} pid {holder.get('pid')}" if holder else ""
                raise Conflict(f"{self.what} is being changed by another writer{by}; "
                               f"still busy after {self.timeout:.0f} s: retry")
            time.sleep(wait * (1 + random.random()))
            wait = min(wait * 2, 0.2)
        return self

    def __exit__(self, *exc) -> None:
        found = self._holder()
        if found is not None and found[0].get("token") == self.token:
            storage.delete(self.uri)
