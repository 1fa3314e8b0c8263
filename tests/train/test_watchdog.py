"""A job whose workers stop making progress fails with what the cluster waits for, not silently."""
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


def test_a_training_job_that_stops_progressing_fails_with_a_report(small_dataset, tmp_path, ray_cluster):
    import ray

    config = TrainConfig(steps=6, batch_size=2, size=64, workers=1, cpus_per_worker=0.5, stall_warn_s=3,
                         stall_fail_s=8)
    started = time.perf_counter()
    with pytest.raises(Stalled) as stalled:
        run_training(small_dataset, "tiny", str(tmp_path / "run"), config, fault={"hang_at": 2})
    assert time.perf_counter() - started < 120
    assert "train decoupled: no progress for" in stalled.value.message and "resources free / total" in stalled.value.message
    deadline = time.time() + 60  # the stopped job gives its CPUs back to the next one
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
