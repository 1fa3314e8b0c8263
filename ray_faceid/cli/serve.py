"""`ray-faceid serve`: the Serve application on a local Ray cluster (loopback only)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ray_faceid.cli.common import console, user_errors


def web_page_line(url: str) -> str:
    """Where the web page is, or how to get it (it needs the `ui` extra)."""
    from deployments.local import web_page_available

    if not web_page_available():
        return "web page: off (pip install 'ray-faceid[ui]' and restart to serve it at /ui)"
    return f"web page: {url}/ui/ (sign in with the token above)"


def serve(
    config: Path = typer.Option(Path(__file__).resolve().parents[2] / "deployments" / "serve.yaml", "--config",
                                help="Serve YAML whose first application's args are used."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default from the YAML: tiny)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Identity adapter URI."),
    registry: Optional[str] = typer.Option(None, "--registry", help="Identity registry folder or URI."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Port on 127.0.0.1 (this command "
                                       "listens on loopback only); default: the file's http_options.port, else 8000."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="UNet runtime: auto (torch.compile on CUDA), torch, torch.compile, onnxruntime, tensorrt."),
):
    """Start the API locally, print its URL, a token and a curl example; Ctrl-C stops it."""
    from deployments.local import config_from_yaml, port_from_yaml, start

    with user_errors():
        cfg = config_from_yaml(config, model=model, adapter=adapter, registry=registry, backend=backend)
        url, tokens = start(cfg, port or port_from_yaml(config))
    tenant, token = next(iter(tokens.items()))
    console.print(f"ray_faceid API at {url} (docs: {url}/docs); tenant [bold]{tenant}[/bold] token: {token}")
    console.print(web_page_line(url), soft_wrap=True)
    console.print(f"curl -H 'Authorization: Bearer {token}' -F consent=signed-form-123 -F photos=@face.jpg "
                  f"{url}/v1/identities", soft_wrap=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopped")
