"""An identity adapter trained on other base weights than a Serve config's model (UNet or FLUX): refused when the
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


def test_a_flux_adapter_of_other_base_weights_is_refused_when_the_config_is_read(tmp_path, monkeypatch, spec128):
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig
    from ray_faceid.identity.flux_training import new_flux_adapter, save_flux_adapter
    from ray_faceid.pipelines.flux import build_tiny_flux, load_flux, save_flux

    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    save_flux(build_tiny_flux(), tmp_path / "flux")
    other = build_tiny_flux(seed=1)
    adapter = save_flux_adapter(str(tmp_path / "ours"), new_flux_adapter(other.transformer, spec128, 0),
                                other.model_hash(), 5)
    config = ServeConfig(model=str(tmp_path / "flux"), adapter=adapter, api_tokens=TOKENS)
    resolve_config(config)  # the base never loaded on this machine: its replicas check it
    base = load_flux(str(tmp_path / "flux"))  # its weights hashes remembered
    with pytest.raises(BadInput, match="adapter: .*trained on base weights"):
        resolve_config(config)
    own = save_flux_adapter(str(tmp_path / "own"), new_flux_adapter(base.transformer, spec128, 0), base.model_hash(), 5)
    resolve_config(config.model_copy(update={"adapter": own}))  # its own base: taken
