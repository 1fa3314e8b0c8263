"""`ray-faceid generate` on a FLUX base, sampled as diffusers' FluxPipeline samples it
(pipelines/flux_sampling.py): a prompt, and people with a FLUX IP-Adapter file
(identity/flux_adapter.py), each from photos (or an enrolled person's reference crops) read through a
CLIP image encoder folder, or as an image embedding file, each in their region; eager or with the
transformer compiled (--backend torch.compile), or its ONNX graph on ONNX Runtime (--backend
onnxruntime). Samplers and TensorRT on FLUX are not built yet: those options are refused in one line."""
from __future__ import annotations

from pathlib import Path

from ray_faceid.cli.common import console, err_console, with_strengths
from ray_faceid.errors import BadInput
from ray_faceid.progress import denoise_reporter


def pulid_face_options(adapter: str | None, face_backend: str, insightface_root: str | None) -> dict:
    """--face-backend and --insightface-root as refuse_unbuilt_options takes them: PuLID-FLUX reads
    photos through antelopev2's pack, other FLUX adapters take neither."""
    from ray_faceid.identity.pulid_flux import is_pulid_file

    pulid = bool(adapter) and is_pulid_file(adapter)
    return {"--face-backend": None if face_backend == "dlib" or (pulid and face_backend == "insightface")
            else face_backend, "--insightface-root": None if pulid else insightface_root}


WHAT_FLUX_TAKES = {
    "generate": "FLUX runs from --prompt (--seed, --steps, --guidance, --size; --negative-prompt with --true-cfg), "
                "with people as photos or enrolled "
                "(--ref, --identity NAME[=PHOTO], --region) or --face-embedding EMB.npy",
    "inpaint": "FLUX.1 Fill repaints from --image, --mask and --prompt (--seed, --steps, --guidance, --feather), with "
               "one person as photos or enrolled (--ref, --identity NAME[=PHOTO]) or --face-embedding EMB.npy",
}


def refuse_unbuilt_options(given: dict[str, object], command: str = "generate") -> None:
    """The options given that FLUX does not take yet, named in one line with what `command` takes on
    FLUX (`given`: option -> its value)."""
    used = [option for option, value in given.items()  # a 0 given is given (0 == False)
            if value is not None and value is not False and value != "" and value != []]
    if used:
        raise BadInput(f"{', '.join(used)}: not built for FLUX yet; {WHAT_FLUX_TAKES[command]}, and --adapter FILE "
                       "(a FLUX IP-Adapter or PuLID-FLUX's file), on --backend torch, torch.compile or onnxruntime")


def flux_people(people: dict, regions: dict, image_encoder: str | None, device, registry: str | None = None,
                tenant: str = "default", face_encoder=None, pulid_reader=None) -> tuple[list, str | None]:
    """IdentityConditions of `people` (name -> photos, an enrolled person's name or id, or an embedding
    array): each photo read whole through the CLIP image encoder, as the FLUX IP-Adapter's pipeline
    reads it (an enrolled person: the reference crops the registry keeps of them); and the encoder's
    weights hash (None without photos). `face_encoder` (the EncoderSpec a FLUX adapter `ray-faceid
    train` made reads): people are read through the face stack instead, as on the UNet families.
    `pulid_reader` (identity/pulid_faces.py): photos read as PuLID-FLUX's pipeline reads them, each
    person's PulidFeatures their embeddings until the file's IDFormer turns them into tokens."""
    from ray_faceid.face.decode import decode_image
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.registry import Registry

    unknown = set(regions) - set(people)
    if unknown:
        raise BadInput(f"--region for unknown identity {sorted(unknown)}; identities: {sorted(people)}")
    store = Registry(registry) if registry and any(isinstance(v, str) for v in people.values()) else None
    enrolled = {name: store.resolve(tenant, value) for name, value in people.items() if isinstance(value, str)}
    if face_encoder is not None:
        return _face_stack_people(people, regions, image_encoder, store, tenant, enrolled, face_encoder), None
    if pulid_reader is not None:
        return _pulid_people(people, regions, store, tenant, enrolled, pulid_reader), pulid_reader.sha256
    photos = {name: [decode_image(p) for p in value] for name, value in people.items() if isinstance(value, list)}
    if photos:  # read whole by the adapter, but a person's photo shows them alone: as on the UNet families
        from ray_faceid.pipelines.references import every_face_analyzer, the_face

        analyzer = every_face_analyzer()
        for name, images in photos.items():
            for path, image in zip(people[name], images):
                the_face(analyzer.analyze(image), f"{path} ({name})")
    photos.update({name: store.references(tenant, identity) for name, identity in enrolled.items()})
    encoder = None
    if photos:
        if not image_encoder:
            raise BadInput("photos on FLUX are read through a CLIP image encoder: give --image-encoder FOLDER (a "
                           "CLIPVisionModelWithProjection, the one the adapter was trained with: XLabs' is "
                           "openai/clip-vit-large-patch14)")
        from ray_faceid.face.clip_image import ClipImageEncoder

        encoder = ClipImageEncoder(image_encoder, device)
    elif image_encoder:
        raise BadInput("--image-encoder reads photos: give them with --ref or --identity NAME=PHOTO")
    conditions = []
    for name, value in people.items():
        embeddings = encoder.image_embeds(photos[name]) if name in photos else value
        conditions.append(IdentityCondition(name, embeddings, region=regions.get(name), id=enrolled.get(name)))
    return conditions, None if encoder is None else encoder.sha256


def _face_stack_people(people: dict, regions: dict, image_encoder: str | None, store, tenant: str, enrolled: dict,
                       spec) -> list:
    """People for a FLUX adapter reading `spec`'s identity embeddings: photos through the face stack,
    enrolled people's stored embeddings of that encoder, or arrays as given."""
    from ray_faceid.pipelines.generate import IdentityCondition

    if image_encoder:
        raise BadInput("this FLUX adapter (made by `ray-faceid train`) reads people through the face stack: leave "
                       "--image-encoder out")
    analyzer = None
    if any(isinstance(v, list) for v in people.values()):
        from ray_faceid.pipelines.references import every_face_analyzer

        analyzer = every_face_analyzer()  # a group photo: refused
        if analyzer.spec.key() != spec.key():
            raise BadInput(f"this FLUX adapter reads {spec.key()} embeddings; photos here are read by "
                           f"{analyzer.spec.key()}: give enrolled people with those embeddings, or --face-embedding")
    conditions = []
    for name, value in people.items():
        if name in enrolled:
            embeddings, quality, found = store.embeddings(tenant, enrolled[name], spec)
            encoder = found.key()
        elif isinstance(value, list):
            from ray_faceid.pipelines.references import embed_references

            embeddings, quality = embed_references(analyzer, [analyzer.load(p) for p in value], [str(p) for p in value])
            encoder = spec.key()
        else:
            embeddings, quality, encoder = value, None, None
        conditions.append(IdentityCondition(name, embeddings, quality, region=regions.get(name), id=enrolled.get(name),
                                            encoder=encoder))
    return conditions


def _pulid_people(people: dict, regions: dict, store, tenant: str, enrolled: dict, reader) -> list:
    """People for PuLID-FLUX: photos and enrolled people's reference crops through its encoders; ID
    tokens given as arrays as they are."""
    from ray_faceid.face.decode import decode_image
    from ray_faceid.pipelines.generate import IdentityCondition

    conditions = []
    for name, value in people.items():
        if name in enrolled:
            photos = store.references(tenant, enrolled[name])
            labels = [f"{name}'s reference crop {i + 1}" for i in range(len(photos))]
        elif isinstance(value, list):
            photos, labels = [decode_image(path) for path in value], [f"{path} ({name})" for path in value]
        else:
            conditions.append(IdentityCondition(name, value, region=regions.get(name)))
            continue
        conditions.append(IdentityCondition(name, reader.read(photos, labels), region=regions.get(name),
                                            id=enrolled.get(name), encoder=reader.analyzer.spec.key()))
    return conditions


def precheck(ref, guidance: float | None, width: int | None, height: int | None, inpainting: bool) -> None:
    """The model's own refusals, from its configs, before minutes of loading (FluxGenerator.check
    says the same after)."""
    from ray_faceid.pipelines.flux import check_flux_size, flux_settings

    settings = flux_settings(ref)
    if ref.inpainting != inpainting:
        raise BadInput(f"{ref.name} is FLUX.1 Fill, an inpainting model: it repaints a masked photo (`ray-faceid "
                       "inpaint`)" if ref.inpainting else f"{ref.name}: repainting a masked photo needs FLUX.1 Fill")
    if guidance and not settings["guidance_embedded"]:  # 0 is none, as diffusers' schnell examples pass it
        raise BadInput(f"{ref.name} is FLUX.1 schnell, which takes no guidance: leave --guidance out")
    if width:
        check_flux_size(width, height, settings["size_multiple"])


def _generator(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, regions: dict,
               registry: str | None, tenant: str, backend: str = "torch", step_cache: float = 0.0,
               insightface_root: str | None = None, memory: dict | None = None, size: tuple | None = None):
    """(the FluxGenerator, people's IdentityConditions): photos read and checked before the model loads.
    `memory`: FluxGenerator's text_encoders and transformer_weights; on a GPU the plan they make for
    one image at `size` (None: the native size) is checked against its free memory first."""
    import torch

    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_sampling import (
        FluxGenerator,
        check_step_cache,
        resolve_flux_backend,
        resolve_flux_precision,
    )
    from ray_faceid.pipelines.generate import DTYPES

    if people and not adapter_uri:
        photos = any(not hasattr(value, "shape") for value in people.values())  # not only embedding files
        also = " and --image-encoder FOLDER (the CLIP vision folder it reads photos through)" if photos and not \
            image_encoder else ""
        raise BadInput(f"{ref.name}: identity on FLUX reads a FLUX IP-Adapter or PuLID-FLUX: give --adapter FILE (the "
                       f"XLabs FLUX IP-Adapter layout, or PuLID-FLUX's file){also}")
    if adapter_uri:
        from ray_faceid.identity.flux_adapter import check_given_embeddings
        from ray_faceid.identity.pulid_flux import is_pulid_file

        pulid = is_pulid_file(adapter_uri)
        photos = not all(hasattr(v, "shape") for v in people.values())
        if pulid:
            _check_pulid_readers(photos, image_encoder, insightface_root)
        if insightface_root and not pulid:
            raise BadInput("--insightface-root reads photos for PuLID-FLUX (antelopev2's pack); this FLUX adapter "
                           "reads people otherwise: leave it out")
        check_given_embeddings(adapter_uri, {name: v for name, v in people.items() if hasattr(v, "shape")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = memory or {}
    check_step_cache(step_cache, resolve_flux_backend(backend, torch.device(device)))  # before the base loads
    _check_memory(ref, memory, device, backend, adapter_uri, image_encoder, step_cache, size)
    face_encoder, pulid_reader = None, None
    if adapter_uri:
        from ray_faceid.identity.flux_adapter import trained_encoder

        face_encoder = trained_encoder(adapter_uri)
    if insightface_root:  # PuLID-FLUX's encoders: antelopev2's ArcFace, EVA02-CLIP and its face parser
        from ray_faceid.cli.faces import face_config
        from ray_faceid.face.analyzer import FaceAnalyzer
        from ray_faceid.identity.pulid_faces import PulidFaceReader

        pulid_reader = PulidFaceReader(image_encoder, FaceAnalyzer(face_config("insightface", insightface_root, True, "all")),
                                       device, DTYPES["bf16"] if device == "cuda" else torch.float32)
        image_encoder = None
    conditions, encoder_hash = flux_people(people, regions, image_encoder, device, registry, tenant, face_encoder,
                                           pulid_reader)
    # FLUX's own dtype on a GPU (bf16; fp32 for onnxruntime: its graph is keyed as fp32 weights)
    precision = resolve_flux_precision("auto", torch.device(device), backend)
    base = load_flux(ref, DTYPES[precision] if device == "cuda" else None)
    if base.untrained:
        err_console.print(f"[yellow]{base.model_id}: untrained base model, images are noise-like (smoke run)[/yellow]")
    adapter = None
    if adapter_uri:
        from ray_faceid.identity.flux_adapter import load_flux_identity

        adapter = load_flux_identity(adapter_uri, base.transformer)
        from ray_faceid.identity.pulid_faces import PulidFeatures

        for condition in conditions:  # photos read by PuLID's encoders: the file's IDFormer makes their tokens
            if isinstance(condition.embeddings, PulidFeatures):
                condition.embeddings = adapter.tokens_of(condition.embeddings, condition.name)
    generator = FluxGenerator(base, adapter, device=device, backend=backend, step_cache=step_cache, **memory)
    generator.image_encoder_hash = encoder_hash
    if generator.personal_bank is not None:  # enrolled people run with their own adapter (personalize), if any
        from ray_faceid.identity.personalization import load_personal
        from ray_faceid.registry import Registry

        for condition in conditions:
            if condition.id:
                condition.personal = load_personal(Registry(registry), tenant, condition.id, generator.adapter_hash,
                                                   adapter)
    generator.on_step = denoise_reporter()
    return generator, conditions


def _check_memory(ref, memory: dict, device: str, backend: str, adapter_uri: str | None, image_encoder: str | None,
                  step_cache: float, size: tuple | None) -> None:
    """--flux-text-encoders and --flux-transformer-weights checked, and on a GPU the plan they make
    against its free memory: one line naming what lowers it, instead of running out halfway."""
    import torch

    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.flux_sampling import resolve_flux_backend, resolve_flux_precision

    text_encoders, weights = memory.get("text_encoders", "same"), memory.get("transformer_weights", "same")
    backend = resolve_flux_backend(backend, torch.device(device))
    flux_memory.check_settings(text_encoders, weights, torch.device(device), backend, flux_memory.FLAGS)
    if device != "cuda":  # the CPU's memory is the machine's: not planned
        return
    precision = resolve_flux_precision("auto", torch.device(device), backend)
    plan = flux_memory.replica_plan(ref, precision, text_encoders, weights, 1, [size] if size else [], adapter_uri,
                                    image_encoder, bool(step_cache), backend)
    flux_memory.check_this_gpu(plan, "this GPU's free memory", flags=True)


def _held(generator) -> str:
    """How the run holds the model, where a memory setting changed it (said on the run's first line)."""
    said = f", {generator.transformer_weights.replace('_', ' ')} transformer weights" \
        if generator.transformer_weights != "same" else ""
    return said + (", text encoders on the cpu" if generator.text_encoders == "cpu" else "")


def _who(conditions: list) -> str:
    return f"{len(conditions)} identit{'y' if len(conditions) == 1 else 'ies'}" if conditions else "no identity"


def _check_pulid_readers(photos: bool, image_encoder: str | None, insightface_root: str | None) -> None:
    """PuLID-FLUX reads photos through both its readers: each one missing named, or each one given
    with no photo to read."""
    readers = {"--image-encoder FOLDER (EVA02-CLIP and its face parser)": image_encoder,
               "--insightface-root PACK (antelopev2: its ArcFace)": insightface_root}
    missing = [flag for flag, value in readers.items() if not value]
    if photos and missing:
        raise BadInput(f"PuLID-FLUX reads photos and enrolled people through its encoders: give {' and '.join(missing)}; "
                       "or give their ID tokens as --face-embedding TOKENS.npy (the 32 x 2048 array PuLID's "
                       "get_id_embedding gives)")
    given = [flag.split()[0] for flag, value in readers.items() if value]
    if not photos and given:
        raise BadInput(f"{' and '.join(given)} read{'s' if len(given) == 1 else ''} photos for PuLID-FLUX: give them "
                       "with --ref or --identity NAME[=PHOTO] (with --face-embedding, leave "
                       f"{'it' if len(given) == 1 else 'them'} out)")


def inpaint_flux(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, image, mask, prompt: str,
                 out: Path, seed: int, steps: int | None, guidance: float | None, registry: str, tenant: str,
                 backend: str = "torch", step_cache: float = 0.0, insightface_root: str | None = None,
                 feather: float = 0.0, strengths: dict | None = None, identity_start: int = 0,
                 memory: dict | None = None) -> None:
    """FLUX.1 Fill: the masked part of the photo repainted (with the person, given a FLUX IP-Adapter),
    `feather` pixels inside the mask's edge blended into the photo."""
    from ray_faceid.pipelines.flux_sampling import repaint_size

    if len(people) > 1:
        raise BadInput("inpainting repaints one person: give one --ref person or --identity")
    precheck(ref, guidance, None, None, inpainting=True)
    generator, conditions = _generator(ref, adapter_uri, image_encoder, people, {}, registry, tenant, backend,
                                       step_cache, insightface_root, memory, repaint_size(image.shape[1], image.shape[0]))
    conditions = with_strengths(conditions, strengths or {})
    base = generator.base
    err_console.print(f"FLUX.1 {base.variant}: {image.shape[1]}x{image.shape[0]}, {steps or base.default_steps} steps "
                      f"on {generator.device.type}{_held(generator)}")
    result = generator.inpaint(image, mask, prompt, conditions, seed, steps, guidance, feather=feather,
                               identity_start=identity_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png[0])
    reduced = result.provenance[0].get("repainted_at")
    said = f", repainted at {reduced[0]}x{reduced[1]}: FLUX's pixel budget" if reduced else ""
    console.print(f"wrote {out} (seed {seed}, FLUX.1 {base.variant}, {_who(conditions)}{said})")


def generate_flux(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, regions: dict, prompt: str,
                  out: Path, seed: int, steps: int | None, guidance: float | None, width: int | None,
                  height: int | None, registry: str, tenant: str, backend: str = "torch",
                  step_cache: float = 0.0, insightface_root: str | None = None, strengths: dict | None = None,
                  identity_start: int = 0, negative_prompt: str = "", true_cfg: float = 1.0,
                  memory: dict | None = None) -> None:
    from ray_faceid.pipelines.flux_sampling import check_true_cfg

    precheck(ref, guidance, width, height, inpainting=False)
    check_true_cfg(true_cfg, bool(negative_prompt), step_cache)  # before minutes of loading
    generator, conditions = _generator(ref, adapter_uri, image_encoder, people, regions, registry, tenant, backend,
                                       step_cache, insightface_root, memory, (width, height) if width else None)
    conditions = with_strengths(conditions, strengths or {})
    base = generator.base
    steps = steps or base.default_steps
    width, height = (width, height) if width else base.native_size
    generator.check(steps, guidance, width, height)  # before the prompt is encoded
    said = f", guidance {base.default_guidance if guidance is None else guidance}" if base.guidance_embedded else ""
    said += f", true CFG {true_cfg:g}" if true_cfg > 1 else ""
    err_console.print(f"FLUX.1 {base.variant}: {width}x{height}, {steps} steps{said} on {generator.device.type}"
                      f"{_held(generator)}")
    # Compiled: this size built as a Serve replica builds it, from `ray-faceid compile`'s artifacts where
    # the engine cache has them (into it where not: the next run loads them), its CUDA graphs captured.
    reporter, generator.on_step = generator.on_step, None  # the warm-up's one step is not the image's
    if generator.backend != "torch":
        err_console.print(f"{generator.backend}: building FLUX's transformer for {width}x{height} (minutes on a GPU "
                          "the first time; then from the engine cache)")
    warmed = generator.warm_up([(width, height)], 1)
    generator.on_step = reporter
    if warmed.get("loaded") or warmed.get("stored"):
        err_console.print(f"{generator.backend}: {width}x{height} " + ("loaded from the engine cache" if warmed["loaded"]
                          else "stored in the engine cache (the next run loads it)"))
    result = generator.generate(prompt, conditions, seed, steps, guidance, width, height, identity_start=identity_start,
                                negative_prompt=negative_prompt, true_cfg=true_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png[0])
    console.print(f"wrote {out} (seed {seed}, FLUX.1 {base.variant}, {_who(conditions)})")
