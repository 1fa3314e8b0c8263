"""`ray-faceid train` and `ray-faceid personalize`: the Ray Train jobs."""
from __future__ import annotations

from typing import Optional

import typer

from ray_faceid.cli.common import EXIT_SOME_FAILED, MODEL_HELP, StallFailOpt, StallWarnOpt, console, print_json, user_errors
from ray_faceid.cli.data import summary_table
from ray_faceid.errors import BadInput

ModelOpt = typer.Option("tiny", "--model", help=MODEL_HELP)
AddressOpt = typer.Option(None, "--address", help="Ray cluster address; default: a local cluster.")
CpusOpt = typer.Option(None, "--cpus-per-worker", min=0.01, help="CPUs per worker; default: 1, or on a local cluster "
                       "what it can spare after the data pipeline.")


def train(
    dataset: str = typer.Argument(..., help="An ingest output (folder or URI) with pairs.parquet."),
    out: str = typer.Option(..., "--out", help="Where the trained module, training.json and the run's checkpoints go."),
    model: str = ModelOpt,
    method: str = typer.Option("decoupled", "--method", help="decoupled | pva (the adapter) | imr | flow."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Start from this adapter; required for --method imr."),
    steps: int = typer.Option(1000, "--steps", min=1),
    workers: int = typer.Option(2, "--workers", min=1, help="Data-parallel Ray Train workers."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Examples per worker per step."),
    lr: float = typer.Option(1e-4, "--lr", min=0.0),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="Training resolution (target crops are resized); "
                                       "default: the model's native size (512 for SD 1.x, 32 for tiny; at most 512 on FLUX)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker."),
    cpus_per_worker: Optional[float] = CpusOpt,
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the stopped run in --out from its last checkpoint."),
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the training record as JSON."),
    stall_warn: float = StallWarnOpt,
    stall_fail: float = StallFailOpt,
):
    """Train the identity adapter (or the IMR, or the attribute flow) on Ray Train workers."""
    from ray_faceid.config import TrainConfig
    from ray_faceid.train.adapter import run_training

    with user_errors():
        config = TrainConfig(method=method, steps=steps, workers=workers, batch_size=batch_size, lr=lr, size=size,
                             use_gpu=gpu, cpus_per_worker=cpus_per_worker, checkpoint_every=checkpoint_every, seed=seed,
                             stall_warn_s=stall_warn, stall_fail_s=stall_fail)
        record = run_training(dataset, model, out, config, adapter=adapter, resume=resume, address=address)
    if as_json:
        print_json(record)
        return
    console.print(summary_table(f"train {method} -> {out}", {k: record[k] for k in (
        "steps", "steps_this_run", "workers", "eval_loss_start", "eval_loss_end")}))


ADAPTER_SOURCE = ("The shared identity adapter the per-identity ones start from: the folder "
                  "`ray-faceid train DATASET --out FOLDER` wrote (on FLUX: only that one), or a published "
                  "IP-Adapter-FaceID / InstantID .bin or .safetensors file (a path or URI).")


def personalize(
    registry: str = typer.Option("./faceid_registry", "--registry", help="Identity registry store."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=f"Required. {ADAPTER_SOURCE}"),
    model: str = ModelOpt,
    tenant: str = typer.Option("default", "--tenant"),
    identities: str = typer.Option("all", "--identities", help="all, or names or ids: NAME,ID,..."),
    steps: int = typer.Option(40, "--steps", min=1, help="Optimiser steps per identity."),
    workers: int = typer.Option(1, "--workers", min=1, help="Persistent Ray Train workers."),
    lr: float = typer.Option(1e-4, "--lr", min=0.0),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="Training resolution; default: the base's "
                                       "native size, at most 256 (the registry's reference crops)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker."),
    cpus_per_worker: Optional[float] = CpusOpt,
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json"),
    stall_warn: float = StallWarnOpt,
    stall_fail: float = StallFailOpt,
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help="FaceID-Plus / PlusV2: the CLIP image "
                                                "encoder folder (models/image_encoder of h94/IP-Adapter) the people's "
                                                "reference crops are read through."),
    identitynet: Optional[str] = typer.Option(None, "--identitynet", help="InstantID: its IdentityNet folder "
                                              "(ControlNetModel/ of InstantX/InstantID), run beside the UNet in "
                                              "every training step."),
):
    """Adapt the identity attention to each enrolled person (skips those already done)."""
    from ray_faceid.config import PersonalizeConfig
    from ray_faceid.train.personalize import run_personalize

    with user_errors():
        if adapter is None:  # not click's bare "Missing option": where one comes from
            raise BadInput(f"Missing option '--adapter'. {ADAPTER_SOURCE}")
        config = PersonalizeConfig(steps=steps, workers=workers, lr=lr, size=size, use_gpu=gpu,
                                   cpus_per_worker=cpus_per_worker, stall_warn_s=stall_warn, stall_fail_s=stall_fail)
        wanted = None if identities == "all" else [i.strip() for i in identities.split(",") if i.strip()]
        summary = run_personalize(registry, adapter, model, config, tenant, wanted, address, image_encoder=image_encoder,
                                  identitynet=identitynet)
    if as_json:
        print_json(summary)
    else:
        for identity, reason in summary["failed"].items():
            typer.echo(f"failed {identity}: {reason}", err=True)
        console.print(summary_table("personalize", {
            "identities": summary["identities"], "trained": len(summary["trained"]),
            "skipped (already adapted)": len(summary["skipped"]), "failed": len(summary["failed"]),
            "seconds": summary["seconds"], "identities per hour": summary["identities_per_hour"]}))
    if summary["failed"]:  # as render: some identities have no adapter of their own
        raise typer.Exit(EXIT_SOME_FAILED)
