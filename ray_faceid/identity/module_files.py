"""Save and load a small trained module (IMR, attribute flow) as safetensors + a JSON config."""
from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ray_faceid import storage
from ray_faceid.errors import BadInput, NotFound

WEIGHTS_FILE, CONFIG_FILE = "weights.safetensors", "config.json"


def save_module(uri: str, module: torch.nn.Module, config: dict) -> None:
    state = {k: t.detach().cpu().contiguous() for k, t in module.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(state))
    # config last: a folder with a config is complete.
    storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(config, indent=2).encode())


def load_module_files(uri: str, kind: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """The config, the weights and their hash ("sha256:..." of the weights file: what provenance
    names the module by) saved at `uri`; refuses a folder holding another kind of module."""
    try:
        config = json.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)))
    except NotFound as exc:
        raise NotFound(f"no trained {kind} at {uri} (missing {CONFIG_FILE})") from exc
    if config.get("kind") != kind:
        raise BadInput(f"{uri} holds a {config.get('kind', 'unknown')!r} module, not a {kind!r}")
    weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    return config, load_safetensors(weights), "sha256:" + hashlib.sha256(weights).hexdigest()
