"""`ray-faceid train` on the session's local Ray cluster: 2 CPU workers, tiny components, real photos."""
import json
from pathlib import Path

import pytest
import torch

from ray_faceid import storage
from ray_faceid.config import TrainConfig
from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.train.adapter import PAIR_COLUMNS, build_job, run_training

CONFIG = TrainConfig(steps=12, batch_size=2, size=64, lr=1e-3, workers=2, cpus_per_worker=0.5, checkpoint_every=4)


@pytest.fixture(scope="module")
def killed_run(small_dataset, tmp_path_factory):
    """A 2-worker run whose last worker is killed once, right after step 6 (checkpoints every 4)."""
    out = tmp_path_factory.mktemp("adapter_run")
    marker = out.parent / f"{out.name}.killed"
    record = run_training(small_dataset, "tiny", str(out), CONFIG, fault={"step": 6, "marker": str(marker)})
    return out, marker, record


def test_two_workers_reduce_the_loss(killed_run, small_dataset):
    out, _, record = killed_run
    assert record["workers"] == 2
    assert record["eval_loss_end"] < record["eval_loss_start"]
    adapter = IdentityAdapter.load(str(out))
    summary = json.loads(Path(small_dataset, "summary.json").read_text())
    assert adapter.encoder_spec.model_dump() == summary["encoder_spec"]  # tied to the dataset's encoder
    assert adapter.trained_steps == CONFIG.steps


def test_a_killed_worker_resumes_from_the_last_checkpoint(killed_run):
    _, marker, record = killed_run
    assert marker.exists(), "the fault was never injected"
    assert record["resumed_at"] == [4]  # the checkpoint before the kill, not step 0
    assert record["steps"] == CONFIG.steps and record["last_metrics"]["step"] == CONFIG.steps


def test_resume_continues_a_stopped_run_and_refuses_other_settings(killed_run, small_dataset):
    """The continued run is `ray-faceid train --resume` with its default workers and resources on the
    suite's 2-CPU cluster: the workers leave room for the dataset's read tasks (they used to take both
    CPUs and wait for data forever, whatever the size)."""
    import time

    from typer.testing import CliRunner

    from ray_faceid.cli import app

    out, _, _ = killed_run
    with pytest.raises(BadInput, match="--resume"):
        run_training(small_dataset, "tiny", str(out), CONFIG)
    with pytest.raises(BadInput, match="lr changed"):
        run_training(small_dataset, "tiny", str(out), CONFIG.model_copy(update={"lr": 5e-4}), resume=True)
    with pytest.raises(BadInput, match="other inputs: base model"):  # other weights under the same settings
        run_training(small_dataset, "tiny-inpaint", str(out), CONFIG, resume=True)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", small_dataset, "--out", str(out), "--resume", "--steps", "14",
                                      "--size", str(CONFIG.size), "--batch-size", str(CONFIG.batch_size),
                                      "--lr", str(CONFIG.lr), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # --json: stdout holds the record alone
    assert record["steps"] == 14 and record["resumed_at"][-1] == CONFIG.steps
    assert IdentityAdapter.load(str(out)).trained_steps == 14
    assert time.perf_counter() - started < 600


def test_flow_trains_on_the_faces_table(small_dataset, tmp_path):
    from ray_faceid.identity.flow import load_flow

    config = TrainConfig(method="flow", steps=30, batch_size=8, lr=1e-3, workers=1, cpus_per_worker=0.5)
    record = run_training(small_dataset, "tiny", str(tmp_path), config)
    assert record["eval_loss_end"] < record["eval_loss_start"]
    flow = load_flow(str(tmp_path))
    x = torch.randn(3, flow.dim)
    assert torch.allclose(flow.decode(flow.encode(x)[0]), x, atol=1e-4)


def test_imr_job_needs_an_adapter_and_trains_only_the_imr(small_dataset, killed_run):
    import pyarrow.parquet as pq

    with pytest.raises(BadInput, match="--adapter"):
        run_training(small_dataset, "tiny", "unused", TrainConfig(method="imr"))
    out, _, _ = killed_run
    config = TrainConfig(method="imr", size=64, lr=1e-3)
    summary = json.loads(Path(small_dataset, "summary.json").read_text())
    job = build_job(config, {"encoder_spec": summary["encoder_spec"], "model": "tiny", "adapter": str(out)}, torch.device("cpu"))
    rows = pq.read_table(storage.join(small_dataset, "pairs.parquet")).select(PAIR_COLUMNS).slice(0, 4).to_pylist()
    batch = job.batch(rows)
    frozen = {k: v.clone() for k, v in job.objective._frozen[1].state_dict().items()}
    optimizer = torch.optim.AdamW(job.trainable.parameters(), lr=1e-3)
    losses = job.objective(batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"token", "noise", "total"}
    losses["total"].backward()
    optimizer.step()
    assert all(torch.equal(v, job.objective._frozen[1].state_dict()[k]) for k, v in frozen.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in job.trainable.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2", "--gpu"], "2 GPUs (one per worker) but the cluster has 1"),
    (["--workers", "3", "--cpus-per-worker", "1"], "3.5 CPUs (3 workers x 1 + 0.5 for the data pipeline)"),
])
def test_a_job_that_cannot_fit_fails_at_once_saying_what_to_change(small_dataset, tmp_path, flags, message):
    import time

    from typer.testing import CliRunner

    from ray_faceid.cli import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", small_dataset, "--out", str(tmp_path / "adapter"), "--steps", "2",
                                      *flags])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "--workers" in result.output
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "adapter").exists()  # nothing written for a job that never started


def test_a_dataset_ingested_to_a_relative_folder_trains_and_a_missing_crop_is_one_line(small_dataset, tmp_path,
                                                                                     monkeypatch, ray_cluster):
    """Its rows name the crops relative to where the ingest ran (ingests before they were made
    absolute); Ray Train's workers run in another folder. A crop that is gone fails the run with the
    worker's own typed error, not Ray's traceback of every retry."""
    import shutil

    import pyarrow.compute as pc

    from ray_faceid.data import tables
    from ray_faceid.data.pairs import PAIRS
    from ray_faceid.errors import NotFound

    shutil.copytree(small_dataset, tmp_path / "ds")
    table = tables.read_table(str(tmp_path / "ds" / PAIRS))
    relative = pc.replace_substring(table["target_crop_uri"], small_dataset, "ds")
    tables.write_table(str(tmp_path / "ds" / PAIRS),
                       table.set_column(table.schema.get_field_index("target_crop_uri"), "target_crop_uri", relative))
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(steps=1, batch_size=2, workers=1, cpus_per_worker=0.5, checkpoint_every=1, max_failures=0)
    assert run_training("ds", "tiny", "adapter", config)["steps"] == 1
    shutil.rmtree(tmp_path / "ds" / "crops")
    with pytest.raises(NotFound, match=f"^a training worker failed: no file at {tmp_path}/ds/crops/"):
        run_training("ds", "tiny", "again", config)


def test_a_workers_typed_error_keeps_its_class_and_code():
    """Raised in a worker (Ray wraps it in a class of both, or it is the context of another error),
    it ends the command as itself: its code and status, not a plain error."""
    from ray.exceptions import RayTaskError

    from ray_faceid.errors import NotFound
    from ray_faceid.registry_secret import RegistrySecretError
    from ray_faceid.train.runs import worker_failure

    try:
        try:
            raise RegistrySecretError("no registry secret here")
        except RegistrySecretError:
            raise RuntimeError("while reading the registry")  # noqa: B904 - the context is what is read
    except RuntimeError as outer:
        in_context = outer

    class Failed(Exception):
        pass

    for failure, kind, said in ((in_context, RegistrySecretError, "no registry secret here"),
                                (RayTaskError("step", "traceback", NotFound("no file at x")).as_instanceof_cause(),
                                 NotFound, "no file at x")):
        failed = Failed()
        failed.worker_failures = {0: failure}
        typed = worker_failure(failed)
        assert type(typed) is kind and typed.message == f"a training worker failed: {said}", typed
        assert typed.code == kind.code
