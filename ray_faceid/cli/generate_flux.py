"""`ray-faceid generate` on a FLUX base, sampled as diffusers' FluxPipeline samples it
(pipelines/flux_sampling.py): a prompt, and a person given as an image embedding with a FLUX
IP-Adapter file (identity/flux_adapter.py). Enrolled people, photos, samplers and the other engines
on FLUX are not built yet: those options are refused in one line."""
from __future__ import annotations

from pathlib import Path

from ray_faceid.cli.common import console, err_console
from ray_faceid.errors import BadInput
from ray_faceid.progress import denoise_reporter


def refuse_identity_options(given: dict[str, object]) -> None:
    """The options FLUX does not take yet, named in one line (`given`: option -> its value)."""
    used = [option for option, value in given.items() if value not in (None, "", [], False)]
    if used:
        raise BadInput(f"{', '.join(used)}: enrolled people, photos, samplers and the other engines on FLUX are not "
                       "built yet; FLUX runs from --prompt (--seed, --steps, --guidance, --size), with a person as "
                       "--face-embedding EMB.npy and --adapter FILE (a FLUX IP-Adapter)")


def generate_flux(ref, adapter_uri: str | None, people: list, prompt: str, out: Path, seed: int, steps: int | None,
                  guidance: float | None, width: int | None, height: int | None) -> None:
    import torch

    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator

    if people and not adapter_uri:
        raise BadInput(f"{ref.name}: identity on FLUX reads a FLUX IP-Adapter: give --adapter FILE (the XLabs FLUX "
                       "IP-Adapter layout)")
    base = load_flux(ref)
    if base.untrained:
        err_console.print(f"[yellow]{base.model_id}: untrained base model, images are noise-like (smoke run)[/yellow]")
    adapter = None
    if adapter_uri:
        from ray_faceid.identity.flux_adapter import load_flux_adapter

        adapter = load_flux_adapter(adapter_uri, base.transformer)
    generator = FluxGenerator(base, adapter, device="cuda" if torch.cuda.is_available() else "cpu")
    steps = steps or base.default_steps
    width, height = (width, height) if width else base.native_size
    generator.check(steps, guidance, width, height)  # before the prompt is encoded
    said = "" if guidance is None and base.default_guidance is None else \
        f", guidance {base.default_guidance if guidance is None else guidance}"
    err_console.print(f"FLUX.1 {base.variant}: {width}x{height}, {steps} steps{said} on {generator.device.type}")
    generator.on_step = denoise_reporter()
    result = generator.generate(prompt, people, seed, steps, guidance, width, height)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.png[0])
    who = f"{len(people)} identit{'y' if len(people) == 1 else 'ies'}" if people else "no identity"
    console.print(f"wrote {out} (seed {seed}, FLUX.1 {base.variant}, {who})")
