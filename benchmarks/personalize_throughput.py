"""Per-identity adaptation: persistent Ray Train workers vs one TorchTrainer.fit() per identity.

Enrolls N people from the real photo set twice (two tenants), adapts one tenant with a single
`run_personalize` call (workers keep the models loaded and loop over the identities) and the other
with one call per identity (a trainer start-up and a model load each), same settings, same run.
Target: the persistent design >= 5x identities/hour. Also times one adaptation step of an
SD1.5-shaped UNet (random weights) at a small resolution on CPU (and CUDA when present).

    python benchmarks/personalize_throughput.py [--identities 6] [--steps 40] [--size 32] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from pipeline_overhead import SPEC, sd15_unet  # noqa: E402

FACES = Path(os.environ.get("RAY_FACEID_FACES", Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))


def enroll_people(registry, tenants: list[str], count: int) -> None:
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer

    analyzer = FaceAnalyzer()
    people = [p for p in sorted(FACES.iterdir()) if p.is_dir() and len(list(p.iterdir())) >= 3
              and p.name not in ("group", "nonface", "original_pairs")][:count]
    for person in people:
        embeddings, quality, crops = [], [], []
        for photo in sorted(person.iterdir())[:3]:
            faces = analyzer.analyze(analyzer.load(str(photo)))
            if faces:
                embeddings.append(faces[0].embedding)
                quality.append(faces[0].quality["score"])
                crops.append(align(analyzer.load(str(photo)), faces[0].landmarks, loose_template(256))[0])
        for tenant in tenants:
            registry.create(tenant, person.name, "benchmark", np.stack(embeddings), np.array(quality), analyzer.spec, crops, [])


def sd15_step_seconds(device: str, size: int, repeats: int = 2) -> float:
    """One adaptation step (identity forward + backward into the processors, class-prompt forward)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.identity.cross_training import Shot, assemble_cross_batch
    from ray_faceid.identity.objective import adapter_losses
    from ray_faceid.pipelines.models import BaseModel
    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer(max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    base = BaseModel(sd15_unet(), vae, text, tokenizer, DDIMScheduler(), "sd15-shaped (random)").freeze().to(device)
    adapter = IdentityAdapter.for_unet(base.unet, SPEC)
    adapter.to(device).install(base.unet)
    rng = np.random.default_rng(0)
    shots = [Shot(f"s{k}", "p", rng.normal(size=128).astype(np.float32), rng.integers(0, 255, (size, size, 3), np.uint8),
                  np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]]) * size, "a photo of a person")
             for k in range(2)]
    batch = assemble_cross_batch([(shots[0], shots[1])])
    optimizer = torch.optim.AdamW(adapter.processors.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = adapter_losses(base, adapter, batch, 0.0, torch.Generator().manual_seed(0))["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--sd15-size", type=int, default=128)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not FACES.is_dir():
        sys.exit(f"real photo set not found at {FACES} (set RAY_FACEID_FACES)")

    from ray_faceid.config import PersonalizeConfig
    from ray_faceid.data.cluster import init_ray
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import build_tiny
    from ray_faceid.registry import Registry
    from ray_faceid.train.personalize import run_personalize

    work = Path(tempfile.mkdtemp(prefix="bench_personalize_"))
    registry = Registry(str(work / "registry"))
    enroll_people(registry, ["persistent", "per_fit"], args.identities)
    adapter_uri = str(work / "adapter")
    spec = registry.embeddings("persistent", registry.list("persistent")[0]["id"])[2]
    IdentityAdapter.for_unet(build_tiny().unet, spec).save(adapter_uri)
    config = PersonalizeConfig(steps=args.steps, size=args.size, workers=1)
    init_ray(num_cpus=os.cpu_count())

    persistent = run_personalize(registry.store, adapter_uri, "tiny", config, tenant="persistent")
    started = time.perf_counter()
    for meta in registry.list("per_fit"):
        run_personalize(registry.store, adapter_uri, "tiny", config, tenant="per_fit", identities=[meta["id"]])
    per_fit_seconds = time.perf_counter() - started
    n = len(persistent["trained"])
    per_fit_rate = 3600 * n / per_fit_seconds
    step_cpu = sd15_step_seconds("cpu", args.sd15_size)
    step_gpu = sd15_step_seconds("cuda", args.sd15_size) if torch.cuda.is_available() else None

    lines = [
        f"### personalize_throughput — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"{n} real identities (3 references each), tiny components on CPU, {args.steps} steps per identity at "
        f"{args.size}x{args.size}, 1 worker; same settings for both rows.",
        "",
        "| design | seconds | identities/hour | vs one fit per identity |",
        "|---|---|---|---|",
        f"| one TorchTrainer.fit() per identity | {per_fit_seconds:.1f} | {per_fit_rate:.0f} | 1.00x |",
        f"| persistent workers (one fit, loop over identities) | {persistent['seconds']:.1f} | "
        f"{persistent['identities_per_hour']:.0f} | {persistent['identities_per_hour'] / per_fit_rate:.2f}x |",
        "",
        f"One adaptation step, SD1.5-shaped UNet (random weights, identity processors installed), "
        f"{args.sd15_size}x{args.sd15_size}, batch 1: CPU {step_cpu:.2f} s"
        + (f", CUDA {step_gpu:.3f} s" if step_gpu is not None else " (no GPU on this machine)") + ".",
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
