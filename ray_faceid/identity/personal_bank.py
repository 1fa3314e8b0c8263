"""PersonalBank: per-identity adapters as per-row inputs of a UNet batch (as S-LoRA / Punica serve LoRAs).

A person's adapted processor weights are the shared weights plus that person's delta. The delta is
never added to the shared weights: another request may run between two denoising steps
(deployments/turns.py) and would run on them. Instead the bank keeps a few people's deltas
resident in stacked tensors (slot 0 is all zeros: the shared weights); each UNet call passes one
slot index per row, and every identity projection adds `x @ delta[slot of the row]^T` in one
batched matmul per layer. People with and without an adapter of their own batch together,
switching person copies nothing once resident, and the compiled engine reads the stacks by address
with the slots as an input, so a new person never recompiles.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

from ray_faceid.errors import AdapterMismatch, Erased

BANK_SLOTS = 8  # people with their own adapter resident at once (distinct per UNet call at most)
BANK_BYTES = 2 * 2**30  # at most this much device memory: SDXL's projections are ~0.7 GB per person in fp16


class PersonalRows:
    """What one UNet call's identity processors read: the bank and each row's slot (B,) int64,
    0 = the shared weights. (A plain class: torch.compile traces its creation inside the graph.)"""

    def __init__(self, bank: "PersonalBank", rows: torch.Tensor):
        self.bank, self.rows = bank, rows

    def project(self, linear: nn.Linear, weight_name: str, x: torch.Tensor) -> torch.Tensor:
        """linear(x) with each row's own weights (and bias, where the bank holds its delta): (B, N, in) -> (B, N, out)."""
        delta = self.bank.stack(weight_name).index_select(0, self.rows)  # B, out, in
        out = linear(x) + torch.bmm(x, delta.transpose(1, 2).to(x.dtype))
        bias = weight_name.removesuffix("weight") + "bias"
        if linear.bias is not None and self.bank.holds(bias):
            out = out + self.bank.stack(bias).index_select(0, self.rows)[:, None, :].to(out.dtype)
        return out


class PersonalBank(nn.Module):
    """Stacked deltas of every identity-processor weight of an adapter, `slots` people at a time.
    The stacks are buffers: a compiled graph takes them as inputs and sees what is loaded."""

    def __init__(self, adapter: nn.Module, slots: int | None = None):
        """`slots`: default BANK_SLOTS, fewer where one person's weights are large (BANK_BYTES)."""
        super().__init__()
        per_person = sum(p.numel() * p.element_size() for p in adapter.processors.parameters())
        self.person_bytes = per_person
        self.slots = slots or max(1, min(BANK_SLOTS, BANK_BYTES // max(per_person, 1) - 1))
        self.names = [name for name, _ in adapter.processors.named_parameters()]
        self._index = {name: i for i, name in enumerate(self.names)}
        for i, (_, p) in enumerate(adapter.processors.named_parameters()):
            self.register_buffer(f"stack{i}", torch.zeros(self.slots + 1, *p.shape, dtype=p.dtype, device=p.device),
                                 persistent=False)
        # version -> slot, least recently used first. A version is the content hash of a person's
        # adapter (registry.add_adapter), so one version is one set of weights wherever it was loaded.
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._refused: set[str] = set()  # versions of erased people: never loaded again
        self._lock = threading.Lock()
        self.loads = 0  # deltas copied in (a resident person costs none)

    def holds(self, weight_name: str) -> bool:
        return weight_name in self._index

    def stack(self, weight_name: str) -> torch.Tensor:
        """(slots + 1, out, in) deltas of one processor weight, e.g. 'down__...__processor.to_k_id.weight'."""
        return getattr(self, f"stack{self._index[weight_name]}")

    def rows(self, personal: list[tuple[str, dict] | None]) -> torch.Tensor:
        """One slot per row for its (version, delta), 0 where the row has no adapter of its own;
        each version not resident yet is loaded into the least recently used slot no row of this
        call needs."""
        wanted = {version: delta for version, delta in (p for p in personal if p)}
        if len(wanted) > self.slots:
            raise AdapterMismatch(f"{len(wanted)} people with their own adapter in one UNet batch; the bank holds "
                                  f"{self.slots}: split the batch (IdentityPipeline.generate_items does)")
        with self._lock:
            for version, delta in wanted.items():
                if version in self._refused:
                    raise Erased("this person was erased: their own adapter is not served any more")
                if version in self._resident:
                    self._resident.move_to_end(version)
                else:
                    self._load(version, delta, keep=set(wanted))
            slots = [self._resident[p[0]] if p else 0 for p in personal]
        device = self.stack(self.names[0]).device
        return torch.tensor(slots, dtype=torch.int64, device=device)

    @property
    def state(self) -> tuple:
        """Changes whenever the stacks' contents do (a load, an eviction): what a copy of them is keyed by."""
        with self._lock:
            return self.loads, tuple(self._resident.items())

    def evict(self, version: str, forever: bool = False) -> bool:
        """Forget one adapter version's weights: its slot is zeroed and freed; `forever` (an erased
        person) also refuses to load it again. True if it was resident."""
        with self._lock:
            if forever:
                self._refused.add(version)
            slot = self._resident.pop(version, None)
            if slot is None:
                return False
            with torch.no_grad():
                for name in self.names:
                    self.stack(name)[slot].zero_()
            return True

    def _load(self, version: str, delta: dict, keep: set[str]) -> None:
        unknown = set(delta) - set(self._index)
        if unknown:
            raise AdapterMismatch(f"a per-identity adapter names weights this adapter lacks, e.g. {sorted(unknown)[0]}: "
                                  "it was made for another shared adapter")
        used = set(self._resident.values())
        free = next((s for s in range(1, self.slots + 1) if s not in used), None)
        if free is None:
            victim = next(k for k in self._resident if k not in keep)
            free = self._resident.pop(victim)
        with torch.no_grad():
            for name in self.names:
                target = self.stack(name)[free]
                if name in delta:
                    target.copy_(delta[name].to(target.device, target.dtype))
                else:
                    target.zero_()
        self._resident[version] = free
        self.loads += 1
