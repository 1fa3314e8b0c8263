"""The compiled UNet engine: torch.compile (Inductor) of the UNet with its identity processors,
replayed from CUDA graphs on CUDA.

A call is padded up to a batch bucket (1, 2, 4, 8, 16 rows) and its inputs are copied into
static buffers that belong to that bucket; the compiled function (on CUDA: its captured graph)
always reads those same tensors. Identity is data, never structure: tokens, scales, region
masks and each row's slot in the PersonalBank (a person's own adapter, identity/personal_bank.py)
are buffers a new request copies into, and the bank's stacks are buffers the graph reads by
address. So a new person, a new strength or a personal adapter causes no recompile and no
re-record; only a new shape (bucket, size, identity count) compiles once.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ray_faceid.engines.base import UNetCall
from ray_faceid.engines.buckets import BATCH_BUCKETS, MAX_SLOTS, batch_bucket
from ray_faceid.envs import torch_compile_backend
from ray_faceid.errors import BadInput
from ray_faceid.progress import ProgressLine, to_stderr

log = logging.getLogger(__name__)
def buckets_for(shape) -> tuple[int, ...]:
    """The buckets an EngineShape's batch range (min, opt, max rows) reaches."""
    return tuple(b for b in BATCH_BUCKETS if shape.batch[0] <= b <= batch_bucket(shape.batch[2]))


def allow_shape_compiles(count: int = 8 * MAX_SLOTS) -> None:
    """Every bucket and size is its own compiled graph of the same code; Dynamo's default limit
    (8 per code object) would silently fall back to eager past the eighth."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), count))


@dataclass
class StaticShape:
    """One compiled shape: its static inputs, and on CUDA the captured graph and its output."""

    inputs: dict[str, torch.Tensor]
    output: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


def capture(shape: StaticShape, run, pool, what: str) -> None:
    """`run()` (reading `shape.inputs`) warmed up outside, then captured into a CUDA graph in `pool`:
    `shape.graph` and `shape.output` set. Where capture fails the shape stays without a graph (still
    correct, only slower): said, rather than failing the replica."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and autotune outside the capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = run()
    except RuntimeError as exc:
        log.warning("CUDA graph capture of %s failed (%s); this shape runs compiled without a graph", what, exc)
        torch.cuda.synchronize()
        return
    shape.graph, shape.output = graph, output


class CompiledUNetEngine:
    backend = "torch.compile"

    def __init__(self, unet, cuda_graphs: bool | None = None, compiler: str | None = None, bank=None,
                 identitynet=None):
        """`cuda_graphs`: None = on when the UNet is on CUDA. `compiler` is torch.compile's backend
        (None: RAY_FACEID_TORCH_COMPILE_BACKEND, else Inductor). `bank`: the PersonalBank whose
        slots calls may name (personal_rows). `identitynet`: InstantID's, compiled into the same
        graph as the UNet (calls then give each row's keypoint image, control_image)."""
        self.compiler = compiler or torch_compile_backend()
        known = torch._dynamo.list_backends(exclude_tags=())
        if self.compiler not in known:
            raise BadInput(f"torch.compile has no backend {self.compiler!r} "
                           f"(RAY_FACEID_TORCH_COMPILE_BACKEND); known: {', '.join(sorted(known))}")
        self.unet, self.bank, self.identitynet = unet, bank, identitynet
        self.device = next(unet.parameters()).device
        self.dtype = unet.dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        allow_shape_compiles()
        self.compiled = torch.compile(UNetCall(unet, bank, identitynet).eval(), backend=self.compiler, fullgraph=True,
                                      dynamic=False)
        self.slots: OrderedDict[tuple, StaticShape] = OrderedDict()  # least recently used first
        self.evicted = 0
        self._pool = None  # one CUDA-graph memory pool shared by every bucket: they never run at once

    @torch.no_grad()
    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks,
                 personal_rows=None, text_embeds=None, time_ids=None, control_image=None, compile_new: bool = True):
        """The engine inputs (base.py); `text_embeds` and `time_ids`: SDXL's added conditioning.
        With `compile_new` False a shape not compiled yet is not compiled here: None comes back and
        the caller runs it eager (a request never waits minutes for a compile in its own path)."""
        rows = sample.shape[0]
        if personal_rows is None:  # every row on the shared weights (slot 0)
            personal_rows = torch.zeros(rows, dtype=torch.int64, device=self.device)
        values = {"sample": sample, "timestep": timestep, "text_tokens": text_tokens, "identity_tokens": identity_tokens,
                  "identity_scale": identity_scale, "region_masks": region_masks, "personal_rows": personal_rows,
                  "text_embeds": text_embeds, "time_ids": time_ids, "control_image": control_image}
        values = {name: value for name, value in values.items() if value is not None}
        top = BATCH_BUCKETS[-1]
        if rows > top:  # larger batches run in chunks of the largest bucket
            parts = [self(**{n: x[i:i + top] if x.ndim and x.shape[0] == rows else x for n, x in values.items()},
                          compile_new=compile_new) for i in range(0, rows, top)]
            return None if any(p is None for p in parts) else torch.cat(parts)
        bucket = batch_bucket(rows)
        if not compile_new and self._key(bucket, values) not in self.slots:
            # A warmed larger bucket runs the rows padded (guidance <= 1 runs one row per image, and
            # warm-ups start at two), else the caller runs them eager.
            bucket = next((b for b in BATCH_BUCKETS if b > bucket and self._key(b, values) in self.slots), None)
            if bucket is None:
                return None
        slot = self._slot(bucket, values)
        self._load(slot, values, rows)
        if slot.graph is not None:
            slot.graph.replay()
            return slot.output[:rows].clone()  # the next replay overwrites the graph's output
        return self.compiled(**slot.inputs)[:rows]

    def warm_up(self, shapes) -> int:
        """Compile (and on CUDA capture) every EngineShape's buckets before serving; returns how many."""
        count, total = 0, sum(len(buckets_for(shape)) for shape in shapes)
        # Minutes per bucket without cached artifacts: say so first, then where it stands (stderr).
        plan = "; ".join(f"latent {s.latent[0]}x{s.latent[1]}, {s.identities} identities, buckets {buckets_for(s)}"
                         for s in shapes)
        to_stderr(f"torch.compile warm-up: {total} shapes ({plan}); each can take minutes without cached artifacts")
        progress = ProgressLine(f"torch.compile warm-up on {self.device.type}, batch buckets", total, every_s=0,
                                emit=to_stderr)
        for shape in shapes:
            for bucket in buckets_for(shape):
                self(**shape.example(bucket, self.device, self.dtype))
                count += 1
                progress.update(count)
        return count

    # -- buffers and graphs ---------------------------------------------------------------------
    @staticmethod
    def _key(bucket: int, values: dict) -> tuple:
        return (bucket, values["sample"].dtype,
                *((name, tuple(v.shape[1:])) for name, v in values.items() if name != "timestep"))

    def _slot(self, bucket: int, values: dict) -> StaticShape:
        key = self._key(bucket, values)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        if len(self.slots) >= MAX_SLOTS:  # the least recently used shape makes room (it recompiles if it comes back)
            evicted, _ = self.slots.popitem(last=False)
            self.evicted += 1
            log.warning("the compiled engine keeps %d shapes: evicted %s", MAX_SLOTS, evicted[2:])
        inputs = {name: torch.zeros((bucket, *v.shape[1:]), dtype=self._dtype_of(v), device=self.device)
                  for name, v in values.items()}
        inputs["timestep"] = torch.zeros(bucket, dtype=torch.float32, device=self.device)
        slot = StaticShape(inputs)
        log.info("compiling the UNet for %s (batch bucket %d)", key[2:], bucket)
        if self.cuda_graphs:  # on CPU the first call compiles
            self._capture(slot)
        self.slots[key] = slot
        return slot

    def _dtype_of(self, value: torch.Tensor) -> torch.dtype:
        if value.dtype == torch.int64:  # bank slots stay indices
            return value.dtype
        return value.dtype if value.is_floating_point() else self.dtype

    @staticmethod
    def _load(slot: StaticShape, values: dict, rows: int) -> None:
        """Copy a call into the slot's buffers; rows past `rows` are zero (scale 0: no identity;
        bank slot 0: the shared weights)."""
        for name, value in values.items():
            buffer = slot.inputs[name]
            if name == "timestep":
                steps = value.reshape(-1).to(buffer.dtype)
                if steps.numel() == 1:  # one timestep for every row, as the pipelines pass it
                    buffer.copy_(steps.expand(buffer.shape[0]))
                    continue
                value = steps
            buffer[:rows].copy_(value)
            if rows < buffer.shape[0]:
                buffer[rows:].zero_()

    def _capture(self, slot: StaticShape) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        capture(slot, lambda: self.compiled(**slot.inputs), self._pool, "the UNet")

    @property
    def graphs(self) -> int:
        """How many shapes replay from a CUDA graph (the rest run compiled, launch by launch)."""
        return sum(slot.graph is not None for slot in self.slots.values())
