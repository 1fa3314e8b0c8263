"""A job whose workers stop making progress fails with what the cluster waits for, not silently."""
import re
import time

import pytest

from ray_faceid.config import TrainConfig
from ray_faceid.train.adapter import run_training
from ray_faceid.watchdog import Stalled, Watchdog


def test_the_watchdog_warns_then_fails_with_the_report():
    said, last = [], time.time()
    with pytest.raises(Stalled, match=r"no progress for \d+ s \(the limit is 1 s\)"):
        with Watchdog("job", warn_after=0.3, fail_after=1.0, last_beat=lambda: last, emit=said.append,
                      report=lambda: "CPU 0/2"):
            time.sleep(5)  # interrupted by the watchdog
    assert said and "failing at 1 s" in said[0] and "CPU 0/2" in said[0]


def test_a_job_that_cannot_be_placed_fails_in_minutes_not_after_the_stall_limit():
    """No first step while the cluster has nothing left to give: it fails at the placement limit,
    not the hour a slow step may take; once a step is done, only the stall limit applies."""
    with pytest.raises(Stalled, match=r"(?s)cannot be placed: no first step in \d+ s, none of its workers placed.*held by: 2 x"):
        with Watchdog("ingest", warn_after=100, fail_after=3600, unplaced_after=0.5, starved=lambda: True,
                      report=lambda: "held by: 2 x Generator (job 01000000): CPU 2"):
            time.sleep(5)  # interrupted by the watchdog
    with Watchdog("ingest", warn_after=100, fail_after=3600, unplaced_after=0.5, starved=lambda: True) as dog:
        dog.beat()  # a first step done: a busy cluster now is no reason to stop
        time.sleep(1.5)
    with Watchdog("ingest", warn_after=100, fail_after=3600, unplaced_after=0.5, starved=lambda: False):
        time.sleep(1.5)  # free resources and no step yet: a slow start, not a placement failure
    assert Watchdog("job", warn_after=600, fail_after=3600).unplaced_after <= 600  # minutes, not the hour


def test_the_watchdog_stops_a_job_whose_process_ignores_sigint():
    """Started in the background (or by a launcher that ignores SIGINT), a stalled job still stops:
    the watchdog's interrupt is a simulated SIGINT, which Python drops where SIGINT is ignored."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.monotonic()
        with pytest.raises(Stalled, match="no progress"):
            with Watchdog("job", warn_after=0.3, fail_after=1.0, emit=lambda line: None, report=lambda: "-"):
                time.sleep(30)  # interrupted by the watchdog (a job blocked in Ray waits forever)
        assert time.monotonic() - started < 20
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # as the job had it
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_training_job_that_stops_progressing_fails_with_a_report(small_dataset, tmp_path, ray_cluster):
    import ray

    config = TrainConfig(steps=6, batch_size=2, size=64, workers=1, cpus_per_worker=0.5, stall_warn_s=3,
                         stall_fail_s=8)
    started = time.perf_counter()
    with pytest.raises(Stalled) as stalled:
        run_training(small_dataset, "tiny", str(tmp_path / "run"), config, fault={"hang_at": 2})
    assert time.perf_counter() - started < 120
    assert "train decoupled: no progress for" in stalled.value.message and "resources free / total" in stalled.value.message
    # Says what the workers did: not started yet, or just started (a loaded machine: a cold worker here
    # took 17 s to start, past the 8 s limit), or idle inside the hung step.
    assert re.search(r"workers:\s+(none has started|worker 0 \(pid \d+\): (idle, waiting|started, too recently))",
                     stalled.value.message)
    deadline = time.time() + 60  # the stopped job gives its CPUs back to the next one
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_the_report_tells_a_busy_worker_from_an_idle_one(ray_cluster):
    """Two workers without a finished step: one computing inside a long step, one waiting."""
    import ray

    from ray_faceid import watchdog
    from ray_faceid.watchdog import Pulse, activity_report, new_heartbeat

    heartbeat = new_heartbeat()
    assert "none has started" in activity_report(heartbeat)

    @ray.remote(num_cpus=0.1)
    def work(name: str, busy: bool, seconds: float) -> None:
        watchdog.PULSE_S = 0.5
        with Pulse(heartbeat, name):
            end = time.time() + seconds
            while time.time() < end:
                if busy:
                    sum(i * i for i in range(10000))
                else:
                    time.sleep(0.1)

    heartbeat.pulse.remote("worker 0", 1, 0.0)  # worker 0's earlier process, before a restart
    ray.get([work.remote("worker 0", True, 4), work.remote("worker 1", False, 4)])
    report = activity_report(heartbeat, window_s=10)
    assert re.search(r"worker 0 \(pid \d+\): busy, CPU in use", report), report
    assert re.search(r"worker 1 \(pid \d+\): idle, waiting", report), report
    assert "(pid 1)" not in report  # the restarted worker's old process is not reported as lost
