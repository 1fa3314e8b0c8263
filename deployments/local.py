"""Run the application on a local Ray cluster bound to loopback (the embedded default)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import yaml

from deployments.auth import generated_token
from ray_faceid import envs, quiet
from ray_faceid.config import ServeConfig

DEFAULT_YAML = Path(__file__).with_name("serve.yaml")


def config_from_yaml(path: str | Path = DEFAULT_YAML, **overrides) -> ServeConfig:
    data = yaml.safe_load(Path(path).read_text())
    args = dict(data["applications"][0].get("args") or {})
    args.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig.model_validate(args)


def port_from_yaml(path: str | Path = DEFAULT_YAML) -> int:
    """The file's http_options.port (what `serve run` listens on), else 8000."""
    from ray_faceid.errors import BadInput

    data = yaml.safe_load(Path(path).read_text())
    options = data.get("http_options") if isinstance(data, dict) else None
    port = options.get("port", 8000) if isinstance(options, dict) else 8000 if options is None else options
    try:
        number = int(port)
    except (TypeError, ValueError):
        number = 0
    if isinstance(port, bool) or not 1 <= number <= 65535 or str(number) != str(port).strip():
        raise BadInput(f"{path}: http_options.port must be a port number 1-65535, got {port!r}; or give --port")
    return number


def web_page_available() -> bool:
    """Whether `start` serves the web page (it needs the `ui` extra)."""
    from deployments import web_page

    return web_page.available()


def check_port_free(port: int, hint: str = "--port") -> None:
    """A port another program holds is a one-line error before Ray starts (Serve's own failure is a
    long traceback, after the cluster came up). `hint`: how the caller picks another port."""
    import socket

    from ray_faceid.errors import BadInput

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise BadInput(f"port {port} on 127.0.0.1 is in use ({exc.strerror}): pick another with {hint}") from exc


_SERVING: set[int] = set()  # ports this process started Serve's proxy on: redeploying there is fine


def start(config: ServeConfig, port: int = 8000) -> tuple[str, dict[str, str]]:
    """Deploy locally; returns the base URL and the tenant tokens (one generated if none is set)."""
    from ray import serve

    from deployments.app import build_app, resolve_config
    from deployments.auth import parse_tokens
    from ray_faceid.data.cluster import init_ray
    from ray_faceid.registry_secret import keys_for

    if port not in _SERVING:
        check_port_free(port)
    keys_for(config.registry)  # a registry whose secret is missing or wrong: one line, before Ray starts
    tokens = {**parse_tokens(envs.api_tokens()), **config.api_tokens}
    if not tokens:
        tokens = {"default": generated_token()}
    config = config.model_copy(update={"api_tokens": tokens})
    resolve_config(config)  # a config Serve would refuse: one line now, not after Ray and Serve started
    # A local cluster gets a few logical CPUs more than cores: the three deployments each hold one.
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    # Quiet by default (ray_faceid/quiet.py): Serve logs every request and replica at INFO.
    logging_config = None if quiet.verbose() else {"log_level": "WARNING"}
    if logging_config:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    _SERVING.add(port)
    with starting_lines(envs.serve_wait_line_s()):  # replicas load and compile silently for minutes
        serve.run(build_app(config), name="faceid", route_prefix="/", blocking=False, logging_config=logging_config)
    return f"http://127.0.0.1:{port}", tokens


@contextlib.contextmanager
def starting_lines(every_s: float, app: str = "faceid"):
    """While the block runs, every `every_s` seconds one stderr line of what each deployment's replicas
    are doing (Serve's own slow-start warnings are left out as routine: quiet.py), so a replica that is
    stuck shows as one, and a slow one as busy."""
    from ray import serve

    done, started = threading.Event(), time.monotonic()

    def name(state) -> str:  # enums in some Ray versions, plain strings in others
        return str(getattr(state, "value", state)).lower()

    def report() -> None:
        while not done.wait(every_s):
            try:
                deployments = serve.status().applications[app].deployments
                states = "; ".join(
                    f"{deployment} {name(d.status)}"
                    + (f" ({', '.join(f'{n} {name(s)}' for s, n in d.replica_states.items())})" if d.replica_states else "")
                    for deployment, d in deployments.items())
            except Exception:  # noqa: BLE001 - not deployed yet, or the controller busy: said next time
                continue
            print(f"starting ({time.monotonic() - started:.0f} s): {states or 'deploying'}", file=sys.stderr,
                  flush=True)

    thread = threading.Thread(target=report, name="serve-starting-lines", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
