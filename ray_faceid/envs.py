"""Every environment variable ray_faceid reads, in one place."""
from __future__ import annotations

import os

# Ray defaults for our processes: no usage stats, and a local cluster bound to loopback only.
RAY_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def api_tokens() -> str:
    """`tenant:token,tenant:token` bearer tokens for the HTTP API."""
    return os.environ.get("RAY_FACEID_API_TOKENS", "")


def cache_dir() -> str:
    return os.environ.get("RAY_FACEID_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ray_faceid"))


def serve_wait_line_s() -> float:
    """How often `ray-faceid serve` says what its replicas are doing while they start (seconds)."""
    return float(os.environ.get("RAY_FACEID_SERVE_WAIT_LINE_S", "15"))


def torch_compile_backend() -> str:
    """torch.compile's backend for `--backend torch.compile`: Inductor (the default, what serves),
    or another registered one, e.g. `aot_eager` (traces and runs the same graph with no code
    generation: where no C++ compiler exists, to tell a compiler defect from ours) or `eager` (the
    same Dynamo graph, no AOT pass: the test suite's path tests, which check our graph, not
    Inductor's kernels)."""
    return os.environ.get("RAY_FACEID_TORCH_COMPILE_BACKEND", "inductor")


def apply_ray_defaults() -> None:
    for key, value in RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)
