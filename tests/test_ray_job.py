"""The README's `ray job submit` line, run as written with Ray's own CLI on a fresh local head
started as the README says: the job finds the project, joins the cluster, and ingests a group photo;
with every CPU held by another job's actor, it fails in seconds to minutes, saying what holds them."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The README's line, its job's arguments filled in.
README_LINE = "ray job submit --working-dir . -- python -m ray_faceid"


def test_the_readme_names_the_line_this_test_runs():
    assert README_LINE in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def ray_head(loopback_port):
    """`ray start --head --block` on loopback, as the README starts it (from the project's
    environment), in a short temp folder of its own (Unix socket paths are bounded). Stopped by
    killing its own process group: `ray stop` would stop every Ray on the machine."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]))  # `. .venv/bin/activate`
    temp = tempfile.mkdtemp(prefix="rj")
    dashboard = loopback_port()
    start = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={loopback_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={loopback_port()}", f"--dashboard-agent-listen-port={loopback_port()}",
             "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = Path(temp) / "head.log"
    head = subprocess.Popen(start, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert head.poll() is None and "Ray runtime started" in log.read_text(), log.read_text()[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:  # the whole group at once: a graceful `--block` shutdown takes half a minute
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_readmes_ray_job_submit_line_runs_a_job_on_a_fresh_head(ray_head, sample_photos, tmp_path):
    address, env = ray_head
    (tmp_path / "archive" / "party").mkdir(parents=True)
    shutil.copy(sample_photos["t1.jpg"], tmp_path / "archive" / "party" / "t1.jpg")
    command = [*README_LINE.split(), "ingest", str(tmp_path / "archive"), str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=dict(env, RAY_ADDRESS=address), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout
    assert pq.read_table(tmp_path / "out" / "faces.parquet").num_rows == 6


HOG = """import time
import ray

@ray.remote(num_cpus=2)
class CpuHolder:
    def ready(self):
        return True

ray.init()
holder = CpuHolder.remote()
ray.get(holder.ready.remote())
print("holding every CPU", flush=True)
time.sleep(300)
"""


def test_a_job_that_cannot_be_placed_fails_soon_and_names_what_holds_the_cpus(ray_head, sample_photos, tmp_path):
    address, env = ray_head
    env = dict(env, RAY_ADDRESS=address)
    (tmp_path / "hog").mkdir()
    (tmp_path / "hog" / "hog.py").write_text(HOG)
    held = subprocess.run(["ray", "job", "submit", "--no-wait", "--working-dir", str(tmp_path / "hog"), "--",
                           "python", "hog.py"], env=env, capture_output=True, text=True, timeout=120)
    assert held.returncode == 0, held.stdout + held.stderr
    hog_job = next(w for w in held.stdout.split() if w.strip("'").startswith("raysubmit_")).strip("'")
    try:
        deadline = time.monotonic() + 120
        while "holding every CPU" not in subprocess.run(["ray", "job", "logs", hog_job], env=env, capture_output=True,
                                                        text=True, timeout=60).stdout:
            assert time.monotonic() < deadline, "the CPU-holding job did not start"
            time.sleep(1)
        (tmp_path / "archive" / "party").mkdir(parents=True)
        shutil.copy(sample_photos["t1.jpg"], tmp_path / "archive" / "party" / "t1.jpg")
        command = [*README_LINE.split(), "ingest", str(tmp_path / "archive"), str(tmp_path / "out"), "--stall-fail", "10"]
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "cannot be placed" in output, output[-4000:]
        assert "CpuHolder" in output and "CPU 2" in output, output[-4000:]  # which actor holds what
        assert time.monotonic() - started < 180
    finally:  # the head is killed after the module in any case
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["ray", "job", "stop", hog_job], env=env, capture_output=True, timeout=120)
