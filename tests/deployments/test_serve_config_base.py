"""An identity adapter trained on other base weights than a Serve config's model: refused when the
config is read, where this machine has hashed that base's weights before (any earlier command that
loaded it), not by every replica in a loop."""
import json

import pytest

from ray_faceid.errors import BadInput

TOKENS = {"acme": "acme-token-0123456789abcdef"}


def test_an_adapter_of_other_base_weights_is_refused_when_the_config_is_read(tmp_path, monkeypatch):
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import build_tiny, load_base, save_base

    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    save_base(build_tiny(seed=1), tmp_path / "base")
    spec = EncoderSpec(name="dlib_resnet", dim=128, version="v1", license="-", metric="euclidean", threshold=0.6)
    IdentityAdapter.for_unet(build_tiny().unet, spec).save(str(tmp_path / "adapter"))  # of the seed-0 weights
    config = ServeConfig(model=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), api_tokens=TOKENS)
    resolve_config(config)  # the base never loaded on this machine: its replicas check it
    load_base(str(tmp_path / "base"))  # e.g. a `generate` on it: its weights hash is remembered
    with pytest.raises(BadInput, match="adapter: .*trained for the base UNet with weights hash"):
        resolve_config(config)
    made_for = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    IdentityAdapter.for_unet(load_base(str(tmp_path / "base")).unet, spec).save(str(tmp_path / "own"))
    resolve_config(config.model_copy(update={"adapter": str(tmp_path / "own")}))  # its own base: taken
    assert made_for["base_unet_hash"]
