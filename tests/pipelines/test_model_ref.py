"""A base named once: a model string becomes a reference at the edge of a command, from configs
alone; the checks, the fingerprint and every load below take it without another lookup; a hub id
downloads its configs to be resolved and its weights only when it loads; a worker where the driver's
copy is not resolves the name again."""
import shutil

import fsspec
import pytest

from ray_faceid.errors import NotFound
from ray_faceid.pipelines import families
from ray_faceid.pipelines.model_ref import HUB_CONFIGS, ModelRef, resolve_model
from ray_faceid.pipelines.models import build_tiny, load_base, save_base
from ray_faceid.weights_hash import folder_hash


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    base = build_tiny()
    save_base(base, folder)
    return folder, base.model_hash()


def test_a_folder_is_read_once_for_its_family_fingerprint_and_load(saved, monkeypatch):
    folder, model_hash = saved
    calls = []
    real = families.detect_family
    monkeypatch.setattr(families, "detect_family", lambda f: calls.append(f) or real(f))
    ref = resolve_model(str(folder))
    assert (ref.kind, ref.family, ref.inpainting) == ("folder", "sd1", False)
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(ref.components)
    assert resolve_model(ref) is ref and ref.fingerprint() == folder_hash(folder)
    assert load_base(ref).model_hash() == model_hash
    assert len(calls) == 1  # the configs were read once, at the edge


def test_a_hub_id_brings_its_configs_to_be_resolved_and_its_weights_when_it_loads(saved, tmp_path, monkeypatch):
    """The hub stands in as a local function (no network here): what each step asks it for is recorded."""
    import huggingface_hub

    folder, model_hash = saved
    snapshot, asked = tmp_path / "snapshot", []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **_):
        asked.append((tuple(allow_patterns), local_files_only))
        if local_files_only and not snapshot.exists():
            raise FileNotFoundError("not cached")
        if not local_files_only:  # the "download": configs only, or everything
            weights = "*/*.safetensors" in allow_patterns
            shutil.copytree(folder, snapshot, dirs_exist_ok=True,
                            ignore=None if weights else shutil.ignore_patterns("*.safetensors", "*.bin"))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ref = resolve_model("someone/tiny-model")
    assert ref.kind == "hub" and ref.family == "sd1"
    assert all(patterns == tuple(HUB_CONFIGS) for patterns, _ in asked)  # no weight was fetched to resolve it
    assert not list(snapshot.glob("unet/*.safetensors"))
    assert ref.fingerprint() == "hub:someone/tiny-model@snapshot"  # the id at the snapshot's commit
    assert load_base(ref).model_hash() == model_hash
    # the weights arrived: the fingerprint is the same (a resume or a finished render still matches)
    assert resolve_model("someone/tiny-model").fingerprint() == "hub:someone/tiny-model@snapshot"
    assert any("*/*.safetensors" in patterns and not local for patterns, local in asked)


def test_a_worker_without_the_drivers_copy_resolves_the_name_again(saved, tmp_path, monkeypatch):
    folder, model_hash = saved
    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "driver-cache"))
    fs = fsspec.filesystem("memory")
    fs.put(str(folder) + "/", "/models/ref-test/", recursive=True)
    ref = resolve_model("memory://models/ref-test")
    assert ref.kind == "uri" and ref.folder.startswith(str(tmp_path / "driver-cache"))
    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "worker-cache"))  # another machine: its own cache
    shutil.rmtree(ref.folder)
    assert load_base(ref).model_hash() == model_hash
    assert (tmp_path / "worker-cache" / "models").is_dir()
    gone = ModelRef("/no/such/folder", "folder", "/no/such/folder", "sd1", False, ())
    with pytest.raises(NotFound, match="no model folder at /no/such/folder on this machine"):
        load_base(gone)
