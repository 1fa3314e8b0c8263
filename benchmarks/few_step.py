"""Images per second at few steps against the usual 30, on the same base, with identity.

Rows: 30 steps at guidance 5 on the base's own sampler (the usual run); 4 steps at guidance 5; 4 steps
at guidance 1 with LCM (what a few-step LoRA or distilled base runs: `merge-lora`), where the
unconditional rows are not run. Same base, same person, same size, a batch of 4 images per call;
median of the repeats. The ratio is what carries over to a real base (UNet calls per image); the
absolute rate here is the tiny base's on CPU.

    python benchmarks/few_step.py [--size 64] [--repeats 3] [--no-record]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

from ray_faceid.face.spec import EncoderSpec  # noqa: E402
from ray_faceid.identity.adapter import IdentityAdapter  # noqa: E402
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline  # noqa: E402
from ray_faceid.pipelines.models import build_tiny  # noqa: E402
from ray_faceid.pipelines.schedulers import Sampler  # noqa: E402

SPEC = EncoderSpec(name="dlib_resnet", dim=128, version="bench", license="-", metric="euclidean", threshold=0.6)
IMAGES = 4
RUNS = [("30 steps, guidance 5, the base's own sampler (DDIM)", 30, 5.0, None),
        ("4 steps, guidance 5, LCM", 4, 5.0, "lcm"),
        ("4 steps, guidance 1, LCM (a few-step model's settings)", 4, 1.0, "lcm")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    base = build_tiny()
    torch.manual_seed(0)
    pipe = IdentityPipeline(base, IdentityAdapter.for_unet(base.unet, SPEC))
    person = IdentityCondition("p", np.random.default_rng(0).normal(size=(2, SPEC.dim)).astype(np.float32))
    rates = {}
    for label, steps, guidance, sampler in RUNS:
        sampler = Sampler.parse(sampler) if sampler else None
        pipe.generate("a portrait", [person], steps=1, guidance=guidance, width=args.size, height=args.size,
                      num_images=IMAGES, sampler=sampler)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pipe.generate("a portrait", [person], seed=1, steps=steps, guidance=guidance, width=args.size,
                          height=args.size, num_images=IMAGES, sampler=sampler)
            times.append(time.perf_counter() - start)
        rates[label] = IMAGES / statistics.median(times)
    baseline = rates[RUNS[0][0]]
    lines = [f"## Few steps against 30 ({datetime.date.today()})", "",
             f"{machine_line()}, {torch.get_num_threads()} threads; tiny base with our identity adapter, one person, "
             f"{args.size}x{args.size}, {IMAGES} images per call, median of {args.repeats}.", "",
             "| run | images/s | vs 30 steps |", "|---|---|---|"]
    lines += [f"| {label} | {rate:.2f} | {rate / baseline:.1f}x |" for label, rate in rates.items()]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
