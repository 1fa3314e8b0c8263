"""Progress lines: the first and last step always, otherwise at most one per interval."""
from ray_faceid import progress as progress_module
from ray_faceid.progress import ProgressLine, denoise_reporter


def test_progress_prints_first_last_and_at_most_once_per_interval():
    lines = []
    progress = ProgressLine("train decoupled", total=100, every_s=3600, emit=lines.append)
    for step in range(1, 101):
        progress.update(step, loss=0.5)
    assert len(lines) == 2
    assert lines[0].startswith("train decoupled: 1/100, loss 0.5, ") and "ETA" in lines[0]
    assert lines[1].startswith("train decoupled: 100/100") and lines[1].endswith("ETA 0m00s")


def test_resumed_runs_count_from_where_they_started():
    lines = []
    progress = ProgressLine("train", total=10, first=6, every_s=0, emit=lines.append)
    progress.update(7)
    assert lines == [lines[0]] and lines[0].startswith("train: 7/10, ")


def test_the_denoise_rate_leaves_out_the_first_step_which_may_compile(monkeypatch, capsys):
    """A compiled pipeline's first step holds minutes of Inductor: it said '0.01/s, ETA 48m' for 30 steps of
    one second each. The first step is said apart; the rate and ETA come from the steps after it."""
    clock = iter([0.0, 100.0, 100.0, 101.0, 130.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    report = denoise_reporter(every_s=3600)
    for step in (0, 1, 2, 30):
        report(step, 30)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "denoise steps: 1/30, first step 100.0 s"
    assert lines[1] == "denoise steps: 2/30, 1.00/s, ETA 0m28s"
    assert lines[2].startswith("denoise steps: 30/30")
