"""`ray-faceid personalize` on the session's local Ray cluster, and per-identity adapters in the pipeline."""
import numpy as np
import pytest

from ray_faceid import storage
from ray_faceid.config import PersonalizeConfig
from ray_faceid.enrollment import enroll_dataset
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.personalization import load_personal
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny
from ray_faceid.registry import Registry
from ray_faceid.train.personalize import run_personalize

CONFIG = PersonalizeConfig(steps=6, size=64, lr=1e-3, workers=2, cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def shared_adapter(tmp_path_factory, small_dataset):
    import json
    from pathlib import Path

    from ray_faceid.face.spec import EncoderSpec

    spec = EncoderSpec(**json.loads(Path(small_dataset, "summary.json").read_text())["encoder_spec"])
    uri = str(tmp_path_factory.mktemp("shared_adapter"))
    IdentityAdapter.for_unet(build_tiny().unet, spec).save(uri)
    return uri


@pytest.fixture(scope="module")
def personalized_registry(tmp_path_factory, small_dataset, shared_adapter):
    """The dataset's three people, and a fourth whose reference crops went missing: one run."""
    registry = Registry(str(tmp_path_factory.mktemp("registry")))
    enrolled = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")["enrolled"]
    assert sorted(enrolled) == ["amy", "penny", "sheldon"]
    embeddings, quality, spec = registry.embeddings("default", enrolled["amy"])
    crops = registry.references("default", enrolled["amy"])
    photos = [{"index": k, "filename": f"{k}.png", "accepted": True, "reason": None} for k in range(len(crops))]
    broken = registry.create("default", "broken", "test", embeddings, quality, spec, crops, photos)["id"]
    storage.delete(storage.join(registry.store, "default", broken, "references"))
    summary = run_personalize(registry.store, shared_adapter, "tiny", CONFIG)
    return registry, enrolled, broken, summary


def test_every_identity_gets_its_own_adapter_and_a_failing_one_stops_nobody_else(personalized_registry, shared_adapter):
    registry, enrolled, broken, summary = personalized_registry
    assert sorted(summary["trained"]) == sorted(enrolled.values())  # the failing identity stopped nobody else
    assert list(summary["failed"]) == [broken] and "references/0.png" in summary["failed"][broken], summary["failed"]
    adapter_hash = IdentityAdapter.load(shared_adapter).content_hash()
    versions = set()
    for identity in enrolled.values():
        record = registry.adapter_record("default", identity, adapter_hash)
        assert record["steps"] == CONFIG.steps and record["loss_end"] < record["loss_start"]
        versions.add(record["version"])
    assert len(versions) == 3  # three people, three different adapters


def test_a_rerun_skips_finished_identities(personalized_registry, shared_adapter):
    registry, enrolled, _, _ = personalized_registry
    again = run_personalize(registry.store, shared_adapter, "tiny", CONFIG, identities=list(enrolled.values()))
    assert again["trained"] == [] and sorted(again["skipped"]) == sorted(enrolled.values())
    assert not again["failed"] and "seconds" in again


def test_a_personal_adapter_changes_the_pipeline_output(personalized_registry, shared_adapter):
    registry, enrolled, _, _ = personalized_registry
    base = build_tiny()
    adapter = IdentityAdapter.load(shared_adapter, base.unet)
    pipe = IdentityPipeline(base, adapter)
    identity = enrolled["penny"]
    embeddings, quality, _ = registry.embeddings("default", identity)
    personal = load_personal(registry, "default", identity, adapter.content_hash(), adapter)
    assert personal is not None
    shared_weights = {k: v.clone() for k, v in adapter.state_dict().items()}

    def render(personal_weights):
        condition = IdentityCondition(identity, embeddings, quality, personal=personal_weights)
        return pipe.generate("a photo of a person", [condition], seed=3, steps=3, width=32, height=32)

    from ray_faceid.identity.personalization import version_of

    plain, own = render(None), render(personal)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(own.images[0]))
    assert own.provenance[0]["identities"][0]["personal_adapter"] == version_of(personal[0])
    assert all(np.array_equal(v, adapter.state_dict()[k]) for k, v in shared_weights.items())  # shared weights restored
    assert np.array_equal(np.asarray(render(None).images[0]), np.asarray(plain.images[0]))


def test_the_cli_defaults_finish_and_an_impossible_job_fails_at_once(tmp_path, small_dataset, shared_adapter):
    import json
    import time

    from typer.testing import CliRunner

    from ray_faceid.cli import app

    registry = Registry(str(tmp_path / "registry"))
    enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")
    runner = CliRunner()
    started = time.perf_counter()
    refused = runner.invoke(app, ["personalize", "--registry", registry.store, "--adapter", shared_adapter,
                                  "--workers", "2", "--gpu"])
    assert refused.exit_code == 2 and "2 GPUs (one per worker) but the cluster has 1" in " ".join(refused.output.split())
    assert time.perf_counter() - started < 30
    started = time.perf_counter()
    # The defaults (40 steps, the base's own size) for one person, named as users name them.
    done = runner.invoke(app, ["personalize", "--registry", registry.store, "--adapter", shared_adapter,
                               "--identities", "amy", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output[done.output.index("{"):])
    assert len(summary["trained"]) == 1 and not summary["failed"]
    assert time.perf_counter() - started < 300  # the tiny base trains at its own 32 px, not 256
    # Names work where ids do; an unknown one is named, and the job exits 3 (as render does).
    named = runner.invoke(app, ["personalize", "--registry", registry.store, "--adapter", shared_adapter,
                                "--identities", "amy,nobody", "--json"])
    assert named.exit_code == 3, named.output
    summary = json.loads(named.output[named.output.index("{"):named.output.rindex("}") + 1])
    assert len(summary["skipped"]) == 1 and list(summary["failed"]) == ["nobody"]


def test_sigterm_stops_personalize_with_143(tmp_path, small_dataset, shared_adapter):
    """Schedulers stop jobs with SIGTERM: personalize exits 143 like every other command (it was 1)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    registry = Registry(str(tmp_path / "registry"))
    enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    command = [str(Path(sys.executable).parent / "ray-faceid"), "personalize", "--registry", registry.store,
               "--adapter", shared_adapter, "--steps", "5000", "--identities", "amy"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, line, seen = time.monotonic() + 240, "", ""
        while "step" not in line and time.monotonic() < deadline and job.poll() is None:
            line = job.stdout.readline()
            seen += line
        assert "step" in line, "no progress line before the deadline"
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]
    assert "personalize amy (worker 0" in seen + output  # progress names the person, not their id
