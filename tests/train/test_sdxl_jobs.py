"""The Ray jobs on an SDXL-class base (tiny-sdxl): train the adapter (2 steps) and the IMR on it,
personalize, and render a catalog with the result; each records the SDXL base it ran on."""
import json

import pytest

from ray_faceid.config import PersonalizeConfig, RenderConfig, TrainConfig
from ray_faceid.enrollment import enroll_dataset
from ray_faceid.errors import BaseModelMismatch
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.registry import Registry
from ray_faceid.train.adapter import run_training
from ray_faceid.train.personalize import run_personalize


@pytest.fixture(scope="module")
def sdxl_adapter(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_adapter")
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, workers=1, cpus_per_worker=0.5, checkpoint_every=2)
    record = run_training(small_dataset, "tiny-sdxl", str(out), config)
    return str(out), record


def test_the_adapter_trains_on_sdxl_and_is_refused_on_another_family(sdxl_adapter, small_dataset, tmp_path):
    """(The IMR's objective shares the adapter's text conditioning, identity/objective.py.)"""
    uri, record = sdxl_adapter
    adapter = IdentityAdapter.load(uri)
    assert record["steps"] == 2 and adapter.trained_steps == 2 and adapter.family == "sdxl"
    with pytest.raises(BaseModelMismatch, match="made for an SDXL base"):  # before any worker starts
        run_training(small_dataset, "tiny", str(tmp_path / "wrong"), TrainConfig(method="imr", steps=1, workers=1,
                     cpus_per_worker=0.5), adapter=uri)


def test_personalize_and_render_on_sdxl(sdxl_adapter, small_dataset, tmp_path):
    from ray_faceid.data.render import run_render

    uri, _ = sdxl_adapter
    registry = Registry(str(tmp_path / "registry"))
    enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")
    summary = run_personalize(registry.store, uri, "tiny-sdxl", PersonalizeConfig(steps=2, workers=1,
                                                                                   cpus_per_worker=0.5),
                              identities=["amy"])
    assert summary["trained"] and not summary["failed"]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "amy-1", "identities": ["amy"], "prompt": "a portrait"}) + "\n" +
                       json.dumps({"id": "two", "identities": ["amy", "penny"], "prompt": "two people"}) + "\n")
    rendered = run_render(str(catalog), str(tmp_path / "out"), "tiny-sdxl", registry.store, adapter=uri,
                          config=RenderConfig(steps=2, workers=1))
    assert rendered["rendered"] == 2 and not rendered["errors"], rendered["errors"]
    record = json.loads((tmp_path / "out" / "images" / next(
        p.name for p in (tmp_path / "out" / "images").iterdir() if p.name.startswith("amy-1") and p.suffix == ".json")
    ).read_text())
    provenance = json.loads(record["provenance"])
    assert provenance["base_family"] == "sdxl" and provenance["identities"][0]["personal_adapter"]
