"""The `ray-faceid` command: one sub-command per job."""
from ray_faceid.cli.app import app

__all__ = ["app"]
