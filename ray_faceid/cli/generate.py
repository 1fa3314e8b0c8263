"""`ray-faceid generate` and `ray-faceid inpaint`: one image from the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ray_faceid.cli.common import (
    MODEL_HELP,
    BackendOpt,
    FluxTextEncodersOpt,
    FluxTransformerWeightsOpt,
    IdentityNetOpt,
    IdentityNetScaleOpt,
    ImageEncoderOpt,
    PngOutOpt,
    StepCacheOpt,
    console,
    err_console,
    identitynet_scale_of,
    user_errors,
    with_strengths,
)
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.schedulers import Sampler
from ray_faceid.progress import denoise_reporter

ModelOpt = typer.Option("tiny", "--model", help=MODEL_HELP)
AdapterOpt = typer.Option(None, "--adapter", help="Identity adapter: a folder `ray-faceid train` wrote (on FLUX too), "
                          "or a published IP-Adapter-FaceID / InstantID .bin / .safetensors (a FLUX base: the XLabs "
                          "FLUX IP-Adapter or PuLID-FLUX's file); "
                          "without it only the tiny smoke-test base runs (with its seeded, untrained adapter).")
SchedulerOpt = typer.Option(None, "--scheduler", help="Sampler: the model's own by default; ddim, pndm, euler, "
                            "euler-a, heun, dpm++2m, dpm++2m-karras, dpm++2m-sde-karras, unipc, lcm, tcd, or a "
                            "diffusers scheduler class name.")
SchedulerConfigOpt = typer.Option([], "--scheduler-config", help="KEY=VALUE of the scheduler's config, e.g. "
                                  "timestep_spacing=trailing or use_karras_sigmas=true; repeat for more.")
StepsOpt = typer.Option(None, "--steps", min=1, max=200, help="Denoising steps; default: the model's own (30, 4 "
                        "for an untrained smoke base, or what merge-lora --steps recorded).")
GuidanceOpt = typer.Option(None, "--guidance", min=0.0, max=30.0, help="Classifier-free guidance; default: the "
                           "model's own (5, or what merge-lora --guidance recorded; FLUX.1 dev 3.5, Fill 30, schnell "
                           "none).")
RegistryOpt = typer.Option("./faceid_registry", "--registry", help="Identity registry for enrolled people.")
TenantOpt = typer.Option("default", "--tenant", help="Tenant whose people --identity names.")
ImrOpt = typer.Option(None, "--imr", help="Trained IMR (train --method imr): --expression then moves the identity "
                      "tokens to that expression and pose.")
FlowOpt = typer.Option(None, "--flow", help="Trained attribute flow (train --method flow), for --edit.")
FaceBackendOpt = typer.Option("dlib", "--face-backend", help="Face encoder of --ref / --identity photos: dlib "
                              "(default) or insightface (ArcFace, what IP-Adapter-FaceID and InstantID take; needs "
                              "--insightface-root, a pack you are licensed to use).")
InsightfaceRootOpt = typer.Option(None, "--insightface-root", help="Folder of an insightface pack (buffalo_l: "
                                  "det_10g.onnx, w600k_r50.onnx for FaceID; antelopev2 for InstantID and PuLID-FLUX).")
FaceEmbeddingOpt = typer.Option(None, "--face-embedding", help="One person's embeddings as an .npy (N x D, as the "
                                "adapter's encoder gives them; PuLID-FLUX: its N x 32 x 2048 ID tokens) instead of "
                                "photos.")
EditOpt = typer.Option(None, "--edit", help="Attribute targets through the flow, e.g. 'smile=0.8,yaw=-20' "
                       "(smile, mouth_open, eyes_open 0..1; yaw -90..90, pitch -60..60 degrees).")


def parse_edit_option(text: Optional[str]) -> Optional[dict]:
    """--edit's value, checked before any model loads (the flow re-checks its own attribute list)."""
    from ray_faceid.identity.edits import check_edits, parse_edits

    return check_edits(parse_edits(text)) if text else None


def _pipeline(analyzer, model, adapter_uri: Optional[str], backend: str = "torch", imr: Optional[str] = None,
              flow: Optional[str] = None, spec="analyzer", plus_v2_scale: Optional[float] = None):
    """The pipeline, loaded after the reference photos were checked: a bad photo fails in a second."""
    from ray_faceid.engines.select import require_backend
    from ray_faceid.identity.adapter import NO_ADAPTER, shared_adapter
    from ray_faceid.pipelines.generate import IdentityPipeline
    from ray_faceid.pipelines.models import load_base

    require_backend(backend)  # a missing runtime fails before the model loads
    base = load_base(model)
    # `spec`: the encoder the identities' embeddings come from (None: given as --face-embedding, checked by width).
    adapter = shared_adapter(adapter_uri, base, analyzer.spec if spec == "analyzer" or not adapter_uri else spec,
                             plus_v2_scale)
    if adapter is None:
        raise BadInput(NO_ADAPTER.format(model=base.model_id))
    if not adapter_uri:
        err_console.print("[yellow]no --adapter: the smoke-test base's untrained identity adapter (seeded); identity "
                          "will not be preserved[/yellow]")
    if base.untrained:
        err_console.print(f"[yellow]{base.model_id}: untrained base model, images are noise-like (smoke run)[/yellow]")
    import torch

    from ray_faceid.pipelines.edit_modules import load_edit_modules

    imr_module, flow_module = load_edit_modules(adapter, imr, flow)  # before the pipeline casts the adapter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return IdentityPipeline(base, adapter, imr_module, device=device, backend=backend, precision="auto",
                            flow=flow_module)


def _parse_named(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise BadInput(f"{what} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


STRENGTH_MAX = 4.0  # as a catalog row's scale
StrengthOpt = typer.Option([], "--strength", help="Identity strength, 0 to 4 (default 1; 0: the image without the "
                           "person): S for everyone, or NAME=S per person (--ref's person is 'person'). An "
                           "IP-Adapter's scale, PuLID-FLUX's id_weight.")


IdentityStartOpt = typer.Option(0, "--identity-start", min=0, max=199, help="The denoising step (from 0) at which "
                                "the people's identity starts; earlier steps run without it. Later: less likeness, "
                                "more of the prompt (PuLID-FLUX's start_step: its authors suggest 4 for photographs, "
                                "0-1 for stylised images). Default 0.")


def _strengths(items: list[str], people: dict, identity_start: int = 0, steps: int | None = None) -> dict[str, float]:
    """--strength values by person's name (a bare number: everyone not named, in any order), checked
    before any model loads; with --identity-start, that there is someone for both to act on, and a
    step of --steps where they are given (else the model's, checked when it has loaded)."""
    if steps:
        from ray_faceid.pipelines.generate import check_start

        check_start(identity_start, steps)
    if not people and (items or identity_start):
        flags = " and ".join(f for f, given in (("--strength", items), ("--identity-start", identity_start)) if given)
        raise BadInput(f"{flags}: for the people in the image, and there are none: give --ref PHOTO, --identity NAME "
                       "or --face-embedding EMB.npy")
    named: dict[str, float] = {}  # "" holds the bare S
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            strength = float(value)
        except ValueError:
            strength = None
        if strength is None or (sep and not name):
            raise BadInput(f"--strength {item!r}: expected S or NAME=S, S a number from 0 to {STRENGTH_MAX:g}")
        if not 0 <= strength <= STRENGTH_MAX:
            raise BadInput(f"--strength {item!r}: S is from 0 to {STRENGTH_MAX:g}")
        if name and name not in people:
            raise BadInput(f"--strength for unknown identity {name!r}; identities: {sorted(people)}")
        if name in named:
            raise BadInput(f"--strength {'for ' + name if name else 'S'} given twice ({named[name]:g} and {strength:g}): "
                           "give each person's once")
        named[name] = strength
    everyone = {person: named[""] for person in people} if "" in named else {}
    return {**everyone, **{k: v for k, v in named.items() if k}}


def _people(ref: list[str], identity: list[str]) -> dict[str, str | list[str]]:
    """name -> reference photos, or -> an enrolled person's id or name (a value without '=')."""
    if ref and identity:
        raise BadInput("use either --ref (one person's photos) or --identity (several people), not both")
    people: dict[str, str | list[str]] = {"person": list(ref)} if ref else {}
    for item in identity:
        name, sep, images = item.partition("=")
        if name in people:  # (without '=', name is the whole item: an enrolled person)
            raise BadInput(f"--identity {name} given twice: give each person once (their photos "
                           "together, as NAME=a.jpg,b.jpg)")
        if not sep:
            people[item] = item  # an enrolled person
        elif not name or not images:
            raise BadInput(f"--identity {item!r}: expected NAME=IMG[,IMG...] or an enrolled person's name or id")
        else:
            people[name] = images.split(",")
    return people


PHOTOS_BESIDE = "FaceID-Plus's CLIP image encoder (--image-encoder) or InstantID's pose (--identitynet)"


def _people_and_photos(ref: list[str], identity: list[str], face_embedding: Optional[str],
                       reads_photos: bool, tokens: bool = False, readers: str = PHOTOS_BESIDE) -> tuple[dict, dict]:
    """(people, photos): name -> photos, an enrolled name, or --face-embedding's array; and name -> the
    photos an adapter reads beside the embedding (`reads_photos`: `readers` do), which with
    --face-embedding are the --ref photos."""
    if face_embedding and identity:
        raise BadInput("use either --face-embedding or --identity (enrolled people or photos), not both")
    if face_embedding and ref and not reads_photos:
        raise BadInput(f"--face-embedding with --ref: photos beside an embedding are read only by {readers}; "
                       "otherwise give the embedding or the photos, not both")
    people = {"person": read_face_embedding(face_embedding, tokens)} if face_embedding else _people(ref, identity)
    return people, ({"person": list(ref)} if face_embedding and ref else people)


def _analyzer(face_backend: str, insightface_root: Optional[str], face_embedding: Optional[str]):
    """The face stack that reads the photos (with --face-embedding, dlib: it only finds faces for CLIP
    or a pose, the embedding is given); every face, so a photo of several people is refused."""
    from ray_faceid.cli.faces import face_config, face_stack
    from ray_faceid.face.analyzer import FaceAnalyzer

    backend = face_stack(face_backend, insightface_root, needs_pack=not face_embedding)
    return FaceAnalyzer(face_config("dlib" if face_embedding else backend, insightface_root, True, "all"))


def _conditions_and_pipeline(analyzer, people: dict, registry: str, tenant: str, regions: dict, expression, edits,
                             model, adapter: Optional[str], backend: str, imr: Optional[str], flow: Optional[str],
                             spec="analyzer", plus_v2_scale: Optional[float] = None):
    """(conditions, {name: id} of the enrolled, pipeline). Photos are checked before the model loads (a bad
    photo fails in a second). Enrolled people alone with a published file: each person's stored
    embeddings the file takes (any ArcFace of its width, e.g. added by `identities embed
    --recognizer-onnx`), whatever face stack this command would read photos with."""
    from ray_faceid.identity import published
    from ray_faceid.registry import Registry

    if people and all(isinstance(v, str) for v in people.values()) and adapter and published.is_published_file(adapter):
        store = Registry(registry).require()
        for source in people.values():
            store.resolve(tenant, source)  # an unknown name fails before the model loads
        pipe = _pipeline(analyzer, model, adapter, backend, imr, flow, spec=None, plus_v2_scale=plus_v2_scale)
        conditions, enrolled = _conditions(analyzer, people, registry, tenant, regions, expression, edits,
                                           accept=pipe.adapter.takes)
        return conditions, enrolled, pipe
    conditions, enrolled = _conditions(analyzer, people, registry, tenant, regions, expression, edits)
    return conditions, enrolled, _pipeline(analyzer, model, adapter, backend, imr, flow, spec, plus_v2_scale)


def _conditions(analyzer, people: dict, registry: str, tenant: str, regions: dict, expression, edits, accept=None):
    """IdentityConditions from photos (checked now, before any model loads) or from the registry,
    and {name: id} of the enrolled ones. `accept`: the enrolled people's embeddings of the first encoder
    it accepts (an adapter's `takes`), else the analyzer's."""
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.pipelines.references import embed_references
    from ray_faceid.registry import Registry

    store = Registry(registry).require() if any(isinstance(v, str) for v in people.values()) else None
    conditions, enrolled = [], {}
    for name, source in people.items():
        if isinstance(source, np.ndarray):  # --face-embedding: embedded elsewhere
            emb, quality, encoder = source, None, None
        elif isinstance(source, str):
            enrolled[name] = store.resolve(tenant, source)
            emb, quality, spec = store.embeddings(tenant, enrolled[name], None if accept else analyzer.spec, accept)
            encoder = spec.key()
        else:
            (emb, quality), encoder = embed_references(analyzer, source), analyzer.spec.key()
        conditions.append(IdentityCondition(name, emb, quality, regions.get(name), expression, edits=edits,
                                            id=enrolled.get(name), encoder=encoder))
    return conditions, enrolled


def _with_personal_adapters(conditions: list, enrolled: dict, pipe, registry: str, tenant: str) -> None:
    """Enrolled people run with their own adapter (personalize) for this pipeline's shared adapter."""
    from ray_faceid.identity.personalization import load_personal
    from ray_faceid.registry import Registry

    for condition in conditions:
        if condition.name in enrolled:
            condition.personal = load_personal(Registry(registry), tenant, enrolled[condition.name], pipe.adapter_hash,
                                               pipe.adapter)


def _with_image_features(pipe, image_encoder: Optional[str], conditions: list, photos: dict, analyzer,
                         registry: str, tenant: str, enrolled: dict) -> None:
    """FaceID-Plus / PlusV2 read each face through a CLIP image encoder as well: its features of every
    person's reference photos (`photos`: name -> photos), or of an enrolled person's reference crops,
    go on their condition."""
    from ray_faceid.identity.face_plus import attach_image_encoder
    from ray_faceid.pipelines.references import reference_crops
    from ray_faceid.registry import Registry

    attach_image_encoder(pipe.adapter, image_encoder, pipe.device, "--image-encoder")
    if pipe.adapter is None or pipe.adapter.image_encoder is None:
        return
    encoder = pipe.adapter.image_encoder
    for condition in conditions:
        refs = photos[condition.name]
        if condition.name in enrolled:
            condition.image_features = encoder.enrolled_features(Registry(registry).references(tenant, enrolled[condition.name]))
        elif isinstance(refs, list):
            condition.image_features = encoder.features(reference_crops(analyzer, refs))
        else:
            raise BadInput(f"{condition.name}: {pipe.adapter.published['variant']} reads the face's photos, not only an "
                           "embedding: give them with --ref or --identity NAME=PHOTO, or an enrolled person")


def _with_identitynet(pipe, identitynet: Optional[str], scale: float, pose: Optional[str], conditions: list,
                      photos: dict, analyzer, width: int, height: int) -> None:
    """InstantID: its IdentityNet (a ControlNet folder), and each person's pose, the five keypoints
    of the --pose photo's face or else of their first reference photo's (a frontal face for people
    given as embeddings or enrolled)."""
    from ray_faceid.identity.instantid import attach_identitynet
    from ray_faceid.pipelines.references import reference_pose

    if pose and (pipe.adapter is None or not pipe.adapter.kind.identitynet):
        raise BadInput("--pose is for InstantID's ip-adapter.bin; this adapter has no IdentityNet")
    attach_identitynet(pipe, identitynet, scale, "--identitynet")
    if pipe.adapter is None or pipe.adapter.identitynet is None:
        return
    if analyzer.config.backend == "dlib" and analyzer.config.landmarks == "dlib5":
        # dlib's 5 points have no mouth corners: the pose reads its 68 (trained on iBUG 300-W, non-commercial
        # like InstantID's own antelopev2 encoder).
        from ray_faceid.face.analyzer import FaceAnalyzer

        analyzer = FaceAnalyzer(analyzer.config.model_copy(update={"landmarks": "dlib68"}))
    for condition in conditions:
        source = pose or (photos[condition.name][0] if isinstance(photos[condition.name], list) else None)
        if source is None:
            err_console.print(f"[yellow]{condition.name}: no photo gives a pose (--pose PHOTO): a frontal face in the "
                              "middle[/yellow]")
        else:
            condition.pose = reference_pose(analyzer, source, width, height)


def _say_engine_build(pipe) -> None:
    """A compiled backend builds its engine in the first step (a minute or more, silent): said before it."""
    if pipe.backend != "torch":
        err_console.print(f"{pipe.backend}: the first step builds the UNet engine for this size unless one is cached "
                          "(minutes on a GPU; `ray-faceid compile` builds it ahead)")


def read_face_embedding(path: str, tokens: bool = False) -> np.ndarray:
    """--face-embedding: an .npy of one person's N x D embeddings (or one D vector), as their encoder
    gives them; on FLUX (`tokens`) also N x T x C tokens (PuLID's ID tokens, whose adapter checks T and C)."""
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--face-embedding {path}: not a readable .npy file ({exc})") from None
    emb = np.atleast_2d(emb)
    if emb.ndim not in ((2, 3) if tokens else (2,)) or not emb.size or not np.issubdtype(emb.dtype, np.number):
        wanted = ("N x D numbers (or N x T x C tokens)" if tokens else
                  "N x D numbers (N x T x C tokens are PuLID-FLUX's, on a FLUX base)")
        raise BadInput(f"--face-embedding {path}: expected {wanted}, got {emb.dtype} of shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise BadInput(f"--face-embedding {path}: it holds NaN or infinite values")
    return emb.astype(np.float32)


def _memory(text_encoders: str, transformer_weights: str) -> dict:
    return {"text_encoders": text_encoders, "transformer_weights": transformer_weights}


def _region(value: str, name: str):
    said = f"--region {name}={value}"
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError as exc:
        raise BadInput(f"{said}: expected x0,y0,x1,y1 as fractions") from exc
    if len(box) != 4:
        raise BadInput(f"{said}: expected 4 numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise BadInput(f"{said}: fractions of the image with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return box


def generate(
    prompt: str = typer.Option(..., "--prompt", help="What to render."),
    out: Path = PngOutOpt,
    ref: list[str] = typer.Option([], "--ref", help="Reference photo of the (single) identity; repeat for more."),
    identity: list[str] = typer.Option([], "--identity", help="An enrolled person's name or id (see --registry), or "
                                       "NAME=IMG[,IMG...] from photos; repeat for several people."),
    region: list[str] = typer.Option([], "--region", help="NAME=x0,y0,x1,y1 (fractions); default equal strips."),
    expression: Optional[str] = typer.Option(None, "--expression", help="e.g. 'smile, turn left' or 'smile=0.5'."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="What the image should not show (on FLUX, "
                                        "with --true-cfg S over 1)."),
    model: str = ModelOpt,
    adapter: Optional[str] = AdapterOpt,
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = StepsOpt,
    scheduler: Optional[str] = SchedulerOpt,
    scheduler_config: list[str] = SchedulerConfigOpt,
    guidance: Optional[float] = GuidanceOpt,
    size: Optional[str] = typer.Option(None, "--size", help="WxH; default: the model's own (512x512 for SD 1.x, "
                                       "1024x1024 for SDXL, 32x32 for tiny)."),
    backend: str = BackendOpt,
    imr: Optional[str] = ImrOpt,
    flow: Optional[str] = FlowOpt,
    edit: Optional[str] = EditOpt,
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
    face_backend: str = FaceBackendOpt,
    insightface_root: Optional[str] = InsightfaceRootOpt,
    face_embedding: Optional[str] = FaceEmbeddingOpt,
    image_encoder: Optional[str] = ImageEncoderOpt,
    plus_v2_scale: Optional[float] = typer.Option(None, "--plus-v2-scale", min=0.0, max=3.0, help="FaceID-PlusV2: "
                                                  "weight of the face's CLIP features over its embedding's own tokens "
                                                  "(default 1)."),
    identitynet: Optional[str] = IdentityNetOpt,
    identitynet_scale: Optional[float] = IdentityNetScaleOpt,
    pose: Optional[str] = typer.Option(None, "--pose", help="InstantID: a photo whose face's keypoints set the pose; "
                                       "default: the reference photo's."),
    step_cache: float = StepCacheOpt,
    flux_text_encoders: str = FluxTextEncodersOpt,
    flux_transformer_weights: str = FluxTransformerWeightsOpt,
    strength: list[str] = StrengthOpt,
    identity_start: int = IdentityStartOpt,
    true_cfg: float = typer.Option(1.0, "--true-cfg", min=1.0, max=30.0, help="FLUX: true classifier-free guidance "
                                   "away from --negative-prompt (over 1; each step runs the transformer twice; "
                                   "diffusers' true_cfg_scale, PuLID-FLUX's true CFG, where its authors suggest "
                                   "--guidance 1). Default 1: off."),
):
    """Render a prompt with one to four people: enrolled ones by name or id, or from photos."""
    from ray_faceid.pipelines.generate import parse_size
    from ray_faceid.pipelines.model_ref import resolve_model

    with user_errors():
        sampler = Sampler.parse(scheduler, scheduler_config)  # checked before any model loads
        width, height = parse_size(size, "--size") if size else (None, None)
        ref_model = resolve_model(model, flux=True)  # configs only: FLUX runs another pipeline
        if ref_model.family == "flux":
            from ray_faceid.cli.generate_flux import generate_flux, pulid_face_options, refuse_unbuilt_options
            from ray_faceid.pipelines.flux_sampling import FLUX_BACKENDS

            refuse_unbuilt_options({"--expression": expression, "--imr": imr, "--flow": flow, "--edit": edit,
                                     "--plus-v2-scale": plus_v2_scale, "--identitynet": identitynet, "--pose": pose,
                                     "--identitynet-scale": identitynet_scale,
                                     "--scheduler": scheduler, "--scheduler-config": scheduler_config,
                                     **pulid_face_options(adapter, face_backend, insightface_root),
                                     f"--backend {backend}": None if backend in ("auto", *FLUX_BACKENDS) else backend})
            if face_embedding and (ref or identity):
                raise BadInput("use either --face-embedding or photos (--ref / --identity NAME=PHOTO), not both")
            people = ({"person": read_face_embedding(face_embedding, tokens=True)} if face_embedding
                      else _people(ref, identity))
            regions = {k: _region(v, k) for k, v in _parse_named(region, "--region").items()}
            return generate_flux(ref_model, adapter, image_encoder, people, regions, prompt, out, seed, steps,
                                 guidance, width, height, registry, tenant, backend, step_cache, insightface_root,
                                 _strengths(strength, people, identity_start, steps), identity_start, negative_prompt,
                                 true_cfg, _memory(flux_text_encoders, flux_transformer_weights))
        if step_cache:
            raise BadInput(f"--step-cache is for FLUX bases; {model} is a UNet family")
        from ray_faceid.pipelines.flux_memory import refuse_on_unet

        refuse_on_unet(flux_text_encoders, flux_transformer_weights, model)
        if true_cfg != 1:
            raise BadInput(f"--true-cfg is for FLUX bases; {model} runs classifier-free guidance already (--guidance)")
        identitynet_scale = identitynet_scale_of(identitynet, identitynet_scale)
        people, photos = _people_and_photos(ref, identity, face_embedding, bool(image_encoder or identitynet))
        if not people:
            raise BadInput("nobody to render: give --ref PHOTO, or --identity NAME (enrolled) / NAME=PHOTO, or "
                           "--face-embedding EMB.npy")
        regions = {k: _region(v, k) for k, v in _parse_named(region, "--region").items()}
        strengths = _strengths(strength, people, identity_start, steps)
        unknown = set(regions) - set(people)
        if unknown:
            raise BadInput(f"--region for unknown identity {sorted(unknown)}; identities: {sorted(people)}")
        edits = parse_edit_option(edit)
        if edits and not flow:
            raise BadInput("--edit needs --flow URI (a flow trained with `ray-faceid train --method flow`)")
        analyzer = _analyzer(face_backend, insightface_root, face_embedding)
        conditions, enrolled, pipe = _conditions_and_pipeline(
            analyzer, people, registry, tenant, regions, expression, edits, ref_model, adapter, backend, imr, flow,
            spec=None if face_embedding else "analyzer", plus_v2_scale=plus_v2_scale)
        _with_image_features(pipe, image_encoder, conditions, photos, analyzer, registry, tenant, enrolled)
        steps = steps or pipe.base.default_steps
        width, height = (width, height) if width else pipe.base.native_size
        _with_identitynet(pipe, identitynet, identitynet_scale, pose, conditions, photos, analyzer, width, height)
        _with_personal_adapters(conditions, enrolled, pipe, registry, tenant)  # beside what it reads: after both
        conditions = with_strengths(conditions, strengths)
        sampling = sampler.record(pipe.base.scheduler)["class"]
        err_console.print(f"{width}x{height}, {steps} steps of {sampling} on {pipe.device.type}")
        _say_engine_build(pipe)
        pipe.on_step = denoise_reporter()
        result = pipe.generate(prompt, conditions, negative_prompt, seed, steps, guidance, width, height,
                               sampler=sampler, identity_start=identity_start)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(result.png[0])
    console.print(f"wrote {out} (seed {seed}, {len(conditions)} identit{'y' if len(conditions) == 1 else 'ies'})")


def inpaint(
    image: str = typer.Option(..., "--image", help="Image to edit."),
    mask: str = typer.Option(..., "--mask", help="Mask image of the same size; white = repaint."),
    ref: list[str] = typer.Option([], "--ref", help="Reference photo(s) of the person."),
    identities: list[str] = typer.Option([], "--identity", help="Or an enrolled person's name or id (or NAME=PHOTO)."),
    prompt: str = typer.Option(..., "--prompt", help="What to paint into the masked area."),
    out: Path = PngOutOpt,
    model: str = ModelOpt,
    adapter: Optional[str] = AdapterOpt,
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = StepsOpt,
    scheduler: Optional[str] = SchedulerOpt,
    scheduler_config: list[str] = SchedulerConfigOpt,
    guidance: Optional[float] = GuidanceOpt,
    feather: float = typer.Option(4.0, "--feather", min=0.0, max=64.0, help="Soft edge inside the mask, in pixels."),
    backend: str = BackendOpt,
    expression: Optional[str] = typer.Option(None, "--expression", help="e.g. 'smile, turn left' (with --imr)."),
    imr: Optional[str] = ImrOpt,
    flow: Optional[str] = FlowOpt,
    edit: Optional[str] = EditOpt,
    registry: str = RegistryOpt,
    tenant: str = TenantOpt,
    face_backend: str = FaceBackendOpt,
    insightface_root: Optional[str] = InsightfaceRootOpt,
    face_embedding: Optional[str] = FaceEmbeddingOpt,
    image_encoder: Optional[str] = ImageEncoderOpt,
    identitynet: Optional[str] = IdentityNetOpt,
    identitynet_scale: Optional[float] = IdentityNetScaleOpt,
    step_cache: float = StepCacheOpt,
    flux_text_encoders: str = FluxTextEncodersOpt,
    flux_transformer_weights: str = FluxTransformerWeightsOpt,
    strength: list[str] = StrengthOpt,
    identity_start: int = IdentityStartOpt,
):
    """Repaint the masked region with the person; pixels outside the mask are kept exactly. InstantID
    (with --identitynet) paints a frontal face filling the mask's box."""
    from ray_faceid.face.decode import decode_image
    from ray_faceid.pipelines.inpaint import inpaint as run_inpaint
    from ray_faceid.pipelines.model_ref import resolve_model

    with user_errors():
        if len(identities) > 1:
            raise BadInput(f"inpaint repaints one person's face; {len(identities)} --identity given: give one")
        identity = identities[0] if identities else None
        sampler = Sampler.parse(scheduler, scheduler_config)  # checked before any model loads
        picture = decode_image(image)
        mask_array = decode_image(mask)
        if mask_array.shape[:2] != picture.shape[:2]:  # before any model loads
            raise BadInput(f"--mask is {mask_array.shape[1]}x{mask_array.shape[0]}, --image {picture.shape[1]}x"
                           f"{picture.shape[0]}: they must match")
        ref_model = resolve_model(model, flux=True)  # configs only: FLUX Fill runs another pipeline
        if ref_model.family == "flux":
            from ray_faceid.cli.generate_flux import inpaint_flux, pulid_face_options, refuse_unbuilt_options
            from ray_faceid.pipelines.flux_sampling import FLUX_BACKENDS

            refuse_unbuilt_options({"--expression": expression, "--imr": imr, "--flow": flow, "--edit": edit,
                                     "--scheduler": scheduler, "--scheduler-config": scheduler_config,
                                     f"--backend {backend}": None if backend in ("auto", *FLUX_BACKENDS) else backend,
                                     "--identitynet": identitynet, "--identitynet-scale": identitynet_scale,
                                     **pulid_face_options(adapter, face_backend, insightface_root)}, "inpaint")
            people, _ = _people_and_photos(ref, [identity] if identity else [], face_embedding, False, tokens=True,
                                           readers="nothing on FLUX (the embedding is the person)")
            from ray_faceid.pipelines.flux_sampling import fill_gray

            fill_gray(mask_array)  # an empty mask: before any model loads
            return inpaint_flux(ref_model, adapter, image_encoder, people, picture, mask_array, prompt, out, seed, steps,
                                guidance, registry, tenant, backend, step_cache, insightface_root, feather,
                                _strengths(strength, people, identity_start, steps), identity_start,
                                _memory(flux_text_encoders, flux_transformer_weights))
        if step_cache:
            raise BadInput(f"--step-cache is for FLUX bases; {model} is a UNet family")
        from ray_faceid.pipelines.flux_memory import refuse_on_unet

        refuse_on_unet(flux_text_encoders, flux_transformer_weights, model)
        identitynet_scale = identitynet_scale_of(identitynet, identitynet_scale)
        edits = parse_edit_option(edit)
        if edits and not flow:
            raise BadInput("--edit needs --flow URI (a flow trained with `ray-faceid train --method flow`)")
        # InstantID's pose comes from the mask's box here, not a photo: only FaceID-Plus reads --ref beside --face-embedding.
        people, photos = _people_and_photos(ref, [identity] if identity else [], face_embedding, bool(image_encoder),
                                            readers="FaceID-Plus's CLIP image encoder (--image-encoder); inpaint's "
                                            "InstantID pose comes from the mask")
        if not people:
            raise BadInput("whose face? give --ref PHOTO, --identity NAME (an enrolled person) or --face-embedding EMB.npy")
        from ray_faceid.pipelines.inpaint import binary_mask

        binary_mask(mask_array, picture.shape[:2])  # an empty mask: before any model loads
        strengths = _strengths(strength, people, identity_start, steps)
        analyzer = _analyzer(face_backend, insightface_root, face_embedding)
        conditions, enrolled, pipe = _conditions_and_pipeline(
            analyzer, people, registry, tenant, {}, expression, edits, ref_model, adapter, backend, imr, flow,
            spec=None if face_embedding else "analyzer")
        _with_image_features(pipe, image_encoder, conditions, photos, analyzer, registry, tenant, enrolled)
        from ray_faceid.identity.instantid import attach_identitynet

        attach_identitynet(pipe, identitynet, identitynet_scale, "--identitynet")
        _with_personal_adapters(conditions, enrolled, pipe, registry, tenant)
        person = with_strengths(conditions, strengths)[0]
        sampling = sampler.record(pipe.base.scheduler)["class"]
        err_console.print(f"a {picture.shape[1]}x{picture.shape[0]} photo, its masked face repainted at up to "
                          f"{max(pipe.base.native_size)} px, {steps or pipe.base.default_steps} steps of {sampling} "
                          f"on {pipe.device.type}")
        _say_engine_build(pipe)
        pipe.on_step = denoise_reporter()
        result = run_inpaint(pipe, picture, mask_array, person, prompt,
                             seed=seed, steps=steps, guidance=guidance, feather=feather, sampler=sampler,
                             identity_start=identity_start)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(result.png[0])
    console.print(f"wrote {out} (seed {seed}, {person.name})")
