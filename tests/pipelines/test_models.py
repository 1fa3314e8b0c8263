import pytest

from ray_faceid.errors import NotFound
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
    with pytest.raises(NotFound, match="not a diffusers model folder"):
        load_base(str(tmp_path))
    with pytest.raises(NotFound, match="not 'tiny', a folder, a URI or a hub id"):
        load_base("./no/such/thing")
