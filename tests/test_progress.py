"""Progress lines: the first and last step always, otherwise at most one per interval."""
from ray_faceid.progress import ProgressLine


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
