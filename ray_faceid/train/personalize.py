"""`ray-faceid personalize`: a per-identity adapter for each enrolled person, on Ray Train workers.

Each worker loads the base model and the shared adapter once and loops over its share of the
identities (no per-identity trainer start-up). After each identity every worker reports, with a
checkpoint holding the identities it has finished or failed; if the worker group restarts
(FailureConfig), finished ones are not redone. The registry is the durable record across runs:
an identity that already has an adapter for this shared adapter and these settings is skipped,
so re-running the command only does what is missing. An identity that cannot be adapted (its
references went missing, another encoder) is recorded with the reason and skipped.
"""
from __future__ import annotations

import json
import math
import os
import time

from ray_faceid import storage
from ray_faceid.config import PersonalizeConfig
from ray_faceid.errors import BadInput, BaseModelMismatch, EncoderMismatch, FaceIdError, NotFound
from ray_faceid.progress import ProgressLine, silent, to_stderr
from ray_faceid.quiet import train_logging
from ray_faceid.registry import Registry
from ray_faceid.train import runs
from ray_faceid.watchdog import Pulse, Watchdog, beat, job_report, last_beat, new_heartbeat

RUNS = ".runs"  # beside the tenants; '.' cannot start a tenant name
CAPTION = "a photo of a person"
REFERENCE_SIDE = 256  # the registry's reference crops: training above it only upsamples them


def adapt_one(base, adapter, adapter_hash: str, registry: Registry, tenant: str, identity: str,
              config: PersonalizeConfig, on_step=None, settings: str | None = None, losses=None) -> dict:
    """Adapt one identity and store the result; returns its progress record. `on_step(step, loss)`
    after each optimiser step; `settings`: what the record is keyed by beside the shared adapter
    (default: the config's hash; run_personalize adds the CLIP image encoder's or IdentityNet's weights hash);
    `losses`: the objective where it is not the UNet adapter's (FLUX)."""
    from ray_faceid.identity.personalization import adapt_identity, delta_bytes
    from ray_faceid.train.examples import reference_batch

    started = time.perf_counter()
    settings = settings or config.compute_hash()
    existing = registry.adapter_record(tenant, identity, adapter_hash, settings)
    if existing:
        return {"version": existing["version"], "skipped": True}
    embeddings, quality, spec = registry.embeddings(tenant, identity, accept=adapter.takes)
    crops = registry.references(tenant, identity)
    # FaceID-Plus: each reference crop read through CLIP as the pipeline reads an enrolled person's.
    features = None if adapter.image_encoder is None else adapter.image_encoder.enrolled_features(crops)
    per_photo = adapter.kind.per_photo  # FaceID-Portrait: each other reference its own tokens
    keypoints = adapter.kind.identitynet  # InstantID: its IdentityNet reads each target's five points
    size = config.size or min(max(base.native_size), REFERENCE_SIDE)
    n = len(crops)
    per = min(config.batch_size, n)

    def batch_at(step: int):
        return reference_batch(identity, crops, embeddings, quality, [(step * per + j) % n for j in range(per)],
                               size, CAPTION, features, per_photo, keypoints)

    eval_batch = reference_batch(identity, crops, embeddings, quality, list(range(n)), size, CAPTION, features,
                                 per_photo, keypoints)
    delta, metrics = adapt_identity(base, adapter, batch_at, eval_batch, config.steps, config.lr, config.outside_weight,
                                    config.seed, on_step, losses)
    seconds = time.perf_counter() - started
    entry = registry.add_adapter(tenant, identity, delta_bytes(delta), {
        "kind": "personal", "base_adapter": adapter_hash, "settings": settings, "references": n,
        **({"image_encoder": adapter.image_encoder.sha256} if adapter.image_encoder is not None else {}),
        **({"identitynet": adapter.identitynet.record()} if adapter.identitynet is not None else {}),
        "seconds": round(seconds, 3), **metrics,
    })
    return {"version": entry["version"], "seconds": seconds, "loss_start": metrics["loss_start"],
            "loss_end": metrics["loss_end"]}


def _restored_progress(checkpoint) -> tuple[dict, dict]:
    done, failed = {}, {}
    if checkpoint:
        with checkpoint.as_directory() as folder:
            for name in sorted(os.listdir(folder)):
                if name.startswith("progress_"):
                    with open(os.path.join(folder, name)) as fh:
                        record = json.load(fh)
                    done.update(record["done"])
                    failed.update(record["failed"])
    return done, failed


def worker_loop(loop: dict) -> None:
    """The Ray Train worker, with its pulse running (the stall report tells busy from idle)."""
    import ray.train

    with Pulse(loop.get("heartbeat"), f"worker {ray.train.get_context().get_world_rank()}"):
        _work(loop)


def _work(loop: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import load_base

    config = PersonalizeConfig(**loop["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    losses = None
    if loop["model"].family == "flux":  # ours on FLUX: its flow-matching objective (identity/flux_training.py)
        from ray_faceid.identity.flux_adapter import load_flux_adapter
        from ray_faceid.identity.flux_training import FluxAdapterObjective, base_refusal
        from ray_faceid.pipelines.flux import load_flux

        base = load_flux(loop["model"]).to(device).freeze()
        adapter = load_flux_adapter(loop["adapter"], base.transformer).to(device)
        adapter.install(base.transformer)
        refused = base_refusal(adapter.trained, base)  # every person fails with it, named, not the run
        objective = FluxAdapterObjective(base, adapter, config.outside_weight)

        def losses(batch, generator):
            return objective(batch, generator)
    else:
        refused = None
        base = load_base(loop["model"]).to(device)
        adapter = IdentityAdapter.load(loop["adapter"], base.unet)
        adapter.to(device).install(base.unet)
    if loop.get("image_encoder"):
        from ray_faceid.identity.face_plus import attach_image_encoder

        attach_image_encoder(adapter, loop["image_encoder"], device, "--image-encoder")
    if loop.get("identitynet"):
        from ray_faceid.identity.instantid import DEFAULT_SCALE, attach_identitynet_to

        attach_identitynet_to(adapter, base.unet, device, loop["identitynet"], DEFAULT_SCALE, "--identitynet")
    adapter_hash = adapter.content_hash()
    registry = Registry(loop["registry"])

    done, failed = _restored_progress(ray.train.get_checkpoint())
    todo = [i for i in loop["identities"] if i not in done and i not in failed]
    mine = todo[rank::world]
    rounds = math.ceil(len(todo) / world)
    progress = ProgressLine(f"personalize (rounds of {world} identities)", rounds, emit=to_stderr if rank == 0 else silent)
    beat(loop.get("heartbeat"), 0)  # the models are loaded
    # Every worker reports the same number of times (a report is a collective step).
    for round_ in range(rounds):
        if round_ < len(mine):
            identity = mine[round_]
            try:  # the person as people know them (ids are unguessable strings)
                who = registry.get(loop["tenant"], identity).get("name") or identity
            except FaceIdError:
                who = identity  # erased meanwhile: adapt_one fails it with the reason
            steps = ProgressLine(f"personalize {who} (worker {rank}, {round_ + 1} of {len(mine)}) steps",
                                 config.steps, emit=to_stderr)

            def on_step(step: int, loss: float, steps=steps) -> None:
                steps.update(step, loss=loss)  # at most every 10 s
                beat(loop.get("heartbeat"), round_)  # a worker inside long steps is busy, not stalled

            try:
                if refused:
                    raise BaseModelMismatch(refused)
                done[identity] = adapt_one(base, adapter, adapter_hash, registry, loop["tenant"], identity, config,
                                           on_step, loop.get("settings"), losses)
            except (FaceIdError, OSError) as exc:
                failed[identity] = getattr(exc, "message", None) or str(exc)
        fault = loop.get("fault")
        if fault and rank == world - 1 and len(done) == fault["after"] and not os.path.exists(fault["marker"]):
            open(fault["marker"], "w").close()
            os._exit(1)
        progress.update(round_ + 1, adapted=len(done), failed=len(failed))
        beat(loop.get("heartbeat"), round_ + 1)
        with runs.checkpoint_folder() as folder:
            (folder / f"progress_{rank}.json").write_text(json.dumps({"done": done, "failed": failed}))
            ray.train.report({"identities_done": len(done), "identities_failed": len(failed)},
                             checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _flux_shared_adapter(adapter: str, model, config: PersonalizeConfig, image_encoder: str | None,
                         identitynet: str | None):
    """The FLUX adapter `ray-faceid train` made, read from its file alone; what FLUX does not take is one line."""
    from ray_faceid.identity.flux_adapter import load_flux_adapter
    from ray_faceid.identity.pulid_flux import is_pulid_file
    from ray_faceid.pipelines.flux import flux_settings

    used_as_is = (f"{adapter}: personalize on FLUX adapts the adapter `ray-faceid train --model FLUX` made; a FLUX "
                  "IP-Adapter or PuLID-FLUX file is used as it is (generate, render, Serve)")
    if is_pulid_file(adapter):
        raise BadInput(used_as_is)
    shared = load_flux_adapter(adapter)
    if not shared.trained:
        raise BadInput(used_as_is)
    if image_encoder or identitynet:
        raise BadInput("--image-encoder / --identitynet: the FLUX adapter `ray-faceid train` made reads people's "
                       "identity embeddings alone: leave them out")
    multiple = flux_settings(model)["size_multiple"]
    if config.size and config.size % multiple:
        raise BadInput(f"FLUX trains on sides that are multiples of {multiple}, not --size {config.size}")
    settings = flux_settings(model)  # its widths against the base's configs, before any worker loads it
    has = (shared.width, shared.to_k_ip[0].out_features, len(shared.to_k_ip))
    wants = (settings["text_width"], settings["inner_width"], settings["dual_blocks"])
    if has != wants:
        raise BaseModelMismatch(f"{adapter}: made for a FLUX transformer of text width, inner width and dual-stream "
                                f"blocks {has}; {model.name}'s are {wants}: use one made for this base")
    return shared


def run_personalize(registry: str, adapter: str, model: str, config: PersonalizeConfig, tenant: str = "default",
                    identities: list[str] | None = None, address: str | None = None, fault: dict | None = None,
                    image_encoder: str | None = None, identitynet: str | None = None) -> dict:
    """Adapt every identity of `tenant` (or the ones named) that has no adapter for this shared
    adapter and these settings yet; returns done / skipped / failed and the throughput.
    `image_encoder`: the CLIP vision folder FaceID-Plus / PlusV2 read faces through; `identitynet`:
    InstantID's IdentityNet folder (its training steps run it beside the UNet, at its default scale)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_faceid.data.cluster import init_ray, is_local
    from ray_faceid.identity import published
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.model_ref import resolve_model
    from ray_faceid.train.placement import worker_resources

    started = time.perf_counter()
    # The workers run in another working directory: a relative path is this one's.
    registry, adapter, image_encoder, identitynet = map(storage.absolute, (registry, adapter, image_encoder,
                                                                          identitynet))
    store = Registry(registry)
    wanted = identities or [meta["id"] for meta in store.list(tenant)]
    model = resolve_model(model, flux=True)  # once: the checks below and every worker take the reference
    unet = None
    if model.family == "flux":  # ours, read without a base (FLUX.1's is 12B parameters)
        shared = _flux_shared_adapter(adapter, model, config, image_encoder, identitynet)
    else:
        IdentityAdapter.check_file_family(adapter, model.family)  # before any worker starts
        if published.is_published_file(adapter):  # its layers are named by the base: read against it
            from ray_faceid.pipelines.models import load_base

            unet = load_base(model).unet
            shared = IdentityAdapter.load(adapter, unet)
        else:
            shared = IdentityAdapter.load(adapter)
        from ray_faceid.identity.face_plus import attach_image_encoder
        from ray_faceid.identity.instantid import DEFAULT_SCALE, attach_identitynet_to

        # FaceID-Plus reads the references' crops through CLIP (the registry keeps them), InstantID runs its
        # IdentityNet beside the UNet; other kinds refuse either folder. Their weights' hashes join the
        # settings: another encoder or IdentityNet, another personal adapter.
        attach_image_encoder(shared, image_encoder, "cpu", "--image-encoder")
        attach_identitynet_to(shared, unet, "cpu", identitynet, DEFAULT_SCALE, "--identitynet")
    adapter_hash = shared.content_hash()
    settings = config.compute_hash()
    if shared.image_encoder is not None:
        settings += f"+clip:{shared.image_encoder.sha256}"
    if shared.identitynet is not None:
        settings += f"+identitynet:{shared.identitynet.sha256}@{shared.identitynet.scale:g}"
    skipped, failed, pending = [], {}, []
    for reference in wanted:  # ids or names, as everywhere else
        try:
            identity = store.resolve(tenant, reference)
            if store.adapter_record(tenant, identity, adapter_hash, settings):
                skipped.append(identity)
                continue
            store.embedding_encoder(tenant, identity, accept=shared.takes)  # here, not after Ray Train started
            pending.append(identity)
        except (NotFound, BadInput, EncoderMismatch) as exc:
            failed[reference] = exc.message
    done: dict = {}
    if pending:
        init_ray(address)
        resources = worker_resources(min(config.workers, len(pending)), config.cpus_per_worker, config.use_gpu,
                                     with_data=False, local=is_local(address))
        heartbeat = new_heartbeat()
        loop = {"config": config.model_dump(mode="json"), "model": model, "adapter": adapter, "registry": registry,
                "tenant": tenant, "identities": pending, "fault": fault, "heartbeat": heartbeat,
                "image_encoder": image_encoder, "identitynet": identitynet, "settings": settings}
        name = f"personalize_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=min(config.workers, len(pending)), use_gpu=config.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=runs.storage_path(storage.join(registry, RUNS)),
                                 failure_config=FailureConfig(max_failures=config.max_failures),
                                 **({"logging_config": train_logging()} if train_logging() else {})),
        )
        with Watchdog("personalize", config.stall_warn_s, config.stall_fail_s, last_beat(heartbeat),
                      report=job_report(heartbeat)):
            result = runs.fit(trainer)
        done, run_failed = _restored_progress(result.checkpoint)
        failed.update(run_failed)
    seconds = time.perf_counter() - started
    trained = [i for i, r in done.items() if not r.get("skipped")]
    skipped += [i for i in done if i not in trained]  # found done in the registry by a worker (after a restart)
    return {"identities": len(wanted), "trained": sorted(trained), "skipped": sorted(skipped),
            "failed": failed, "seconds": round(seconds, 2),
            "identities_per_hour": round(3600 * len(trained) / seconds, 1) if trained else 0.0,
            "per_identity": {i: r for i, r in done.items() if i in trained}}
