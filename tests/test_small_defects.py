"""Issue 24's smaller defects, each shown failing on the code before its fix: the quiet filter's
repeat window, worker CPU shares, the watchdog's end, and the engine cache's crash and race safety."""
import json
import threading
import time

import pytest


def test_a_repeated_worker_error_is_shown_each_time_it_recurs_and_bursts_are_counted():
    from ray_faceid.quiet import RepeatedLines

    now = [0.0]
    lines = RepeatedLines(window_s=2.0, clock=lambda: now[0])
    error = "ValueError: the store is unreachable"
    assert lines.keep(7, [error, error]) == [error]  # Ray's double forwarding: one copy
    now[0] = 60.0  # a minute later, the same error again: shown, not swallowed
    assert lines.keep(7, [error]) == [error]
    now[0] = 60.5
    assert lines.keep(7, [error, error, error]) == []
    assert lines.keep(7, ["next"]) == ["(the line above came 4 times)", "next"]
    assert lines.keep(8, ["next"]) == ["next"]  # per process


def test_worker_cpu_shares_are_rounded_down_so_they_fit(monkeypatch):
    import ray

    from ray_faceid.train.placement import worker_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    resources = worker_resources(4, None, use_gpu=False, with_data=True, local=True)
    assert resources["CPU"] == 0.37 and 4 * resources["CPU"] + 0.5 <= 2.0


def test_the_watchdog_never_interrupts_a_job_that_already_finished():
    """The job ends while the watchdog is writing its failure report: no KeyboardInterrupt afterwards."""
    from ray_faceid.watchdog import Watchdog

    reporting = threading.Event()
    dog = Watchdog("job", warn_after=0.4, fail_after=0.1, emit=lambda _: None, report=lambda: "")

    def slow_report():
        reporting.set()
        dog._stop.wait(5)  # the report is still being made when the job ends
        return "CPU 0/2"

    dog.report = slow_report
    interrupted = False
    try:
        with dog:
            assert reporting.wait(5)
        time.sleep(1.0)  # an interrupt after the block would land here
    except KeyboardInterrupt:
        interrupted = True
    assert not interrupted and dog.failure is None


def _key():
    from ray_faceid.engines.cache import EngineKey

    return EngineKey(backend="onnx", model_hash="m", adapter_structure="a", batch=(1, 2, 4), latent=(8, 8),
                     identities=1, tokens=4)


def test_a_truncated_cache_entry_is_rebuilt(tmp_path):
    from ray_faceid.engines.cache import EngineCache

    cache, key = EngineCache(tmp_path), _key()

    def build(folder):
        (folder / "unet.onnx").write_bytes(b"graph")
        return folder / "unet.onnx"

    path = cache.get_or_build(key, "unet.onnx", build)
    meta = path.parent / "meta.json"
    meta.write_text(meta.read_text()[:20])  # a crash while writing it
    assert cache.get_or_build(key, "unet.onnx", build).read_bytes() == b"graph"
    json.loads(meta.read_text())
    with pytest.raises(RuntimeError):  # a build that fails leaves no half entry behind
        cache.store(key, lambda folder: (folder / "unet.onnx").write_bytes(b"gr") and (_ for _ in ()).throw(
            RuntimeError("crash")))
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]


def test_two_processes_storing_the_same_entry_both_finish(tmp_path):
    from ray_faceid.engines.cache import EngineCache

    cache, key, errors, started = EngineCache(tmp_path), _key(), [], threading.Barrier(2)

    def build(folder):
        time.sleep(0.2)
        (folder / "unet.onnx").write_bytes(b"graph")
        return folder / "unet.onnx"

    def store():
        try:
            started.wait()
            assert cache.store(key, build).read_bytes() == b"graph"
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=store) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert cache.lookup(key, "unet.onnx") is not None


def test_the_identity_figures_say_what_they_count():
    """A two-person image with one face found is not 'detected', yet its one match has a similarity:
    a new user read 'detection rate 0.0' beside 'similarity mean 0.872' as a contradiction."""
    from rich.console import Console

    from ray_faceid.cli.data import summary_table
    from ray_faceid.cli.render import eval_table

    console = Console(record=True, width=200)
    console.print(summary_table("render", {"similarity_mean": 0.872, "detection_rate": 0.0, "rows": 3}))
    metrics = {"images": 3, "detection_rate": 0.0, "similarity_mean": 0.872, "similarity_p10": 0.872,
               "multi_identity_images": 1, "leakage_max": 0.856}
    console.print(eval_table({"encoders": {"dlib": metrics}}, "eval"))
    said = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "images with every person's face found" in said and "similarity mean (cosine, of the faces matched)" in said
    assert "found: images with every person's face found; sim: cosine similarity of the faces matched" in said
    assert "rows" in said  # other figures keep their names
