"""Quiet by default: Ray's own logs at warning level, and the messages we know to be harmless
filtered, each listed here with why. `ray-faceid --verbose ...` (RAY_FACEID_VERBOSE=1) shows all.

What stays: every warning and error not listed, our own progress lines and results.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings

VERBOSE_ENV = "RAY_FACEID_VERBOSE"

# Driver-side Python log records (the `ray` loggers) that are harmless here.
HARMLESS_LOGS = {
    r"Token authentication is enabled for this Ray cluster":
        "a notice, not a problem: the local cluster uses a token and listens on 127.0.0.1 only",
    r"Progress bars disabled": "we turn Ray Data's bars off ourselves (our jobs print one progress line)",
}

# Lines Ray forwards from its worker processes to the driver.
HARMLESS_WORKER_LINES = {
    r"Failed to query Ray Train Controller actor state":
        "Ray Train's cleanup actor polling a controller that already finished its run",
    r"Found multiple active Ray instances":
        "the same cleanup actor, looking up the cluster after the run; it exits on its own",
    r"ServeController\.graceful_shutdown failed":
        "Serve's controller, killed on shutdown, while its own shutdown task was queued (it is retried, then "
        "dropped with the cluster)",
    r"Failed to kill actor .* Socket closed":
        "actors of a finished job whose process is already gone",
    r"exclude_resources` is deprecated|self\.exclude_resources = exclude_resources":
        "a deprecation inside Ray Train's own dataset manager, not in our code",
    r"Progress bars disabled": "we turn Ray Data's bars off ourselves (our jobs print one progress line)",
    r"has constructor arguments in the object store":
        "Ray's core noting that an actor Ray itself created (Ray Data, Ray Train) could not restart if its "
        "owner died; the job's own restarts are unaffected",
    r"Starting execution of Dataset|Execution plan of Dataset|Dataset .* execution finished":
        "Ray Data announcing each dataset it streams to the training workers (INFO)",
    r"find_unused_parameters=True was specified in DDP constructor":
        "torch's DDP noting that one step used every parameter; the setting stays on because which adapter "
        "parameters a step reaches depends on the method and the batch, and a wrong False fails a multi-worker run",
    r"Reporting training result \d+":
        "Ray Train echoing each checkpoint report (INFO); the job prints its own progress line",
    r"Failed to get queue length from .* within [\d.]+s":
        "Serve's router asking a replica busy denoising for its queue length within 0.1 s; it routes the request "
        "anyway and asks again (a replica that is gone is reported as gone)",
    r"replicas? that ha(ve|s) taken more than \d+s to\s+initialize|This may be caused by a slow __init__ or reconfigure":
        "a Generator loading its base and compiling its warm-up sizes (minutes on a CPU) before it is ready; "
        "`ray-faceid serve` says when the API is up. A replica that cannot be placed (\"to be scheduled\") still shows",
}
# Ray-internal actors whose whole output is cleanup chatter (tracebacks included).
HARMLESS_ACTORS = {"PlacementGroupCleaner": "Ray Train's placement-group cleanup after a run ends"}

# Python warnings raised inside Ray.
HARMLESS_WARNINGS = {
    r"The minimum number of concurrent actors": "Ray Data sizing its actor pool for a small input",
}

# What torch's ONNX exporter says on every export of the UNet (warnings and its own log records).
EXPORTER_NOTICES = {
    r"torchvision is not installed": "the exporter skipping torchvision's operators; the UNet uses none of them",
    r"The axis name: .* will not be used": "torch.export merging the inputs' batch axes into one, as intended",
    r"LeafSpec": "a deprecation inside torch's own exporter (pytree), not in our code",
}
EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"


# What diffusers says when it loads a user's model folder.
MODEL_LOADING_NOTICES = {
    r"`accelerate` was not found": "diffusers recommending a package that lowers peak memory while loading; the "
    "same weights load without it (printed twice per model, 12 lines)",
    r"requires torchvision \(not installed\); falling back to": "transformers, as diffusers' pipeline classes (merge-lora "
    "saves through one) import image processors for a safety checker never run here; the fallback is equivalent",
    r"No LoRA keys associated to CLIPTextModel": "merge-lora: a LoRA of the UNet alone (as few-step LoRAs are) has "
    "nothing for the text encoders; a LoRA that changes no weight at all is refused on its own",
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropPatterns(logging.Filter):
    """Drops the records whose message matches one of `patterns` (a dict of pattern -> why)."""

    def __init__(self, patterns: dict[str, str]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.search(pattern, record.getMessage()) for pattern in self.patterns)


def _quiet_console(logger_name: str) -> None:
    """The logger's console handlers at warning level, without the harmless records (file
    handlers, such as Ray Data's full log in the session folder, keep everything)."""
    for handler in logging.getLogger(logger_name).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropPatterns) and f.patterns is HARMLESS_LOGS for f in handler.filters):
                handler.addFilter(_DropPatterns(HARMLESS_LOGS))


def model_loading() -> None:
    """Before a model folder loads: transformers' and diffusers' per-file weight-loading bars off (a
    command prints its own progress) and diffusers' known notices left out. Idempotent."""
    if verbose():
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.get_logger("diffusers")  # makes its library handlers, which the filter goes on
    transformers_logging.get_logger("transformers")
    for handler in logging.getLogger("diffusers").handlers + logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropPatterns) and f.patterns is MODEL_LOADING_NOTICES for f in handler.filters):
            handler.addFilter(_DropPatterns(MODEL_LOADING_NOTICES))


@contextlib.contextmanager
def onnx_export():
    """Around an ONNX export: the exporter's routine notices (EXPORTER_NOTICES) left out."""
    if verbose():
        yield
        return
    drop, logger = _DropPatterns(EXPORTER_NOTICES), logging.getLogger(EXPORTER_LOGGER)
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for pattern in EXPORTER_NOTICES:
                warnings.filterwarnings("ignore", message=f".*{pattern}")
            yield
    finally:
        logger.removeFilter(drop)


def before_ray_init() -> dict:
    """Settings to apply before ray.init; returns the ray.init keyword arguments for its log level."""
    if not sys.stderr.isatty():  # Ray colours each worker line's prefix even in a file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose():
        return {}
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _quiet_console("ray")
    return {"logging_level": logging.WARNING}


def train_logging():
    """RunConfig(logging_config=...) for Ray Train: its controller and workers log each report and
    checkpoint at INFO; None (Ray's default) with --verbose."""
    if verbose():
        return None
    import ray

    return ray.LoggingConfig(log_level="WARNING")


def after_ray_init() -> None:
    """Ray Data's own progress blocks repeat every few seconds off a terminal; our jobs print their
    own progress line. Worker lines Ray forwards go through the harmless-line filter."""
    if verbose():
        return
    import ray.data

    _quiet_console("ray.data")
    ray.data.DataContext.get_current().enable_progress_bars = False
    _filter_forwarded_worker_lines()


class RepeatedLines:
    """Drops a line equal to the last one shown from the same process within `window_s` (Ray Train
    workers' stderr arrives twice, at once), and says how often it came when it comes again later
    or another line follows. A line that recurs later (a worker's error once a minute) is shown
    each time. One extra copy is not counted: that is Ray's double forwarding, not the program's."""

    def __init__(self, window_s: float = 2.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._last: dict = {}  # pid -> [line, shown at, copies dropped]

    def keep(self, pid, lines: list[str]) -> list[str]:
        shown = []
        for line in lines:
            now, last = self.clock(), self._last.get(pid)
            if last is not None and last[0] == line and now - last[1] <= self.window_s:
                last[2] += 1
                continue
            if last is not None and last[2] > 1:
                shown.append(f"(the line above came {last[2] + 1} times)")
            self._last[pid] = [line, now, 0]
            shown.append(line)
        return shown


def _filter_forwarded_worker_lines() -> None:
    """Wraps Ray's printers of forwarded worker output and of cluster error messages (raylet task
    failures): the handler ray.init registers, and the module function its error listener calls.
    Both are Ray-internal: where they have moved, nothing is filtered and nothing breaks."""
    try:
        from ray._private import worker

        dispatcher = worker.global_worker_stdstream_dispatcher
        printers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
        error_printer = worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    repeated = RepeatedLines()

    def kept(data: dict) -> dict | None:
        if data.get("actor_name") in HARMLESS_ACTORS:
            return None
        lines = [line for line in data.get("lines", []) if not any(re.search(p, line) for p in HARMLESS_WORKER_LINES)]
        lines = repeated.keep(data.get("pid"), lines)
        return dict(data, lines=lines) if lines else None

    def wrap(printer):
        if getattr(printer, "ray_faceid_filtered", False):
            return printer

        def filtered(data: dict, *args, **kwargs):
            shown = kept(data)
            return None if shown is None else printer(shown, *args, **kwargs)

        filtered.ray_faceid_filtered = True
        return filtered

    worker.print_to_stdstream = wrap(error_printer)
    if len(printers) == 1 and not getattr(printers[0], "ray_faceid_filtered", False):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", wrap(printers[0]))
