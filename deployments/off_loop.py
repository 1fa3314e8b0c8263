"""Blocking calls (the registry's storage reads and writes, its lock waits, an erasure's dataset
rewrites) run in a bounded thread pool, never on the ingress's event loop: one enrollment waiting
for a held lock must not stall every other request of the replica."""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

WORKERS = 8  # blocking calls at once per ingress replica; more wait their turn, the loop never does


class OffLoop:
    """`await off_loop.call(fn, ...)`, or `await off_loop.<method>(...)` of the wrapped object."""

    def __init__(self, target=None, workers: int = WORKERS):
        self._target = target
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ray_faceid-off-loop")

    async def call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        return functools.partial(self.call, method)
