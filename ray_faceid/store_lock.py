"""An exclusive lock held as a file in a store (any fsspec URI), for writers in any process or host.

The lock file is created exclusively (`storage.create_exclusive`); whoever creates it holds the lock
until it deletes it. A holder that died leaves its file behind: a lock older than `stale_after`
seconds is taken over (holders keep it for milliseconds: one registry write). Waiters retry with
jitter until `timeout`, then fail with Conflict rather than wait forever.
"""
from __future__ import annotations

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

    def _holder(self) -> dict | None:
        """The current holder's record; {} while it is being written; None when the lock is free."""
        try:
            return json.loads(storage.read_bytes(self.uri) or b"{}")
        except NotFound:
            return None
        except (ValueError, StorageError):
            return {}

    def __enter__(self) -> "StoreLock":
        record = json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                             "time": time.time()}).encode()
        deadline, wait = time.monotonic() + self.timeout, 0.005
        while not storage.create_exclusive(self.uri, record):
            holder = self._holder()
            if holder and time.time() - float(holder.get("time", time.time())) > self.stale_after:
                if self._holder() == holder:  # still the same dead holder: take it over
                    storage.delete(self.uri)
                continue
            if time.monotonic() > deadline:
                since = f" by {holder.get('host')} pid {holder.get('pid')}" if holder else ""
                raise Conflict(f"{self.what} is being changed by another writer{since}; "
                               f"still busy after {self.timeout:.0f} s: retry")
            time.sleep(wait * (1 + random.random()))
            wait = min(wait * 2, 0.2)
        return self

    def __exit__(self, *exc) -> None:
        holder = self._holder()
        if holder and holder.get("token") == self.token:
            storage.delete(self.uri)
