"""Connect to a Ray cluster, or start a local one that listens on loopback only."""
from __future__ import annotations

from ray_faceid.envs import apply_ray_defaults


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    import ray

    from ray_faceid import quiet

    apply_ray_defaults()
    if ray.is_initialized():
        return
    levels = quiet.before_ray_init()
    if address:
        ray.init(address=address, log_to_driver=True, **levels)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 **levels)
    quiet.after_ray_init()
    _exit_quietly_on_sigterm()


TERMINATED_BY: int | None = None
"""The signal that stopped this process. Ray turns an exit raised inside one of its blocking calls
(`ray.get`, as in Ray Train's fit) into SystemExit(1); the CLI's entry point restores 128 + signal."""


def _exit_quietly_on_sigterm() -> None:
    """Ray's core installs a crash handler that dumps a native stack on SIGTERM, which is how
    operators and schedulers stop a job or a server: exit as for Ctrl-C instead (code 143, no
    dump; the local cluster is shut down at exit)."""
    import signal
    import sys
    import threading

    def stop(signum, frame):
        global TERMINATED_BY
        TERMINATED_BY = signum
        sys.exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def is_local(address: str | None) -> bool:
    """Whether jobs run on a cluster this process started (its size is final: no autoscaler)."""
    import os

    return not address and not os.environ.get("RAY_ADDRESS")


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def free_workers(gpus: bool) -> int:
    """A job's default number of workers: the GPUs (or CPUs) free when it starts, at least one. A
    Serve app or another job on the cluster keeps what it holds: asking for the whole cluster's
    count left a job waiting for actors that could never start."""
    import ray

    return max(1, int(ray.available_resources().get("GPU" if gpus else "CPU", 0)))
