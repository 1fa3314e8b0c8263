"""The `ray-faceid` command: one sub-command per job."""
from ray_faceid.cli.app import app


def main() -> None:
    """The `ray-faceid` entry point: `app`, with a SIGTERM exiting 128 + 15 wherever it landed."""
    from ray_faceid.data import cluster

    try:
        app()
    except SystemExit:
        if cluster.TERMINATED_BY is not None:
            raise SystemExit(128 + cluster.TERMINATED_BY) from None
        raise


__all__ = ["app", "main"]
