"""Helpers shared by sub-commands: typed errors become exit code 2 with their message."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import typer
from rich.console import Console

from ray_faceid.errors import FaceIdError

console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a FaceIdError into a one-line message and exit code 2, never a traceback."""
    try:
        yield
    except FaceIdError as exc:
        err_console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
        raise typer.Exit(EXIT_BAD_INPUT) from exc


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
