"""Which engine serves a call of so many rows: plain arithmetic, which the config's checks use too.

The compiled engine pads a call up to a batch bucket (1, 2, 4, 8, 16 rows), each its own compiled
shape. ONNX Runtime graphs take any batch, so one graph serves every call at a size; a TensorRT
plan's profile bounds its batch, so plans cover powers of two from 8 rows. Requests, the pipeline's
warm-up and `compile` all key engines by these buckets, never by a call's own rows."""
from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16)
MAX_SLOTS = 16  # compiled shapes one engine keeps (each holds its buffers and, on CUDA, a graph)

MAX_ENGINES = 4  # file-built engines (one per size, identity count and bucket) a pipeline keeps
ONNX_MAX_ROWS = 512  # the batch axis bound the ONNX export declares


def engine_bucket(backend: str, rows: int) -> int:
    """The top of the batch range the engine serving `rows` is built for."""
    if backend == "onnxruntime":
        return ONNX_MAX_ROWS
    return max(8, 1 << (rows - 1).bit_length())


def engine_buckets(backend: str, max_rows: int) -> list[int]:
    """Every bucket calls of up to `max_rows` rows fall in."""
    tops = [engine_bucket(backend, 1)]
    while tops[-1] < engine_bucket(backend, max_rows):
        tops.append(tops[-1] * 2)
    return tops


def batch_bucket(rows: int) -> int:
    """The compiled engine's smallest bucket that holds `rows` (rows above the largest run in chunks of it)."""
    return next((b for b in BATCH_BUCKETS if b >= rows), BATCH_BUCKETS[-1])


def bucket_count(min_rows: int, max_rows: int) -> int:
    """How many compiled buckets a batch range reaches (config validation counts compiled shapes with it)."""
    return sum(min_rows <= b <= batch_bucket(max_rows) for b in BATCH_BUCKETS)
