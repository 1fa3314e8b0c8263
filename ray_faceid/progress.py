"""One progress line at most every few seconds (step, loss, steps/s, ETA): readable in a terminal
and in a log file alike, where a redrawn bar would repeat itself."""
from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, what: str, total: int, first: int = 0, every_s: float = 10.0, emit=print):
        self.what, self.total, self.first, self.every_s, self.emit = what, total, first, every_s, emit
        self.started = time.monotonic()
        self.last = float("-inf")

    def update(self, count: int, **figures: float) -> None:
        now = time.monotonic()
        if count < self.total and now - self.last < self.every_s and count != self.first + 1:
            return
        self.last = now
        rate = (count - self.first) / max(now - self.started, 1e-9)
        eta = (self.total - count) / rate if rate > 0 else float("inf")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
        self.emit(f"{self.what}: {count}/{self.total}" + (f", {shown}" if shown else "") +
                  f", {rate:.2f}/s, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def to_stderr(line: str) -> None:
    """Where driver-side jobs report: stdout stays for results (--json)."""
    print(line, file=sys.stderr, flush=True)


def silent(_: str) -> None:
    """For every worker but the first: one progress line per job, not one per worker."""


def denoise_reporter(what: str = "denoise", every_s: float = 5.0):
    """A callback(step, total) for IdentityPipeline.on_step: a live bar (steps, s/step, ETA) on a
    terminal, else a ProgressLine on stderr at most every `every_s` seconds."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                       TimeRemainingColumn(), transient=True)
        state: dict = {}

        def on_bar(step: int, total: int) -> None:
            if step == 0 or "task" not in state:
                if "task" in state:
                    bar.stop()
                bar.start()
                state["task"], state["started"] = bar.add_task(what, total=total, rate=""), time.monotonic()
            if step == 1:  # it holds any compile on first use: the rate starts after it
                first, state["started"] = time.monotonic() - state["started"], time.monotonic()
                bar.update(state["task"], completed=1, rate=f"first step {first:.1f} s")
            elif step:
                per_step = (time.monotonic() - state["started"]) / (step - 1)
                bar.update(state["task"], completed=step, rate=f"{per_step:.2f} s/step")
            if step >= total:
                bar.stop()
                state.clear()
        return on_bar
    lines: dict = {}

    def on_line(step: int, total: int) -> None:
        if step == 0 or "line" not in lines:
            lines["line"] = ProgressLine(f"{what} steps", total, every_s=every_s, emit=to_stderr)
        if step == 1 and total > 1:
            # The first step holds any compile on first use (minutes): said apart, the rate and ETA start after it.
            to_stderr(f"{what} steps: 1/{total}, first step {time.monotonic() - lines['line'].started:.1f} s")
            lines["line"] = ProgressLine(f"{what} steps", total, first=1, every_s=every_s, emit=to_stderr)
        elif step:
            lines["line"].update(step)
    return on_line
