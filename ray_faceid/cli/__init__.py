"""The `ray-faceid` command: one sub-command per job."""
import sys

from ray_faceid.cli.app import app


def main() -> None:
    """The `ray-faceid` entry point: `app`, with a SIGTERM exiting 128 + 15 wherever it landed, and
    Ctrl-C (130) saying so."""
    from ray_faceid.data import cluster

    try:
        app()
    except SystemExit as stopped:
        if cluster.TERMINATED_BY is not None:
            raise SystemExit(128 + cluster.TERMINATED_BY) from None
        if stopped.code == 130:  # Typer turns Ctrl-C into a silent exit 130
            print("interrupted (Ctrl-C): stopped before finishing; a job run again with the same arguments "
                  "continues where it can (ingest --resume, render and personalize skip what is done)",
                  file=sys.stderr)
        raise


__all__ = ["app", "main"]
