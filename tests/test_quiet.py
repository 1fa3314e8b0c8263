"""A normal run prints our progress and results, not Ray's chatter (ray_faceid/quiet.py lists what
is filtered and why)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ray_faceid import quiet


def test_a_normal_ingest_run_shows_none_of_the_listed_ray_messages(tmp_path, sample_photos):
    archive = tmp_path / "archive" / "tom"
    archive.mkdir(parents=True)
    shutil.copy(sample_photos["Tom_Hanks_54745.png"], archive / "a.png")
    shutil.copy(sample_photos["Tom_Hanks_54745.png"], archive / "b.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop(quiet.VERBOSE_ENV, None)
    command = [str(Path(sys.executable).parent / "ray-faceid"), "ingest", str(tmp_path / "archive"), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [*quiet.HARMLESS_LOGS, *quiet.HARMLESS_WORKER_LINES, *quiet.HARMLESS_WARNINGS, *quiet.HARMLESS_ACTORS,
             r"\tINFO ", r"Started a local Ray instance", r"UserWarning"]
    # Ray's C++ core writes one line per actor it made with object-store arguments straight to the
    # driver's stderr, outside Python: the one message that cannot be filtered.
    lines = [line for line in done.stderr.splitlines() if "core_worker.cc" not in line]
    found = [line for line in lines for pattern in noise if re.search(pattern, line)]
    assert not found, found
    assert "ingest images: 2/2" in done.stderr and "files" in done.stdout


def test_sigterm_stops_the_server_without_a_native_stack_dump(tmp_path, loopback_port):
    """Schedulers stop servers with SIGTERM; Ray's crash handler used to print a native stack."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_FACEID_SERVE_WAIT_LINE_S"] = "1"  # what the replicas do while they start, every second here
    command = [str(Path(sys.executable).parent / "ray-faceid"), "serve", "--port", str(loopback_port()),
               "--registry", str(tmp_path / "registry")]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        line = ""
        while "API at" not in line and time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
        assert "API at" in line, server.stderr.read()[-3000:] if server.poll() is not None else "no URL in 180 s"
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received" not in stderr and "clock_nanosleep" not in stderr
    assert re.search(r"starting \(\d+ s\): .*Generator (updating|healthy)", stderr), stderr[-3000:]


def test_a_real_worker_error_line_passes_the_filter():
    """The filter drops Ray's known chatter, never a worker's own error (however often it recurs)."""
    error = "ValueError: embeddings.npz of identity id_x is damaged"
    assert not any(re.search(p, error) for p in quiet.HARMLESS_WORKER_LINES)
    lines = quiet.RepeatedLines()
    assert lines.keep(1, ["Traceback (most recent call last):", error]) == ["Traceback (most recent call last):", error]


def test_ddps_unused_parameter_notice_is_not_printed_once_per_worker():
    notice = ("[W1129 01:02:03.456 reducer.cpp:1430] Warning: find_unused_parameters=True was specified in DDP "
              "constructor, but did not find any unused parameters in the forward pass.")
    assert any(re.search(p, notice) for p in quiet.HARMLESS_WORKER_LINES)


def test_onnx_export_leaves_out_the_exporters_notices_and_nothing_else(caplog, monkeypatch):
    import logging
    import warnings

    from ray_faceid import quiet

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    logger = logging.getLogger(quiet.EXPORTER_LOGGER)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with quiet.onnx_export():
            logger.warning("torchvision is not installed. Skipping torchvision::nms")
            logger.warning("the graph lost a weight")
            warnings.warn("# The axis name: batch will not be used, since it shares the same shape constraints")
            warnings.warn("a real problem")
        logger.warning("torchvision is not installed. Skipping torchvision::nms")  # only during an export
    assert [str(w.message) for w in seen] == ["a real problem"]
    assert [r.getMessage() for r in caplog.records] == ["the graph lost a weight",
                                                        "torchvision is not installed. Skipping torchvision::nms"]


def test_loading_a_users_model_leaves_out_diffusers_accelerate_notice_and_nothing_else(monkeypatch):
    """diffusers' 'accelerate was not found' (twice per model, 12 lines) no longer reaches the console
    when a model folder loads; its other warnings do."""
    import io
    import logging

    from diffusers.utils import logging as diffusers_logging

    from ray_faceid import quiet

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    quiet.model_loading()
    handler = logging.getLogger("diffusers").handlers[0]
    stream = io.StringIO()
    monkeypatch.setattr(handler, "stream", stream)
    logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    logger.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found in the "
                   "environment. Defaulting to `low_cpu_mem_usage=False`.")
    logger.warning("the unet's config names an unknown block")
    assert stream.getvalue() == "the unet's config names an unknown block\n"


def test_serves_routine_warnings_are_left_out_and_a_replica_that_cannot_be_placed_is_not():
    routine = ["WARNING 2026-12-04 09:01:02,345 proxy 127.0.0.1 -- Failed to get queue length from Replica(id='x', "
               "deployment='Generator', app='faceid') within 0.1s. If this happens repeatedly it's likely caused by "
               "high network latency in the cluster.",
               "WARNING controller 123 -- Deployment 'Generator' in application 'faceid' has 1 replicas that have "
               "taken more than 30s to initialize.", "This may be caused by a slow __init__ or reconfigure method."]
    for line in routine:
        assert any(re.search(p, line) for p in quiet.HARMLESS_WORKER_LINES), line
    unplaced = ("Deployment 'Generator' in application 'faceid' has 1 replicas that have taken more than 30s to be "
                "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment")
    assert not any(re.search(p, unplaced) for p in quiet.HARMLESS_WORKER_LINES)


def test_worker_lines_in_a_file_carry_no_colour_codes(monkeypatch, capsys):
    """`ray-faceid render ... 2> log`: Ray coloured each forwarded line's prefix there too."""
    from ray._private import worker

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    with open(os.devnull, "w") as file:  # a file, not a terminal
        monkeypatch.setattr(sys, "stderr", file)
        quiet.before_ray_init()
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    worker.print_worker_logs({"pid": 4242, "lines": ["rendering row r1"], "ip": "127.0.0.1",
                              "localhost": "127.0.0.1"}, sys.stdout)
    printed = capsys.readouterr().out
    assert "rendering row r1" in printed and "\x1b[" not in printed, repr(printed)
