"""No silent hangs: a job that stops making progress says what it waits for, then fails.

Workers (or the driver's progress loop) beat after every step; a thread on the driver watches the
time since the last beat. Past `warn_after` seconds it prints what each worker is doing (busy
computing or idle, from the CPU time their pulse reports between steps) and what the cluster is
waiting for (resources free and total, placement groups that cannot be placed, pending tasks
where Ray's state API is up, and which actors hold the cluster's CPUs and GPUs); past `fail_after`
it interrupts the job and raises Stalled with that report, instead of leaving a node billed for
nothing. A job none of whose workers has been placed, one of them needing more CPUs or GPUs than
the cluster has free (a Serve app's replicas hold them, say), cannot be placed: it fails after
UNPLACED_FAIL_S, in minutes, not after the hour a slow step is allowed.
"""
from __future__ import annotations

import _thread
import re
import signal
import threading
import time
from typing import Callable

from ray_faceid.errors import FaceIdError
from ray_faceid.progress import to_stderr


class Stalled(FaceIdError):
    """A job in which no step completed for longer than its stall limit."""

    status = 504
    code = "stalled"


PULSE_S = 5.0
"""How often a worker's pulse sends its process's CPU time (steps may take much longer)."""
BUSY_CPU = 0.2
"""CPU-seconds per second above which a worker without progress is computing, not waiting."""
UNPLACED_FAIL_S = 600.0
"""No first step this long, with workers that cannot be created: the job cannot be placed (long
enough for an autoscaler to add a node, minutes where a slow step is allowed an hour)."""


def _heartbeat_class():
    import ray

    @ray.remote(num_cpus=0)
    class Heartbeat:
        """Where workers on any node record their progress (no CPU: it never competes with them),
        and, from their pulse, the CPU time their processes use between steps."""

        def __init__(self):
            self.at, self.step = 0.0, None  # no beat yet: a Watchdog tells "not started" from "stalled"
            self.cpu: dict[str, list[tuple[float, float]]] = {}

        def beat(self, step=None) -> None:
            self.at, self.step = time.time(), step

        def last(self) -> tuple[float, object]:
            return self.at, self.step

        def pulse(self, worker: str, pid: int, cpu_s: float) -> None:
            """A worker restarted by Ray Train (a new pid) replaces its old entry."""
            now = time.time()
            key = f"{worker} (pid {pid})"
            if key not in self.cpu:
                self.cpu = {k: v for k, v in self.cpu.items() if not k.startswith(f"{worker} (pid ")}
            self.cpu[key] = [(t, c) for t, c in self.cpu.get(key, []) if now - t < 600] + [(now, cpu_s)]

        def activity(self, window_s: float) -> dict[str, tuple[float | None, float]]:
            """worker -> (CPU-seconds per second over the last `window_s`, seconds since its last pulse)."""
            now, out = time.time(), {}
            for worker, seen in self.cpu.items():
                recent = [(t, c) for t, c in seen if now - t <= window_s] or seen[-1:]
                first, last = recent[0], recent[-1]
                rate = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else None
                out[worker] = (rate, now - last[0])
            return out

    return Heartbeat


class Pulse:
    """`with Pulse(heartbeat, "worker 0"):` in a worker: a thread sends the process's CPU time every
    PULSE_S, so a stalled job's report can tell a worker busy inside a long step from an idle one."""

    def __init__(self, heartbeat, worker: str):
        import os

        self.heartbeat, self.worker, self.pid = heartbeat, worker, os.getpid()
        self._stop = threading.Event()

    def _send(self) -> None:
        while True:
            try:
                self.heartbeat.pulse.remote(self.worker, self.pid, time.process_time())
            except Exception:  # noqa: BLE001 - a pulse is a report, never a reason to fail the work
                pass
            if self._stop.wait(PULSE_S):
                return

    def __enter__(self) -> "Pulse":
        if self.heartbeat is not None:
            threading.Thread(target=self._send, name="ray_faceid-pulse", daemon=True).start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        return False


def activity_report(heartbeat, window_s: float = 60.0) -> str:
    """One line per worker: busy (CPU time moving: computing inside a step) or idle (waiting)."""
    import ray

    try:
        seen = ray.get(heartbeat.activity.remote(window_s), timeout=30)
    except Exception:  # noqa: BLE001 - a report, not a check
        return "workers: their activity could not be read"
    if not seen:
        return "workers: none has started (no pulse yet): the job waits for resources or for workers to start"
    lines = []
    for worker, (rate, age) in sorted(seen.items()):
        if age > 6 * PULSE_S:
            lines.append(f"{worker}: no pulse for {age:.0f} s (its process stopped or cannot reach the driver)")
        elif rate is None:
            lines.append(f"{worker}: started, too recently to judge")
        elif rate >= BUSY_CPU:
            # CPU in use: computing inside a long step (or spinning in a collective on a hung peer).
            lines.append(f"{worker}: busy, CPU in use ({rate:.2f} CPU-s/s over the last {window_s:g} s), "
                         "no step finished")
        else:
            lines.append(f"{worker}: idle, waiting ({rate:.2f} CPU-s/s over the last {window_s:g} s)")
    return "workers:\n  " + "\n  ".join(lines)


def job_report(heartbeat) -> Callable[[], str]:
    """The stall report of a job with workers: what each worker does, then what the cluster waits for."""
    return lambda: activity_report(heartbeat) + "\n  " + waiting_report()


def new_heartbeat():
    """A heartbeat actor for a job's workers: pass it to them and call `beat(handle, step)`."""
    return _heartbeat_class().remote()


def beat(heartbeat, step=None) -> None:
    """Record progress from a worker (fire and forget; a missing heartbeat is no error)."""
    if heartbeat is not None:
        heartbeat.beat.remote(step)


def last_beat(heartbeat) -> Callable[[], float]:
    """The time of the heartbeat's last beat, for Watchdog."""
    import ray

    return lambda: ray.get(heartbeat.last.remote(), timeout=30)[0]


def waiting_report() -> str:
    """What the cluster is waiting for, in a few lines."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    lines = ["resources free / total: " + ", ".join(
        f"{k} {free.get(k, 0):g}/{v:g}" for k, v in sorted(total.items()) if k in ("CPU", "GPU", "memory") or
        k.startswith("accelerator")) if total else "resources: the cluster reports none"]
    try:
        pending = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") == "PENDING"]
        for pg in pending[:5]:
            lines.append(f"placement group {pg.get('name') or pg.get('placement_group_id', '')[:8]} cannot be placed: "
                         f"needs {pg.get('bundles')}")
    except Exception:  # noqa: BLE001 - a report, not a check
        pass
    try:
        from ray.util.state import list_tasks

        waiting = [t for t in list_tasks(filters=[("state", "!=", "FINISHED")], limit=200, raise_on_missing_output=False)
                   if str(t.state).startswith("PENDING")]
        lines.append(f"{len(waiting)} task(s) pending: " + ", ".join(sorted({t.name for t in waiting})[:5]))
    except Exception:  # noqa: BLE001 - the state API needs the dashboard, which local clusters leave out
        lines.append("pending tasks: not known here (Ray's state API needs the dashboard: `ray list tasks` on a "
                     "cluster started with it)")
    lines.append(holders_report())
    return "\n  ".join(lines)


def _cpus_and_gpus(required: dict | None) -> dict[str, float]:
    """An actor's CPUs and GPUs. An actor in a placement group (Ray Train's workers) asks for
    `CPU_group_<index>_<group>` (and the wildcard `CPU_group_<group>`, not counted twice)."""
    held: dict[str, float] = {}
    for key, value in (required or {}).items():
        kind = re.match(r"^(CPU|GPU)(?:_group_\d+_[0-9a-f]+)?$", key)
        if kind and value:
            held[kind[1]] = held.get(kind[1], 0.0) + value
    return held


def holders_report() -> str:
    """Which live actors hold the cluster's CPUs and GPUs (a Serve app's replicas, another job's
    workers), by class and job: what an operator frees or resizes to let a job in."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the state API needs the dashboard, which local clusters leave out
        return "what holds the resources: not known here (Ray's state API needs the dashboard: `ray list actors`)"
    held: dict[str, list] = {}
    for actor in actors:
        need = _cpus_and_gpus(actor.required_resources)
        if need:
            key = f"{actor.class_name} (job {actor.job_id})"
            count, total = held.get(key, [0, {}])
            held[key] = [count + 1, {k: total.get(k, 0) + v for k, v in need.items()}]
    if not held:
        return "no live actor holds a CPU or GPU"
    ranked = sorted(held.items(), key=lambda kv: -sum(kv[1][1].values()))
    return "held by: " + "; ".join(f"{n} x {key}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(need.items()))
                                   for key, (n, need) in ranked[:8])


def cannot_start() -> bool:
    """This job's workers cannot start: none has been placed on a node (an actor whose constructor
    runs, loading models, is placed and holds its resources), and one waiting to be created needs
    more CPUs or GPUs than the cluster has free. Unknown without Ray's state API (it needs the
    dashboard): then False, and the ordinary stall limit applies."""
    import ray
    from ray.util.state import list_actors

    if not ray.is_initialized():
        return False
    total, free = ray.cluster_resources(), ray.available_resources()
    if free.get("CPU", 0) >= 1 and free.get("GPU", 0) >= min(1.0, total.get("GPU", 0)):
        return False  # room for a worker of any kind: not a placement problem (asked before the state API)
    job = ray.get_runtime_context().get_job_id()
    mine = list_actors(filters=[("job_id", "=", job)], detail=True, limit=1000, timeout=30,
                       raise_on_missing_output=False)
    mine = [a for a in mine if _cpus_and_gpus(a.required_resources)]  # not the zero-CPU heartbeat
    if any(a.state != "DEAD" and (a.node_id or a.pid) for a in mine):
        return False
    waiting = [a for a in mine if a.state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")]
    return any(free.get(kind, 0.0) < need for a in waiting for kind, need in _cpus_and_gpus(a.required_resources).items())


class Watchdog:
    """`with Watchdog(...) as dog:` around a blocking job. Progress comes from `dog.beat()` (a driver
    loop) or from `last_beat()`, the time of the workers' last beat (a heartbeat actor)."""

    def __init__(self, what: str, warn_after: float, fail_after: float, last_beat: Callable[[], float] | None = None,
                 emit: Callable[[str], None] = to_stderr, report: Callable[[], str] = waiting_report,
                 unplaced_after: float = UNPLACED_FAIL_S, starved: Callable[[], bool] = cannot_start):
        self.what, self.last_beat, self.warn_after, self.fail_after = what, last_beat, warn_after, fail_after
        self.emit, self.report = emit, report
        self.unplaced_after, self.starved = min(unplaced_after, fail_after), starved
        self.failure: str | None = None
        self._started = self._last = time.time()
        self._stop = threading.Event()
        self._ending = threading.Lock()  # __exit__ and the decision to interrupt never interleave

    def beat(self) -> None:
        self._last = time.time()

    def _watch(self) -> None:
        warned_at = None
        while not self._stop.wait(min(5.0, self.warn_after / 4, self.unplaced_after / 4)):
            if self.last_beat is not None:
                try:
                    self._last = max(self._last, self.last_beat())
                except Exception:  # noqa: BLE001 - an unreachable heartbeat is no progress: keep the last one known
                    pass
            idle = time.time() - self._last
            if self._last == self._started and idle > self.unplaced_after and self._is_starved():
                self._fail(f"{self.what}: cannot be placed: no first step in {idle:.0f} s, none of its workers "
                           f"placed and the cluster without the CPUs or GPUs they need (the limit is "
                           f"{self.unplaced_after:g} s); stopped. Free what holds them, or give the job fewer workers "
                           f"(--workers). State:\n  {self.report()}")
                return
            if idle > self.fail_after:
                self._fail(f"{self.what}: no progress for {idle:.0f} s (the limit is {self.fail_after:g} s); "
                           f"stopped. State:\n  {self.report()}")
                return
            if idle > self.warn_after and (warned_at is None or time.time() - warned_at > self.warn_after):
                warned_at = time.time()
                self.emit(f"{self.what}: no progress for {idle:.0f} s (failing at {self.fail_after:g} s). "
                          f"State:\n  {self.report()}")

    def _is_starved(self) -> bool:
        try:
            return self.starved()
        except Exception:  # noqa: BLE001 - unknown is not starved: the ordinary stall limit applies
            return False

    def _fail(self, failure: str) -> None:
        with self._ending:
            if self._stop.is_set():  # the job ended while the report was made: nothing to stop
                return
            self.failure = failure
            if callable(signal.getsignal(signal.SIGINT)):  # a real SIGINT: it also wakes a blocking wait
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            else:
                _thread.interrupt_main()

    def __enter__(self) -> "Watchdog":
        # The interrupt is a SIGINT, which a process started in the background (or by a launcher that
        # ignores it) would drop: Python's handler for the job's length.
        self._sigint = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread = threading.Thread(target=self._watch, name="ray_faceid-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        with self._ending:
            self._stop.set()
        self._thread.join()
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
        if self.failure is not None and (kind is None or issubclass(kind, (KeyboardInterrupt, SystemExit))):
            # Ray Train answers the interrupt by aborting its run and raising SystemExit.
            raise Stalled(self.failure) from exc
        return False
