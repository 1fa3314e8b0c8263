"""`ray-faceid train`: the identity adapter on cross-training pairs, on Ray Train workers (DDP).

Ray Data reads pairs.parquet (or, for the attribute flow, the labelled faces) and gives each
worker its shard; the workers read the target crops through fsspec. Every worker takes exactly
`steps` optimiser steps, cycling over its shard, so the gradient all-reduce never waits on a
worker that ran out of data. Checkpoints (trainable weights, optimiser, scheduler, step) go to
`<out>/_runs/train`; a killed worker restarts the group from the last checkpoint (FailureConfig),
and `--resume` continues a stopped run. Rank 0 writes the result to `<out>` at the end:

- decoupled | pva: an IdentityAdapter (`IdentityAdapter.save`: encoder spec and base hash);
- imr: the identity-motion reconfigurator, trained on a frozen adapter's tokens (`--adapter`);
- flow: the attribute flow over the faces' embeddings and measured attributes;

and `training.json`: settings, steps, and a fixed-batch evaluation loss before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray_faceid import storage
from ray_faceid.config import TrainConfig
from ray_faceid.data import tables
from ray_faceid.data.pairs import IDENTITIES, PAIRS
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.model_ref import ModelRef, resolve_model
from ray_faceid.progress import ProgressLine, silent, to_stderr
from ray_faceid.quiet import train_logging
from ray_faceid.train import runs
from ray_faceid.watchdog import Pulse, Watchdog, beat, job_report, last_beat, new_heartbeat

RUN_NAME, RECORD_FILE = "train", "training.json"
EVAL_EXAMPLES = 8
FLUX_TRAIN_SIDE = 512  # the default training side on FLUX (_flux_job)
CACHED_ROWS = 100_000  # rows of a worker shard kept in memory across epochs (_cycle)
PAIR_COLUMNS = ["identity", "source_face_id", "target_face_id", "source_embedding", "target_embedding",
                "target_crop_uri", "target_crop_landmarks", "target_expression", "caption"]


@dataclass
class Job:
    """What one worker trains: the objective module, how rows become a batch, and how to save."""

    objective: Any
    trainable: Any
    batch: Callable[[list[dict]], Any]
    save: Callable[[str, dict], None]


def _adapter_job(config: TrainConfig, spec: dict, model: str, init: str | None, device, cwd: str | None) -> Job:
    import torch

    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
    from ray_faceid.identity.expression import EXPRESSION_DIM
    from ray_faceid.identity.objective import AdapterObjective
    from ray_faceid.pipelines.models import load_base
    from ray_faceid.train.examples import cross_batch

    base = load_base(model).to(device)
    encoder = EncoderSpec(**spec)
    torch.manual_seed(config.seed)  # the same initial adapter on every worker
    if init:
        adapter = IdentityAdapter.load(init, base.unet, encoder)
        if adapter.published is not None:  # its LoRA and authors' layout would not come back with what we save
            raise BadInput(f"{init}: training starts from a folder `ray-faceid train` wrote, not a published file; "
                           "personalize on top of a published adapter instead (ray-faceid personalize --adapter)")
    else:
        pva = config.method == "pva"
        options = AdapterOptions(method=config.method, mapper="multiref" if pva else "projector",
                                 num_tokens=config.num_tokens, expression_dim=0 if pva else EXPRESSION_DIM)
        adapter = IdentityAdapter.for_unet(base.unet, encoder, options)
    adapter.to(device).install(base.unet)

    def save(out: str, record: dict) -> None:
        adapter.trained_steps += record["steps_this_run"]
        adapter.save(out)

    return Job(AdapterObjective(base, adapter, config.expression_drop, config.outside_weight), adapter,
               lambda rows: cross_batch(rows, config.size or base.native_size[0], cwd), save)


def _flux_job(config: TrainConfig, spec: dict, model, device, cwd: str | None) -> Job:
    """Our identity adapter on a FLUX base (identity/flux_training.py): the transformer frozen in fp32."""
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.flux_training import FluxAdapterObjective, new_flux_adapter, save_flux_adapter
    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.train.examples import cross_batch

    base = load_flux(model).to(device).freeze()
    adapter = new_flux_adapter(base.transformer, EncoderSpec(**spec), config.seed, config.num_tokens).to(device)
    adapter.install(base.transformer)
    # FLUX makes 1024 px, but the ingest's crops are 512 px (its default) and FLUX trains at any size:
    # upsampled crops would cost 4x the compute and teach nothing more.
    size = config.size or min(base.native_size[0], FLUX_TRAIN_SIDE)
    if size % base.size_multiple:
        raise BadInput(f"FLUX trains on sides that are multiples of {base.size_multiple}, not {size}: pass --size")

    def save(out: str, record: dict) -> None:
        save_flux_adapter(out, adapter, base.model_hash(), record["steps"])

    return Job(FluxAdapterObjective(base, adapter, config.outside_weight), adapter,
               lambda rows: cross_batch(rows, size, cwd), save)


def _imr_job(config: TrainConfig, spec: dict, model: str, adapter_uri: str, device, cwd: str | None) -> Job:
    import torch

    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.identity.imr import IdentityMotionReconfigurator, save_imr
    from ray_faceid.identity.objective import ImrObjective
    from ray_faceid.pipelines.models import load_base
    from ray_faceid.train.examples import cross_batch

    base = load_base(model).to(device)
    adapter = IdentityAdapter.load(adapter_uri, base.unet, EncoderSpec(**spec))
    adapter.to(device).install(base.unet)
    adapter.requires_grad_(False)
    torch.manual_seed(config.seed)
    imr = IdentityMotionReconfigurator(token_dim=base.cross_attention_dim).to(device)
    adapter_hash = adapter.content_hash()
    return Job(ImrObjective(base, adapter, imr), imr,
               lambda rows: cross_batch(rows, config.size or base.native_size[0], cwd),
               lambda out, record: save_imr(out, imr, adapter_hash, adapter.encoder_spec.key(), {"training": record}))


def _flow_job(config: TrainConfig, spec: dict, held_out: list[str], device) -> Job:
    import numpy as np
    import torch

    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.expression import EXPRESSION_KEYS
    from ray_faceid.identity.flow import AttributeFlow, save_flow
    from ray_faceid.identity.objective import FlowObjective

    encoder = EncoderSpec(**spec)
    flow = AttributeFlow(encoder.dim, EXPRESSION_KEYS, seed=config.seed).to(device)

    def batch(rows: list[dict]):
        return (torch.tensor(np.stack([np.asarray(list(r["embedding"]), np.float32) for r in rows])),
                torch.tensor(np.stack([np.asarray(list(r["labels"]), np.float32) for r in rows])),
                torch.tensor([int(r["person"]) for r in rows]))

    return Job(FlowObjective(flow), flow, batch, lambda out, record: save_flow(
        out, flow, encoder.key(), {"training": record, "held_out_people": held_out}))


def build_job(config: TrainConfig, loop: dict, device) -> Job:
    if config.method == "flow":
        return _flow_job(config, loop["encoder_spec"], loop.get("held_out_people") or [], device)
    # Crop paths an older ingest stored relative to where it ran: the driver's folder (workers run elsewhere).
    cwd = loop.get("cwd")
    if config.method == "imr":
        return _imr_job(config, loop["encoder_spec"], loop["model"], loop["adapter"], device, cwd)
    if loop["model"].family == "flux":
        return _flux_job(config, loop["encoder_spec"], loop["model"], device, cwd)
    return _adapter_job(config, loop["encoder_spec"], loop["model"], loop["adapter"], device, cwd)


def _cycle(shard, batch_size: int, seed: int):
    """Batches of row dicts from this worker's shard, epoch after epoch. A shard of up to
    CACHED_ROWS rows (the rows are metadata and embeddings, not images) is read once and reshuffled
    each epoch in memory: re-reading it through Ray Data costs ~0.25 s per epoch, which held the
    attribute flow (a few batches per epoch) at 17 steps/s instead of 95. Larger shards stream."""
    import random

    from ray_faceid.train.examples import rows_from_columns

    cached: list[dict] = []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        rows = rows_from_columns(batch)
        if cached is not None:
            cached += rows
            if len(cached) > CACHED_ROWS:
                cached = None
        yield rows
    if cached == []:
        raise BadInput("a worker's share of the dataset is empty: use fewer --workers than examples")
    rng = random.Random(seed)
    while True:
        if cached is None:
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                yield rows_from_columns(batch)
            continue
        rng.shuffle(cached)
        for start in range(0, len(cached), batch_size):
            yield cached[start : start + batch_size]


def _fixed_loss(objective, batch, seed: int) -> float:
    """The objective on a fixed batch with fixed noise and timesteps: comparable across steps."""
    import torch

    objective.eval()
    with torch.no_grad():
        loss = float(objective(batch, torch.Generator().manual_seed(seed + 12345))["total"])
    objective.train()
    return loss


def worker_loop(loop: dict) -> None:
    """The Ray Train worker, with its pulse running (the stall report tells busy from idle)."""
    import ray.train

    with Pulse(loop.get("heartbeat"), f"worker {ray.train.get_context().get_world_rank()}"):
        _work(loop)


def _work(loop: dict) -> None:
    """One Ray Train worker. `loop['fault']` (tests only) kills the last worker once after a step."""
    import ray.train
    import ray.train.torch
    import torch

    config = TrainConfig(**loop["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    job = build_job(config, loop, device)
    model = job.objective
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(job.objective, find_unused_parameters=True)
    params = [p for p in job.trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    warmup = max(1, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    eval_batch = job.batch(loop["eval_rows"])

    step, first_step, record = 0, 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), map_location=device, weights_only=False)
        job.trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, record = state["step"], state["record"]
        first_step = record["first_step"]
        record["resumed_at"] = record.get("resumed_at", []) + [step]
    else:
        record = {"first_step": 0, "eval_loss_start": _fixed_loss(job.objective, eval_batch, config.seed)}
    heartbeat = loop.get("heartbeat")
    beat(heartbeat, step)  # the model is loaded
    batches = _cycle(ray.train.get_dataset_shard("train"), config.batch_size, config.seed + rank)
    progress = ProgressLine(f"train {config.method}", config.steps, first=step, emit=to_stderr if rank == 0 else silent)
    while step < config.steps:
        started = time.perf_counter()
        batch = job.batch(next(batches))
        losses = model(batch, torch.Generator().manual_seed(config.seed * 1_000_003 + step * 7919 + rank))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - started
        metrics = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
        metrics.update(step=step, lr=scheduler.get_last_lr()[0], examples_per_s=world * config.batch_size / seconds)
        progress.update(step, loss=metrics["loss_total"])
        beat(heartbeat, step)
        if step % config.checkpoint_every == 0 or step == config.steps:
            with runs.checkpoint_folder() as folder:
                if rank == 0:
                    torch.save({"trainable": job.trainable.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "step": step, "record": record},
                               folder / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None)
        # No report between checkpoints: each ray.train.report waits ~2 s for the controller (Ray
        # 2.60), which made every step of a small model take 2 s. Progress goes to the log instead.
        fault = loop.get("fault")
        if fault and rank == world - 1 and step == fault.get("hang_at"):
            time.sleep(3600)  # a worker that stops making progress (the watchdog's test)
        if fault and rank == world - 1 and step == fault.get("step") and not os.path.exists(fault["marker"]):
            open(fault["marker"], "w").close()
            os._exit(1)
    if rank == 0:
        end_loss = _fixed_loss(job.objective, eval_batch, config.seed)
        record.update(steps=step, steps_this_run=step - first_step, eval_loss_end=end_loss,
                      settings=config.model_dump(mode="json"), workers=world)
        job.save(loop["out"], record)
        storage.write_bytes(storage.join(loop["out"], RECORD_FILE), json.dumps(record, indent=2).encode())


def _flow_rows(dataset: str) -> tuple[list[dict], list[str]]:
    """Faces with an identity label (embedding, expression/pose labels, an integer person id) of the
    training people, and the held-out people (data/person_split.py) that eval-edits measures on."""
    from ray_faceid.data.person_split import held_out_people
    from ray_faceid.identity.expression import code_from_attributes

    identities = tables.read_table(storage.join(dataset, IDENTITIES)).to_pylist()
    held_out = held_out_people(row["identity"] for row in identities)
    person = {face: k for k, row in enumerate(identities) if row["identity"] not in held_out for face in row["face_ids"]}
    faces = tables.read_table(storage.join(dataset, tables.FACES)).to_pylist()
    rows = [{"embedding": f["embedding"], "labels": code_from_attributes(f), "person": person[f["face_id"]]}
            for f in faces if f["face_id"] in person]
    return rows, held_out


def _inputs(model: ModelRef, dataset: str, method: str, adapter: str | None) -> dict[str, str | None]:
    """What a run trains from, by content: a resume from other weights or other data is refused."""
    table = storage.join(dataset, tables.FACES if method == "flow" else PAIRS)
    return {"base model": model.fingerprint()[:16],
            "dataset": hashlib.sha256(storage.read_bytes(table)).hexdigest()[:16],
            "start adapter": storage.tree_hash(adapter)[:16] if adapter else None}


def run_training(dataset: str, model: str | ModelRef, out: str, config: TrainConfig, adapter: str | None = None,
                 resume: bool = False, address: str | None = None, fault: dict | None = None) -> dict:
    """Train on an ingest output (after `ray-faceid pairs`); returns the training record."""
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_faceid.data.cluster import init_ray, is_local
    from ray_faceid.train.placement import worker_resources

    model = resolve_model(model, flux=True)  # once: the checks below and every worker take the reference
    # The workers run in another working directory: a relative path is this one's.
    dataset, out, adapter = map(storage.absolute, (dataset, out, adapter))
    if model.family == "flux" and (config.method in ("pva", "imr") or adapter):
        raise BadInput(f"{model.name} is a FLUX model: `train` makes its identity adapter from scratch (--method "
                       "decoupled, the default, without --adapter; --resume continues a stopped run) or the attribute "
                       "flow (--method flow)")
    summary = json.loads(storage.read_bytes(storage.join(dataset, tables.SUMMARY)))
    if not summary.get("encoder_spec"):
        raise BadInput(f"{dataset}: the ingest found no faces, nothing to train on")
    if config.method == "imr" and not adapter:
        raise BadInput("--method imr trains on a trained adapter's tokens: pass --adapter URI")
    if adapter:  # a base of another family is refused here, not inside every worker
        from ray_faceid.identity import published
        from ray_faceid.identity.adapter import IdentityAdapter

        IdentityAdapter.check_file_family(adapter, model.family)
        if published.is_published_file(adapter) and (variant := published.untrainable(adapter)):
            reads = "keypoints for its IdentityNet" if "InstantID" in variant else "photos through a CLIP image encoder"
            raise BadInput(f"{adapter}: {variant} reads each face's {reads}; training rows hold embeddings: train on "
                           "an IP-Adapter-FaceID (plain) file or a folder `train` wrote")
    held_out: list[str] = []
    if config.method == "flow":
        rows, held_out = _flow_rows(dataset)
    else:
        pairs_uri = storage.join(dataset, PAIRS)
        if not storage.exists(pairs_uri):
            raise BadInput(f"{dataset} has no {PAIRS}: run `ray-faceid pairs {dataset}` first")
        rows = tables.read_table(pairs_uri).select(PAIR_COLUMNS).to_pylist()
    if len(rows) < config.workers:
        raise BadInput(f"{len(rows)} training examples for {config.workers} workers: add photos or use fewer --workers")
    init_ray(address)
    resources = worker_resources(config.workers, config.cpus_per_worker, config.use_gpu, with_data=True,
                                 local=is_local(address))
    runs.prepare_run(out, RUN_NAME, config, resume, resume_ignores=frozenset({"steps"}),
                     inputs=_inputs(model, dataset, config.method, adapter))
    if config.method == "flow":
        ds = ray.data.from_items(rows)
    else:
        fs, path = runs.arrow_filesystem(pairs_uri)
        ds = ray.data.read_parquet(path, filesystem=fs, columns=PAIR_COLUMNS)
    # Read before the workers hold their CPUs: the pairs table is metadata (paths and labels), small
    # next to the images the workers load, and a materialised dataset needs no read task later.
    ds = ds.materialize()
    heartbeat = new_heartbeat()
    loop = {"config": config.model_dump(mode="json"), "model": model, "adapter": adapter, "out": out, "cwd": os.getcwd(),
            "encoder_spec": summary["encoder_spec"], "eval_rows": rows[:EVAL_EXAMPLES], "fault": fault,
            "held_out_people": held_out, "heartbeat": heartbeat}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=runs.storage_path(storage.join(out, runs.RUNS_DIR)),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             **({"logging_config": train_logging()} if train_logging() else {})),
        datasets={"train": ds},
    )
    with Watchdog(f"train {config.method}", config.stall_warn_s, config.stall_fail_s, last_beat(heartbeat),
                  report=job_report(heartbeat)):
        result = runs.fit(trainer)
    record = json.loads(storage.read_bytes(storage.join(out, RECORD_FILE)))
    record["last_metrics"] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return record
