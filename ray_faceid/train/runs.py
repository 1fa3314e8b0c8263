"""Run folders and checkpoints shared by the Ray Train jobs.

A job's Ray Train state (checkpoints, the checkpoint manager's snapshot) lives under
`<out>/_runs/<name>`; Ray Train restores the latest checkpoint of a run started again with the
same name and storage path, which is what `--resume` does. The settings a run was started with
are kept beside it, so a resume with other settings is refused instead of mixing two runs.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs

from ray_faceid import storage
from ray_faceid.config import Settings
from ray_faceid.errors import BadInput

RUNS_DIR = "_runs"


def storage_path(folder: str) -> str:
    """`folder` as Ray Train's storage_path: URIs as they are, local folders made absolute."""
    return storage.absolute(folder)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem over the fsspec one (any URI storage.py reads, Ray Data and Train can use)."""
    fs, path = storage.filesystem(uri)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def prepare_run(out: str, name: str, settings: Settings, resume: bool, resume_ignores: frozenset[str] = frozenset(),
                inputs: dict[str, str | None] | None = None) -> None:
    """Refuse to start over an existing run without --resume, or to resume one with other settings
    or other inputs (`inputs`: hashes of the base model's weights, the training table, the start
    adapter)."""
    record = storage.join(out, RUNS_DIR, f"{name}.settings.json")
    current = settings.model_dump(mode="json")
    if inputs is not None:
        current["inputs"] = inputs
    if storage.exists(record):
        previous = json.loads(storage.read_bytes(record))
        if not resume:
            raise BadInput(f"{out} already holds a {name} run: pass --resume to continue it, or choose another --out")
        before = previous.pop("inputs", None) or {}
        now = current.get("inputs") or {}
        other = [f"{k} ({before.get(k)} then, {now.get(k)} now)" for k in sorted(set(before) | set(now))
                 if before.get(k) != now.get(k)]
        if other:
            raise BadInput(f"--resume of the run at {out} with other inputs: {'; '.join(other)}; resume with the "
                           "same base model, dataset and --adapter, or start a new run in another --out")
        changed = sorted(k for k in set(previous) | set(current) - {"inputs"}
                         if k not in resume_ignores | settings.hash_exclude and previous.get(k) != current.get(k))
        if changed:
            raise BadInput(f"--resume with other settings than the run at {out} ({', '.join(changed)} changed); "
                           "use the same settings, or start a new run in another --out")
    elif resume:
        raise BadInput(f"nothing to resume: no {name} run at {out}")
    storage.write_bytes(record, json.dumps(current, indent=2).encode())


@contextmanager
def checkpoint_folder():
    """A temporary local folder to write one checkpoint into before it is reported."""
    with tempfile.TemporaryDirectory(prefix="ray_faceid_ckpt_") as folder:
        yield Path(folder)


def fit(trainer):
    """`trainer.fit()`; a typed error a worker failed with ends it as that error, in one line."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        typed = worker_failure(exc)
        if typed is None:
            raise
        raise typed from None


def worker_failure(exc: Exception):
    """The typed error (errors.py) a Ray Train worker failed with, as this process's own class and
    message, or None: `ray-faceid` then says it in one line instead of Ray's traceback of every retry."""
    from ray.exceptions import RayError

    from ray_faceid import errors

    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        seen, depth = failure, 0
        while seen is not None and depth < 8:
            if isinstance(seen, errors.FaceIdError):
                # Its own class (Ray wraps it in a class deriving from both): every one takes a message.
                own = next(c for c in type(seen).__mro__ if issubclass(c, errors.FaceIdError)
                           and not issubclass(c, RayError))
                return own(f"a training worker failed: {seen.message}")
            seen, depth = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__, depth + 1
    return None

