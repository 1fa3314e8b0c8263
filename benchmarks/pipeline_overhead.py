"""Cost of the identity machinery per denoising step.

Times one classifier-free-guidance UNet call (batch 2) of the tiny UNet and of an SD1.5-shaped
UNet (random weights, small latent so it fits a CPU) with: no adapter (stock processors),
decoupled identity attention, PVA, and 2-identity routing. Target: under 10% of the step at
SD1.5 shape.

    python benchmarks/pipeline_overhead.py [--latent 32] [--repeats 3] [--no-record]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

from ray_faceid.face.spec import EncoderSpec  # noqa: E402
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter  # noqa: E402
from ray_faceid.identity.context import identity_kwargs  # noqa: E402
from ray_faceid.identity.routing import box_masks, strip_boxes  # noqa: E402

SPEC = EncoderSpec(name="dlib_resnet", dim=128, version="bench", license="-", metric="euclidean", threshold=0.6)


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ).eval().requires_grad_(False)


def tiny_unet():
    from ray_faceid.pipelines.models import build_tiny

    return build_tiny().unet


def call(unet, latent: int, kwargs) -> float:
    sample = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        start = time.perf_counter()
        unet(sample, torch.tensor(500), encoder_hidden_states=text, cross_attention_kwargs=kwargs)
        return time.perf_counter() - start


def measure(unet, latent: int, repeats: int) -> list[tuple[str, float]]:
    """Median per variant; variants are interleaved round by round so drift hits them all alike."""
    setups = []
    for name, options, kwargs in variants(unet, latent):
        adapter = None if options is None else IdentityAdapter.for_unet(unet, SPEC, options)
        setups.append((name, adapter, kwargs))
    times = {name: [] for name, _, _ in setups}
    for round_ in range(repeats + 1):
        for name, adapter, kwargs in setups:
            if adapter is None:
                IdentityAdapter.remove(unet)
            else:
                adapter.install(unet)
            seconds = call(unet, latent, kwargs)
            if round_ > 0:  # the first round warms up
                times[name].append(seconds)
    return [(name, statistics.median(times[name])) for name, _, _ in setups]


def variants(unet, latent: int):
    c = unet.config.cross_attention_dim
    # As the pipeline calls it: one routing context per denoise, shared by every layer and step.
    one = identity_kwargs(torch.randn(2, 1, 4, c), torch.tensor([[0.0], [1.0]]))
    masks = box_masks(strip_boxes(2), latent, latent).unsqueeze(0).expand(2, -1, -1, -1)
    two = identity_kwargs(torch.randn(2, 2, 4, c), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), masks)
    yield "no adapter (stock)", None, None
    yield "decoupled", AdapterOptions(method="decoupled"), one
    yield "PVA", AdapterOptions(method="pva"), one
    yield "decoupled + SAA gate", AdapterOptions(method="decoupled", gate=True), one
    yield "2-identity routing (decoupled)", AdapterOptions(method="decoupled"), two


def run(latent: int, repeats: int, record_results: bool) -> str:
    torch.manual_seed(0)
    lines = [
        f"### pipeline_overhead — {time.strftime('%Y-%m-%d')} — {machine_line()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"One CFG UNet call (batch 2), latent {latent}x{latent}, 77 text tokens, 4 identity tokens per identity; "
        f"median of {repeats} rounds, variants interleaved.",
        "",
        "| UNet | variant | ms / call | overhead vs stock |",
        "|---|---|---|---|",
    ]
    for label, build in (("tiny", tiny_unet), ("SD1.5-shaped (random weights)", sd15_unet)):
        unet = build()
        results = measure(unet, latent, repeats)
        stock = results[0][1]
        for name, seconds in results:
            lines.append(f"| {label} | {name} | {seconds * 1000:.1f} | {100 * (seconds / stock - 1):+.1f}% |")
            print(lines[-1], flush=True)
        del unet
    return report(lines, record_results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    run(args.latent, args.repeats, not args.no_record)


if __name__ == "__main__":
    main()
