import pytest
import torch

from ray_faceid.errors import BaseModelMismatch, NotFound
from ray_faceid.pipelines.models import build_tiny, load_base, save_base


def test_tiny_is_labelled_untrained_and_inpainting_is_detected():
    assert load_base("tiny").untrained
    assert not load_base("tiny").inpainting
    assert load_base("tiny-inpaint").inpainting


def test_folder_and_fsspec_uri_roundtrip(tmp_path, monkeypatch):
    base = build_tiny()
    save_base(base, tmp_path / "model")
    local = load_base(str(tmp_path / "model"))
    assert local.model_hash() == base.model_hash() and local.untrained
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "model") + "/", "/models/tiny/", recursive=True)
    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    remote = load_base("memory://models/tiny")
    assert remote.model_hash() == base.model_hash()


def test_unknown_models_say_what_is_accepted(tmp_path):
    from ray_faceid.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="not a diffusers model folder"):
        load_base(str(tmp_path))
    with pytest.raises(NotFound, match="not a built-in tiny base .*, a folder, a URI or a hub id") as refused:
        load_base("./no/such/thing")
    assert "did you mean" not in str(refused.value)
    with pytest.raises(NotFound, match="did you mean 'tiny-flux'"):  # a mistyped built-in name
        load_base("tiny-flx")


def test_the_hash_identifies_the_weights_not_the_config_or_the_name(tmp_path, monkeypatch, spec128):
    """Same architecture, other weights: another hash, and an adapter made for one is refused on the
    other naming both hashes. Same weights under another name or path: the same hash."""
    from ray_faceid.identity.adapter import IdentityAdapter

    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    a, b = build_tiny(seed=0), build_tiny(seed=1)
    assert a.model_hash() != b.model_hash()
    adapter = IdentityAdapter.for_unet(a.unet, spec128)
    adapter.save(str(tmp_path / "adapter"))
    IdentityAdapter.load(str(tmp_path / "adapter"), a.unet, spec128)  # its own base: accepted
    with pytest.raises(BaseModelMismatch) as refused:
        IdentityAdapter.load(str(tmp_path / "adapter"), b.unet, spec128)
    assert adapter.base_hash in refused.value.message and b.weights["unet"] in refused.value.message
    a.model_id = "renamed fine-tune"
    save_base(a, tmp_path / "one")
    save_base(a, tmp_path / "two")
    one, two = load_base(str(tmp_path / "one")), load_base(str(tmp_path / "two"))
    assert one.model_hash() == two.model_hash() == a.model_hash()
    # A weight changed on disk under the same folder and name is another model (the file cache is
    # keyed by the files' sizes and modification times, not trusted blindly).
    unet = one.unet
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    unet.save_pretrained(tmp_path / "one" / "unet")
    assert load_base(str(tmp_path / "one")).model_hash() != a.model_hash()


def test_casting_does_not_change_what_the_model_is():
    base = build_tiny()
    before = base.model_hash()
    base.to("cpu", torch.float16)
    assert base.model_hash() == before


def test_a_hub_id_without_a_network_fails_in_one_line_within_seconds(tmp_path, monkeypatch):
    import time

    from ray_faceid.errors import BackendUnavailable

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without a network
    started = time.perf_counter()
    with pytest.raises(BackendUnavailable, match="not in the local cache") as caught:
        load_base("someone/not-a-model")
    assert time.perf_counter() - started < 10 and "\n" not in str(caught.value)
