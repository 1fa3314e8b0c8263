"""FLUX's compiled transformer replayed from CUDA graphs, one per call shape (batch bucket and size).

Each shape has static buffers for every tensor a call gives (latents, timestep, text, positions,
and the identity inputs: people's tokens, strengths, patches, bank slots); a call copies its
tensors into them and replays the graph captured on them, so a new person, strength, region or
person's own adapter (the bank's stacks are read by address) replays the same graph. The
generator pads a batch up to its bucket, so a few shapes serve every call. Calls never overlap:
a replica's pipeline runs one denoise at a time (deployments/turns.py), and a nested small job
copies its own inputs before each replay. Shapes are captured only inside `capturing()` (the
generator's warm-up, before a replica is ready): a capture blocks other threads' GPU allocations
(a replica's image encoder, an erasure's eviction), so a shape first met by a request runs compiled,
launch by launch, as does one whose capture fails (compiled_engine.capture says so).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch

from ray_faceid.engines.buckets import MAX_SLOTS
from ray_faceid.engines.compiled_engine import StaticShape, capture

IDENTITY = "joint_attention_kwargs."


class GraphedTransformer:
    """Called as the transformer is (keywords, identity in `joint_attention_kwargs`), returning
    (velocity,). `capture` False: static buffers without graphs (the CPU, where there is nothing to
    capture; tests check the buffers' path there)."""

    def __init__(self, compiled, capture: bool = True):
        self.compiled, self.capture = compiled, capture
        self._capturing = False  # inside warm-up: new shapes are captured
        self.shapes: OrderedDict[tuple, StaticShape] = OrderedDict()  # least recently used first
        self._pool = None  # one memory pool for every shape: they never run at once

    @torch.no_grad()
    def __call__(self, joint_attention_kwargs=None, return_dict=False, **call):
        tensors = {name: value for name, value in call.items() if value is not None}
        tensors.update({IDENTITY + name: value for name, value in (joint_attention_kwargs or {}).items()
                        if value is not None})
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(tensors.items()))
        shape = self._shape(key, tensors)
        for name, value in tensors.items():
            shape.inputs[name].copy_(value)
        if shape.graph is None:
            return (self._run(shape.inputs),)
        shape.graph.replay()
        return (shape.output.clone(),)  # the next replay overwrites the graph's output

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        identity = {name.removeprefix(IDENTITY): t for name, t in inputs.items() if name.startswith(IDENTITY)}
        call = {name: t for name, t in inputs.items() if not name.startswith(IDENTITY)}
        return self.compiled(**call, joint_attention_kwargs=identity or None, return_dict=False)[0]

    def _shape(self, key: tuple, tensors: dict[str, torch.Tensor]) -> StaticShape:
        if key in self.shapes:
            self.shapes.move_to_end(key)
            return self.shapes[key]
        if len(self.shapes) >= MAX_SLOTS:  # the least recently used makes room (it comes back compiled, without a graph)
            self.shapes.popitem(last=False)
        shape = self.shapes[key] = StaticShape({name: t.clone() for name, t in tensors.items()})
        if self.capture and self._capturing:
            self._capture(shape)
        return shape

    @contextmanager
    def capturing(self):
        """New shapes met inside are captured (the generator's warm-up)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def _capture(self, shape: StaticShape) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        capture(shape, lambda: self._run(shape.inputs), self._pool, "FLUX's transformer")

    @property
    def graphs(self) -> int:
        """How many shapes replay from a CUDA graph."""
        return sum(shape.graph is not None for shape in self.shapes.values())
