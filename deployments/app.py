"""build_app(args): typed args -> the bound application graph (Ingress -> FaceEncoder, Generator).

Deployment classes are plain classes; here they are wrapped with `serve.deployment`, their
options merged from defaults and the typed config. Used by `serve run/deploy` (import path
`deployments.app:build_app`, args from the YAML) and by `ray-faceid serve`. Serve's loader calls
an application builder with exactly one argument (the YAML's `args`), so it takes only that; per
deployment options (replicas, resources) go in the YAML's `deployments:` list, as Serve documents.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments import web_page
from deployments.auth import parse_tokens
from deployments.face import FaceEncoder
from deployments.generator import Generator
from deployments.ingress import Ingress, api
from ray_faceid import envs, storage
from ray_faceid.config import AutoscalingConfig, ServeConfig
from ray_faceid.errors import BadInput, FaceIdError, NotFound, UnsupportedModel
from ray_faceid.identity import published
from ray_faceid.pipelines.model_ref import TINY_FLUX, resolve_model


class IngressWithPage(Ingress):
    """The HTTP face with the web page mounted beside it, on the same service (this module composes
    the two faces; neither imports the other)."""

    def _set_asgi_app(self, app) -> None:
        """Serve hands each replica its own copy of `api` here (Ray 2.60's ASGIAppReplicaWrapper):
        the page is mounted on that copy, with this replica's service behind it."""
        web_page.mount(app, self.service)
        super()._set_asgi_app(app)


# Wrapped here, at import time, so every replica process builds the same FastAPI class-based view.
IngressApp = serve.ingress(api)(IngressWithPage)


def _options(name: str, autoscaling: AutoscalingConfig, gpus: float, max_ongoing: int, cpus: float = 1.0,
             max_queued: int = -1) -> dict:
    return {
        "name": name,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,  # -1: unbounded
        "autoscaling_config": {
            "min_replicas": autoscaling.min_replicas,
            "initial_replicas": max(1, autoscaling.min_replicas),
            "max_replicas": autoscaling.max_replicas,
            "target_ongoing_requests": autoscaling.target_ongoing_requests,
        },
        "ray_actor_options": {"num_cpus": cpus if not gpus else min(cpus, 0.5), "num_gpus": gpus},
        "health_check_period_s": 5,
    }


def model_family(model: str) -> str | None:
    """The family of a base from its configs: a tiny name, a folder or a hub id resolved (configs
    only), a URI by its model_index.json alone (resolving it would copy the whole model here). None
    where that cannot be read, or for no family we run: resolve_config or the replica says why."""
    from ray_faceid import storage
    from ray_faceid.errors import FaceIdError
    from ray_faceid.pipelines.families import FLUX_PIPELINES

    if "://" in model and not model.startswith("file://"):
        try:
            index = json.loads(storage.read_bytes(storage.join(model, "model_index.json")))
        except (FaceIdError, ValueError):
            return None
        return "flux" if isinstance(index, dict) and index.get("_class_name") in FLUX_PIPELINES else None
    try:
        return resolve_model(model, flux=True).family
    except (FaceIdError, OSError):
        return None


def resolve_flux_config(config: ServeConfig, tokens: dict) -> ServeConfig:
    """A Serve config of a FLUX base: what its Generator (flux_generator.py) does not take is one line."""
    from ray_faceid.pipelines.flux import flux_settings
    from ray_faceid.pipelines.flux_sampling import FLUX_BACKENDS, check_step_cache

    given = {"imr": config.imr, "flow": config.flow, "identitynet": config.identitynet,
             "scheduler": config.scheduler, "scheduler_config": config.scheduler_config,
             "backend": None if config.backend in ("auto", *FLUX_BACKENDS) else config.backend}
    refused = [key for key, value in given.items() if value]
    if config.backend == "onnxruntime" and (config.precision not in ("auto", "fp32")
                                            or config.flux_transformer_weights != "same"):
        raise BadInput("backend onnxruntime runs FLUX's transformer graph in fp32: set precision auto or fp32 and "
                       "flux_transformer_weights same (or backend torch / torch.compile)")
    check_step_cache(config.flux_step_cache, config.backend)
    local = "://" not in config.model or config.model.startswith("file://")  # configs only (a URI's: on the replica)
    if config.backend == "onnxruntime" and local and resolve_model(config.model, flux=True).inpainting:
        raise BadInput("backend onnxruntime: FLUX.1 Fill repaints each photo at its own size, and each size would be "
                       "a new ONNX export (minutes, the transformer's memory again) inside a request: serve Fill on "
                       "backend torch or torch.compile")
    if refused:
        raise BadInput(f"{', '.join(refused)}: not built for FLUX yet; a FLUX deployment takes adapter (a FLUX "
                       "IP-Adapter) with image_encoder (the CLIP vision folder it reads people through), backend torch, "
                       "torch.compile or onnxruntime")
    ours = None  # a FLUX adapter `ray-faceid train` made reads people's identity embeddings, no image encoder
    if config.adapter:
        from ray_faceid.identity.flux_adapter import trained_encoder

        ours = trained_encoder(config.adapter)
    if ours is not None and local:
        _check_flux_adapter_base(config.adapter, config.model)
    if ours is not None and config.image_encoder:
        raise BadInput("image_encoder: this FLUX adapter (made by `ray-faceid train`) reads people's identity "
                       "embeddings; leave image_encoder out")
    from ray_faceid.identity.pulid_flux import is_pulid_file

    pulid = is_pulid_file(config.adapter)  # reads people through its own encoders (identity/pulid_faces.py)
    if pulid:  # its file, encoders and face stack read when the config is, not by every replica in a loop
        from ray_faceid.identity.pulid_faces import check_encoder_folder, check_face_stack
        from ray_faceid.identity.pulid_flux import check_pulid_file

        check_face_stack(config.face)
        try:
            check_encoder_folder(config.image_encoder)
        except UnsupportedModel as wrong:
            raise BadInput(f"image_encoder: {wrong.message}") from None
        try:
            check_pulid_file(config.adapter, flux_settings(resolve_model(config.model, flux=True))["inner_width"]
                             if local else None)
        except UnsupportedModel as wrong:
            raise BadInput(f"adapter: {wrong.message}") from None
    if not config.adapter or (not pulid and ours is None and not config.image_encoder):  # the API renders people
        raise BadInput("a FLUX deployment renders people through a FLUX IP-Adapter, which reads each person's reference "
                       "crops through a CLIP image encoder: set both adapter and image_encoder, or adapter to the "
                       "folder `ray-faceid train --model FLUX` wrote (prompts alone: `ray-faceid generate --model "
                       "FLUX_FOLDER`)")
    if config.adapter and not pulid:  # the file read once, before any replica (they would fail on it in a loop)
        from ray_faceid.identity.flux_adapter import check_flux_adapter_file

        try:
            check_flux_adapter_file(config.adapter)
        except (NotFound, UnsupportedModel) as wrong:
            raise BadInput(f"adapter: {wrong.message}") from None
    if config.guidance and local:  # 0 is none
        if not flux_settings(resolve_model(config.model, flux=True))["guidance_embedded"]:
            raise BadInput("guidance: FLUX.1 schnell takes no guidance: leave it out")
    if config.image_encoder and not pulid:
        from ray_faceid.face.clip_image import check_folder

        try:
            check_folder(config.image_encoder)
        except NotFound as missing:
            raise BadInput(f"image_encoder: {missing.message}") from None
    check_flux_memory(config)
    return config.model_copy(update={"api_tokens": tokens})


def check_flux_memory(config: ServeConfig) -> None:
    """With generator_gpu_memory_gb, a FLUX model that does not fit one replica's GPU is one line
    when the config is read (a local folder's safetensors headers give its sizes)."""
    if config.generator_gpu_memory_gb is None:
        return
    if not config.generator_gpus:
        raise BadInput("generator_gpu_memory_gb is the memory of the GPU a Generator replica runs on: set "
                       "generator_gpus too (1 on GPU workers)")
    import torch

    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.flux_sampling import resolve_flux_precision

    ref = resolve_model(config.model, flux=True)
    if ref.kind not in ("folder", "tiny"):
        return  # its weights are not here: the replica checks its size before it loads
    from ray_faceid.pipelines.generate import parse_size

    plan = flux_memory.replica_plan(
        ref, resolve_flux_precision(config.precision, torch.device("cuda"), config.backend), config.flux_text_encoders,
        config.flux_transformer_weights, config.generator_batch_size * config.limits.max_images,
        [parse_size(size, "warm_up_sizes") for size in config.warm_up_sizes], config.adapter, config.image_encoder,
        bool(config.flux_step_cache), config.backend)
    # A fractional replica shares its GPU: it may count on its share of the memory only.
    share = config.generator_gpu_memory_gb * 1e9 * min(1.0, config.generator_gpus)
    flux_memory.check_fits(plan, int(share), f"generator_gpu_memory_gb {config.generator_gpu_memory_gb:g} x "
                                             f"generator_gpus {config.generator_gpus:g}")


def smoke_base(model: str) -> bool | None:
    """Whether a base is a tiny untrained one (built in, or saved by us and marked so), which runs its
    seeded adapter; None where its model_index.json cannot be read here (the replica says why). A hub
    id names a published base."""
    from ray_faceid import storage
    from ray_faceid.errors import FaceIdError
    from ray_faceid.pipelines.model_ref import TINY

    if model in TINY:
        return True
    remote = "://" in model and not model.startswith("file://")
    folder = Path(model.removeprefix("file://"))
    if not remote and not folder.is_dir():
        return False
    try:
        raw = storage.read_bytes(storage.join(model, "model_index.json")) if remote else \
            (folder / "model_index.json").read_bytes()
        index = json.loads(raw)
    except (FaceIdError, OSError, ValueError):
        return None
    return isinstance(index, dict) and bool(index.get("_ray_faceid_untrained"))


def _check_adapter_base(adapter: str, unet_folder: Path) -> None:
    """An adapter `ray-faceid train` made, against the base's UNet weights where this machine has
    hashed them before (a command that loaded the base): every replica would refuse it, in a loop.
    Not hashed yet: the replicas check it (hashing here would load the UNet in the driver)."""
    from ray_faceid.identity.adapter import CONFIG_FILE
    from ray_faceid.weights_hash import remembered_hash

    base = remembered_hash(unet_folder)
    try:
        made_for = json.loads(storage.read_bytes(storage.join(adapter, CONFIG_FILE))).get("base_unet_hash")
    except (FaceIdError, ValueError, AttributeError):
        return  # not ours, or unreadable: the replica's load says why
    if base and made_for and base != made_for:
        raise BadInput(f"adapter: {adapter} was trained for the base UNet with weights hash {made_for}; {unet_folder} "
                       f"has weights hash {base}: give the base it was trained on, or train one for this base")


def _check_flux_adapter_base(adapter: str, model: str) -> None:
    """_check_adapter_base for a FLUX adapter `ray-faceid train` made: against the local folder's model
    hash where this machine has hashed its weights before (tokenizers and scheduler read, no weights)."""
    from ray_faceid.identity.flux_adapter import trained_record
    from ray_faceid.pipelines.flux import remembered_model_hash

    ref = resolve_model(model, flux=True)
    made = trained_record(adapter)
    base = remembered_model_hash(ref.folder) if ref.folder else None
    if made and base and base != made["base_model_hash"]:
        raise BadInput(f"adapter: {adapter} was trained on base weights {made['base_model_hash']}; {model} is {base}: "
                       "give the base it was trained on, or train one for this base")


def resolve_config(args: dict | ServeConfig) -> ServeConfig:
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    tokens = {**parse_tokens(envs.api_tokens()), **config.api_tokens}
    if not tokens:
        raise BadInput("no API token: set api_tokens in the config or RAY_FACEID_API_TOKENS=tenant:token "
                       "(`ray-faceid serve` generates one); the API never runs open")
    if config.scheduler or config.scheduler_config:  # a bad name or setting: one line, before any replica starts
        from ray_faceid.pipelines.schedulers import Sampler

        Sampler.parse(config.scheduler, config.scheduler_config, where="scheduler")
    unet_config = None  # of a local base: what the IdentityNet is checked against
    if model_family(config.model) == "flux":
        return resolve_flux_config(config, tokens)
    flux_only = [name for name, value, default in (("flux_text_encoders", config.flux_text_encoders, "same"),
                                                   ("flux_transformer_weights", config.flux_transformer_weights, "same"),
                                                   ("flux_step_cache", config.flux_step_cache, 0.0),
                                                   ("generator_gpu_memory_gb", config.generator_gpu_memory_gb, None))
                 if value != default]
    if flux_only:
        raise BadInput(f"{', '.join(flux_only)}: for FLUX models; {config.model} is not one")
    if config.model in TINY_FLUX or Path(config.model).is_dir():  # configs only (a URI or hub id: on the replica)
        try:
            ref = resolve_model(config.model)
        except (NotFound, UnsupportedModel) as wrong:  # the replicas would fail on it in a loop
            raise BadInput(f"model: {wrong.message}") from None
        if ref.folder:
            unet_config = json.loads((Path(ref.folder) / "unet" / "config.json").read_text())
    if not config.adapter and smoke_base(config.model) is False:  # every request names people: it would serve nothing
        from ray_faceid.identity.adapter import NO_ADAPTER

        raise BadInput(NO_ADAPTER.format(model=config.model) + "; every generate request names people, so this "
                       "deployment would refuse them all (to enroll people first: `ray-faceid identities enroll`)")
    found = published.describe(config.adapter) if config.adapter else None  # the file read once, before any replica
    if config.adapter and found is None and unet_config is not None:
        _check_adapter_base(config.adapter, Path(ref.folder) / "unet")
    instantid = found is not None and found.instantid
    if instantid and config.backend == "tensorrt":
        raise BadInput(f"adapter {config.adapter}: InstantID's IdentityNet runs with the UNet, which TensorRT plans "
                       "do not take yet: set backend torch, torch.compile or onnxruntime")
    if bool(config.identitynet) != instantid:
        raise BadInput(f"adapter {config.adapter}: InstantID reads the face through its IdentityNet too: set identitynet "
                       "to its folder (ControlNetModel/ of InstantX/InstantID)" if instantid else
                       "identitynet is for InstantID's ip-adapter.bin; this adapter has no IdentityNet")
    if config.identitynet:
        from ray_faceid.identity.instantid import identitynet_config

        try:
            identitynet_config(config.identitynet, unet_config)
        except (NotFound, UnsupportedModel) as wrong:  # the replicas would fail on it in a loop
            raise BadInput(f"identitynet: {wrong.message}") from None
    if config.warm_up_photos != [1] and not (found is not None and found.per_photo):
        raise BadInput("warm_up_photos is for FaceID-Portrait files (each photo its own tokens); this adapter fuses a "
                       "person's photos into one set of tokens: leave it out")
    if found is not None and found.per_photo and config.backend == "tensorrt":
        raise BadInput(f"adapter {config.adapter}: {found.variant} gives each photo of a person its own tokens, as "
                       "many as they have; a TensorRT plan holds one set: set backend torch, torch.compile or "
                       "onnxruntime")
    plus = found.variant if found is not None and found.plus else None
    if plus and not config.image_encoder:
        raise BadInput(f"adapter {config.adapter}: {plus} reads faces through a CLIP image encoder too: set "
                       "image_encoder to its folder (models/image_encoder of h94/IP-Adapter)")
    if config.image_encoder and not plus:
        raise BadInput("image_encoder is for IP-Adapter-FaceID-Plus / PlusV2 files; this adapter reads embeddings only")
    if config.image_encoder:
        from ray_faceid.face.clip_image import check_folder

        try:
            check_folder(config.image_encoder)
        except NotFound as missing:  # the replicas would fail on it in a loop
            raise BadInput(f"image_encoder: {missing.message}") from None
    return config.model_copy(update={"api_tokens": tokens})


def ingress_scaling(config: ServeConfig) -> AutoscalingConfig:
    """The Ingress's replicas: exactly one while it serves the web page. Gradio keeps a browser's
    uploads and queue in the replica that took them, and Serve's proxy has no session affinity."""
    scaling = config.ingress_autoscaling
    if config.web_page and web_page.available() and (scaling.min_replicas, scaling.max_replicas) != (1, 1):
        logging.getLogger("ray.serve").warning(
            "the web page (/ui) keeps its sessions in one Ingress replica: the Ingress runs 1 replica "
            "(web_page: false scales it as ingress_autoscaling says)")
        scaling = scaling.model_copy(update={"min_replicas": 1, "max_replicas": 1})
    return scaling


class ServeConfigRefused(BadInput, RayServeException):
    """A config the application cannot be built from. Serve's build task returns a
    RayServeException's message as the application's status, once; any other exception it retries
    three times, logging each traceback, while `serve run` waits."""


def build_app(args: dict | ServeConfig):
    try:
        config = resolve_config(args)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        raise ServeConfigRefused(f"ray_faceid's Serve config is not valid: {problems}") from None
    except BadInput as error:
        raise ServeConfigRefused(f"ray_faceid's Serve config is not valid: {error}") from None
    blob = config.model_dump_json()
    face = serve.deployment(FaceEncoder).options(**_options(
        "FaceEncoder", config.encoder_autoscaling, config.encoder_gpus, 2 * config.encoder_batch_size)).bind(blob)
    generator_class = Generator
    if model_family(config.model) == "flux":
        from deployments.flux_generator import FluxServeGenerator as generator_class
    generator = serve.deployment(generator_class).options(**_options(
        "Generator", config.generator_autoscaling, config.generator_gpus, 2 * config.generator_batch_size,
        max_queued=config.limits.generator_max_queued)).bind(blob)
    ingress = serve.deployment(IngressApp).options(**_options(
        # The ingress only routes and validates: it reserves no CPU from the model replicas.
        "Ingress", ingress_scaling(config), 0.0, 64, cpus=0.0)).bind(face, generator, blob)
    return ingress
