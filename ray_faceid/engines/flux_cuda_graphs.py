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
launch by launch, as does one whose capture fails (said in a warning).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ray_faceid.engines.buckets import MAX_SLOTS

log = logging.getLogger(__name__)
IDENTITY = "joint_attention_kwargs."


@dataclass
class _Shape:
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


class GraphedTransformer:
    """Called as the transformer is (keywords, identity in `joint_attention_kwargs`), returning
    (velocity,). `capture` False: static buffers without graphs (the CPU, where there is nothing to
    capture; tests check the buffers' path there)."""

    def __init__(self, compiled, capture: bool = True):
        self.compiled, self.capture = compiled, capture
        self._capturing = False  # inside warm-up: new shapes are captured
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()  # least recently used first
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

    def _shape(self, key: tuple, tensors: dict[str, torch.Tensor]) -> _Shape:
        if key in self.shapes:
            self.shapes.move_to_end(key)
            return self.shapes[key]
        if len(self.shapes) >= MAX_SLOTS:  # the least recently used makes room (captured again if it returns)
            self.shapes.popitem(last=False)
        shape = self.shapes[key] = _Shape({name: t.clone() for name, t in tensors.items()})
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

    def _capture(self, shape: _Shape) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and autotune outside the capture
            for _ in range(3):
                self._run(shape.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._run(shape.inputs)
        except RuntimeError as exc:  # still correct, only slower: say so rather than fail the replica
            log.warning("CUDA graph capture of FLUX's transformer failed (%s); this shape runs compiled without one",
                        exc)
            torch.cuda.synchronize()
            return
        shape.graph, shape.output = graph, output

    @property
    def graphs(self) -> int:
        """How many shapes replay from a CUDA graph."""
        return sum(shape.graph is not None for shape in self.shapes.values())
