"""`ray-faceid generate` on a FLUX base, sampled as diffusers' FluxPipeline samples it
(pipelines/flux_sampling.py): a prompt, and people with a FLUX IP-Adapter file
(identity/flux_adapter.py), each from photos read through a CLIP image encoder folder or as an image
embedding file, each in their region. Enrolled people, samplers and the other engines on FLUX are not
built yet: those options are refused in one line."""
from __future__ import annotations

from pathlib import Path

from ray_faceid.cli.common import console, err_console
from ray_faceid.errors import BadInput
from ray_faceid.progress import denoise_reporter


def refuse_identity_options(given: dict[str, object]) -> None:
    """The options FLUX does not take yet, named in one line (`given`: option -> its value)."""
    used = [option for option, value in given.items() if value not in (None, "", [], False)]
    if used:
        raise BadInput(f"{', '.join(used)}: not built for FLUX yet; FLUX runs from --prompt (--seed, --steps, "
                       "--guidance, --size), with people as photos (--ref, or --identity NAME=PHOTO and --region) or "
                       "--face-embedding EMB.npy, and --adapter FILE (a FLUX IP-Adapter)")


def flux_people(people: dict, regions: dict, image_encoder: str | None, device) -> tuple[list, str | None]:
    """IdentityConditions of `people` (name -> photos, an enrolled name, or an embedding array): each
    photo read whole through the CLIP image encoder, as the FLUX IP-Adapter's pipeline reads it; and
    the encoder's weights hash (None without photos)."""
    from ray_faceid.face.decode import decode_image
    from ray_faceid.pipelines.generate import IdentityCondition

    unknown = set(regions) - set(people)
    if unknown:
        raise BadInput(f"--region for unknown identity {sorted(unknown)}; identities: {sorted(people)}")
    photos = {name: value for name, value in people.items() if isinstance(value, list)}
    enrolled = [name for name, value in people.items() if isinstance(value, str)]
    if enrolled:
        raise BadInput(f"--identity {enrolled[0]}: enrolled people on FLUX are not built yet (the registry keeps face "
                       "embeddings, the FLUX IP-Adapter reads image embeddings): give photos, NAME=PHOTO")
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
        embeddings = encoder.image_embeds([decode_image(p) for p in value]) if name in photos else value
        conditions.append(IdentityCondition(name, embeddings, region=regions.get(name)))
    return conditions, None if encoder is None else encoder.sha256


def _generator(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, regions: dict):
    """(the FluxGenerator, people's IdentityConditions): photos read and checked before the model loads."""
    import torch

    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator

    if people and not adapter_uri:
        raise BadInput(f"{ref.name}: identity on FLUX reads a FLUX IP-Adapter: give --adapter FILE (the XLabs FLUX "
                       "IP-Adapter layout)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conditions, encoder_hash = flux_people(people, regions, image_encoder, device)
    base = load_flux(ref)
    if base.untrained:
        err_console.print(f"[yellow]{base.model_id}: untrained base model, images are noise-like (smoke run)[/yellow]")
    adapter = None
    if adapter_uri:
        from ray_faceid.identity.flux_adapter import load_flux_adapter

        adapter = load_flux_adapter(adapter_uri, base.transformer)
    generator = FluxGenerator(base, adapter, device=device)
    generator.image_encoder_hash = encoder_hash
    generator.on_step = denoise_reporter()
    return generator, conditions


def _who(conditions: list) -> str:
    return f"{len(conditions)} identit{'y' if len(conditions) == 1 else 'ies'}" if conditions else "no identity"


def inpaint_flux(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, image, mask, prompt: str,
                 out: Path, seed: int, steps: int | None, guidance: float | None) -> None:
    """FLUX.1 Fill: the masked part of the photo repainted (with the person, given a FLUX IP-Adapter)."""
    if len(people) > 1:
        raise BadInput("inpainting repaints one person: give one --ref person or --identity")
    generator, conditions = _generator(ref, adapter_uri, image_encoder, people, {})
    base = generator.base
    err_console.print(f"FLUX.1 {base.variant}: {image.shape[1]}x{image.shape[0]}, {steps or base.default_steps} steps "
                      f"on {generator.device.type}")
    result = generator.inpaint(image, mask, prompt, conditions, seed, steps, guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png[0])
    console.print(f"wrote {out} (seed {seed}, FLUX.1 {base.variant}, {_who(conditions)})")


def generate_flux(ref, adapter_uri: str | None, image_encoder: str | None, people: dict, regions: dict, prompt: str,
                  out: Path, seed: int, steps: int | None, guidance: float | None, width: int | None,
                  height: int | None) -> None:
    generator, conditions = _generator(ref, adapter_uri, image_encoder, people, regions)
    base = generator.base
    steps = steps or base.default_steps
    width, height = (width, height) if width else base.native_size
    generator.check(steps, guidance, width, height)  # before the prompt is encoded
    said = "" if guidance is None and base.default_guidance is None else \
        f", guidance {base.default_guidance if guidance is None else guidance}"
    err_console.print(f"FLUX.1 {base.variant}: {width}x{height}, {steps} steps{said} on {generator.device.type}")
    result = generator.generate(prompt, conditions, seed, steps, guidance, width, height)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png[0])
    console.print(f"wrote {out} (seed {seed}, FLUX.1 {base.variant}, {_who(conditions)})")
