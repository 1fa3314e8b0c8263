"""Weights files read by tensor name: a safetensors file's header alone, or a whole .safetensors /
.pt / .pth file's tensors. `meta=True` gives each tensor's name, shape and dtype without its values
(the header, or a memory-mapped pickle), so a Serve config or a render job can check a file's layout
before any replica or actor loads gigabytes of it."""
from __future__ import annotations

import io
import json

import torch

from ray_faceid import storage
from ray_faceid.errors import UnsupportedModel

HEADER_LIMIT = 100_000_000  # safetensors' own bound on a header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _read_header(uri: str) -> tuple[dict, int]:
    """(the JSON header, the bytes the file should hold); ({}, 0) where it has no readable header."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        try:
            header = json.loads(f.read(size)) if 0 < size <= HEADER_LIMIT else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        return {}, 0
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    return header, 8 + size + max(ends, default=0)


def safetensors_header(uri: str) -> dict:
    """A safetensors file's JSON header alone (its first 8 bytes give its length; {} where there is
    none): what a file takes and what made it are known before gigabytes of weights or a base load."""
    return _read_header(uri)[0]


def header_shapes(uri: str) -> dict[str, list[int]]:
    """Each tensor's shape, from the file's header."""
    return {k: v.get("shape") for k, v in safetensors_header(uri).items() if k != "__metadata__" and isinstance(v, dict)}


def read_tensors(uri: str, what: str, meta: bool = False) -> dict[str, torch.Tensor]:
    """A weights file's tensors by name (.safetensors, or a .pt/.pth read with weights_only: no pickled
    code runs); with `meta`, on the meta device (shapes and dtypes only). A damaged, cut short or foreign
    file is one UnsupportedModel line naming `what` it should be."""
    try:
        if str(uri).endswith(".safetensors"):
            state = _safetensors_on_meta(uri) if meta else _safetensors(uri)
        else:
            state = _pickled(uri, meta)
    except UnsupportedModel:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling and safetensors raise many types
        raise UnsupportedModel(f"{uri}: not a readable {what} ({type(exc).__name__})") from None
    for key in ("model", "module", "state_dict"):  # wrappers checkpoints are often saved in
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedModel(f"{uri}: not a {what}: it holds no table of tensors")
    return state


def _safetensors(uri: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(uri))


def _safetensors_on_meta(uri: str) -> dict:
    header, expected = _read_header(uri)
    if not header:
        raise UnsupportedModel(f"{uri}: not a readable safetensors file (no header)")
    fs, path = storage.filesystem(uri)
    if fs.size(path) != expected:
        raise UnsupportedModel(f"{uri}: {fs.size(path):,} bytes where its header says {expected:,}: "
                               f"{'cut short' if fs.size(path) < expected else 'damaged'}; copy it again")
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        try:
            start, end = entry["data_offsets"]
            meta = torch.empty(entry["shape"], dtype=dtype, device="meta")
        except (KeyError, TypeError, ValueError, RuntimeError):
            meta = None
        # As safetensors checks when it loads: a known dtype, and offsets that hold exactly the shape's bytes.
        if meta is None or dtype is None or end - start != meta.numel() * meta.element_size():
            raise UnsupportedModel(f"{uri}: its header's entry for {name} does not describe its bytes: the file is damaged")
        tensors[name] = meta
        spans.append((start, end))
    spans.sort()
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or (spans and spans[0][0] != 0):
        raise UnsupportedModel(f"{uri}: its tensors' bytes overlap or leave gaps: the file is damaged")
    return tensors


def _pickled(uri: str, meta: bool):
    local = (uri if "://" not in str(uri) else str(uri).removeprefix("file://") if str(uri).startswith("file://")
             else None) if meta else None
    if local is not None:  # memory-mapped: only the tensors' descriptions are read
        try:
            state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped: read it whole
            state = None
        if state is not None:
            return _on_meta(state)
    state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    return _on_meta(state) if meta else state


def _on_meta(state):
    if isinstance(state, dict):
        return {k: _on_meta(v) for k, v in state.items()}
    return torch.empty_like(state, device="meta") if isinstance(state, torch.Tensor) else state
