"""Every Ray Serve multiplexing call in one place: Ray is changing this API.

The identity is the multiplexed model id ("<tenant>/<identity id>"). Serve does not forward it
from one deployment to the next, so the ingress sets it explicitly on the Generator handle.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from ray import serve


def identity_key(tenant: str, identity: str) -> str:
    return f"{tenant}/{identity}"


def split_key(key: str) -> tuple[str, str]:
    tenant, _, identity = key.partition("/")
    return tenant, identity


def for_identity(handle, tenant: str, identity: str):
    """The Generator handle routed to replicas that hold (or will load) this identity."""
    return handle.options(multiplexed_model_id=identity_key(tenant, identity))


def current_identity_key() -> str:
    return serve.get_multiplexed_model_id()


def identity_cache(loader: Callable[[str], Awaitable], size: int) -> Callable[[str], Awaitable]:
    """An LRU of loaded identities per replica (Serve unloads the least recently used). The size
    comes from config at run time, so the loader is wrapped as a plain function, not a method."""

    async def load_identity(key: str):
        return await loader(key)

    return serve.multiplexed(max_num_models_per_replica=size)(load_identity)
