"""Per-identity adaptation (PVA fine-tune): a few optimiser steps on one person's own references,
each reference the target in turn with the others as conditioning, training only the identity
attention projections (the processors); the token mapper and the base stay frozen.

The result is stored as a delta on the shared adapter's processor weights (fp16: the deltas are
small, so half precision keeps them to about 1e-3 relative), tied to that adapter's content hash.
The pipeline applies it per row of a UNet batch (personal_bank.py), never to the shared weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.cross_training import CrossBatch
from ray_faceid.identity.objective import adapter_losses


def processor_weights(adapter: IdentityAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.processors.state_dict().items()}


def adapt_identity(base, adapter: IdentityAdapter, batch_at: Callable[[int], CrossBatch], eval_batch: CrossBatch,
                   steps: int, lr: float, outside_weight: float = 1.0, seed: int = 0,
                   on_step: Callable[[int, float], None] | None = None,
                   losses: Callable | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the processors from the adapter's current weights; returns (fp16 delta, metrics) and
    leaves the adapter as it found it. `batch_at(step)` gives the references of each step;
    `on_step(step, loss)` is called after each (progress lines, heartbeats). `losses(batch, generator)`:
    the objective (default: the UNet adapter's; FLUX's is identity/flux_training.py's)."""
    if losses is None:
        def losses(batch, g):
            return adapter_losses(base, adapter, batch, 0.0, g, outside_weight)

    start = processor_weights(adapter)
    params = list(adapter.processors.parameters())
    grads = {p: p.requires_grad for p in adapter.parameters()}  # restored after: the caller's flags
    adapter.mapper.requires_grad_(False)
    adapter.processors.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def evaluate() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            return float(losses(eval_batch, g)["total"])

    try:
        loss_start = evaluate()
        for step in range(steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
            loss = losses(batch_at(step), g)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if on_step is not None:
                on_step(step + 1, float(loss.detach()))
        loss_end = evaluate()
        trained = processor_weights(adapter)
    finally:
        adapter.processors.load_state_dict(start)
        for p, flag in grads.items():
            p.requires_grad_(flag)
    delta = {k: (trained[k] - start[k]).half().cpu() for k in start}
    return delta, {"steps": steps, "loss_start": loss_start, "loss_end": loss_end}


def delta_bytes(delta: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in delta.items()})


def personal_key(identity: str, version: str) -> str:
    """What pipelines key a person's own adapter by: its version (a content hash) within one identity.
    Erasure refuses the key, so a person erased, enrolled again with new consent and personalised to
    the same bytes (a new identity) is not refused as the old one."""
    return f"{version}@{identity}"


def version_of(key: str) -> str:
    """The registry's version of a personal key (what provenance records)."""
    return key.split("@", 1)[0]


def made_with(adapter: IdentityAdapter | None) -> dict:
    """What a personal adapter of `adapter` must have been trained beside to be used with it now:
    the CLIP image encoder and IdentityNet it reads (registry.made_with_of, the record's side)."""
    encoder = None if adapter is None else adapter.image_encoder
    identitynet = None if adapter is None else adapter.identitynet
    return {"image_encoder": None if encoder is None else encoder.sha256,
            "identitynet": None if identitynet is None else identitynet.sha256}


def load_personal(registry, tenant: str, identity: str, adapter_hash: str,
                  adapter: IdentityAdapter | None) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(personal key, delta) of the identity's newest adapter made for the shared adapter `adapter_hash`
    beside the CLIP image encoder and IdentityNet `adapter` reads now (one trained beside others learned
    other inputs), or None."""
    record = registry.adapter_record(tenant, identity, adapter_hash, made_with=made_with(adapter))
    if record is None:
        return None
    return (personal_key(identity, record["version"]),
            load_safetensors(registry.adapter_weights(tenant, identity, record["version"])))
