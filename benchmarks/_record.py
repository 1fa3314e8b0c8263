"""Shared by the benchmark scripts: describe the machine, append a result to BENCHMARKS.md."""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).parent / "BENCHMARKS.md"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def record(section: str) -> None:
    with open(BENCHMARKS_MD, "a") as fh:
        fh.write("\n" + section)


def report(lines: list[str], record_results: bool) -> str:
    """Print a result section and, unless told not to, append it to BENCHMARKS.md."""
    table = "\n".join(lines) + "\n"
    print(table)
    if record_results:
        record(table)
    return table


def photo_set_arguments(description: str) -> argparse.Namespace:
    """--faces (the labelled photo set; default ../shared/data/faces beside the checkout) and --no-record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--faces", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()
