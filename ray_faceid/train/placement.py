"""Fitting Ray Train workers on the cluster, with room left for the data that feeds them.

A Train job whose workers take every CPU never runs its dataset's read tasks: the workers wait
for data that can never be produced, and the job hangs without a word. So workers get, by
default, what the cluster can spare after the data pipeline, and a job that cannot fit fails at
once with what is missing and which flag to change.
"""
from __future__ import annotations

import logging
import math

from ray_faceid.errors import BadInput

log = logging.getLogger(__name__)
DATA_CPUS = 0.5  # what the data pipeline (Ray Data read tasks, the driver's own work) keeps free
MIN_WORKER_CPUS = 0.25


def worker_resources(workers: int, cpus_per_worker: float | None, use_gpu: bool, with_data: bool,
                     local: bool) -> dict:
    """resources_per_worker for ScalingConfig; raises BadInput when the job cannot fit.

    `local`: the cluster was started by this process, so its size is final. On a remote cluster
    the autoscaler may still add nodes: a shortfall there is logged, not refused."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    reserve = DATA_CPUS if with_data else 0.0
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if not local else max(MIN_WORKER_CPUS, min(1.0, (cpus - reserve) / workers))
        # Down to a hundredth, never up: rounding 0.375 up to 0.38 asked 4 workers for more than 2 CPUs.
        cpus_per_worker = math.floor(cpus_per_worker * 100 + 1e-9) / 100
    need = workers * cpus_per_worker + reserve
    problems = []
    if need > cpus + 1e-9:
        data = f" + {reserve} for the data pipeline" if reserve else ""
        problems.append(f"{need:g} CPUs ({workers} workers x {cpus_per_worker:g}{data}) but the cluster has {cpus:g}: "
                        f"use fewer --workers or a smaller --cpus-per-worker")
    if use_gpu and workers > gpus:
        problems.append(f"{workers} GPUs (one per worker) but the cluster has {gpus:g}: use --workers {int(gpus) or 1} "
                        f"{'' if gpus else 'without --gpu '}or add GPU nodes")
    if problems:
        message = "this job needs " + "; and ".join(problems)
        if local:
            raise BadInput(message)
        log.warning("%s (waiting for the autoscaler to add nodes)", message)
    return {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
