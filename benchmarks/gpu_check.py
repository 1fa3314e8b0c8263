"""On a GPU machine: build the TensorRT UNet engine, run it, compare with torch, time it.

SD1.5-shaped UNet (random weights) with decoupled identity processors at 512x512 (latent 64),
batch 2 (one classifier-free-guidance pair): torch eager fp16 vs TensorRT fp16, same inputs.
Checks: the TensorRT output matches torch (relative error), a refit with other identity weights
changes the output like torch's does, and the ms per call of each. Target: TensorRT >= 2x eager.
Also the ported dlib recogniser batched on CUDA. Needs `pip install 'ray_faceid[tensorrt]'`.

    python benchmarks/gpu_check.py [--latent 64] [--no-record]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from pipeline_overhead import SPEC, sd15_unet  # noqa: E402


def cuda_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine")

    from ray_faceid.engines.base import EngineShape
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.engines.select import processor_weights_by_onnx_name, unet_engine
    from ray_faceid.engines.tensorrt_engine import device_tag
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import BaseModel

    torch.manual_seed(0)
    unet = sd15_unet()
    adapter = IdentityAdapter.for_unet(unet, SPEC)
    adapter.install(unet)
    base = BaseModel(unet, None, None, None, None, "sd15-shaped (random)")
    base.model_hash = lambda: "sd15-shaped-random"
    shape = EngineShape(batch=(1, 2, 4), latent=(args.latent, args.latent), identities=1, tokens=4, text_length=77,
                        channels=4, cross_dim=768)
    cache = EngineCache(tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    trt_engine = unet_engine(base, adapter, shape, "tensorrt", "fp16", cache)  # export on CPU in fp32, build fp16
    build_s = time.perf_counter() - started

    unet.to("cuda", torch.float16)
    adapter.to("cuda", torch.float16)
    eager = unet_engine(base, adapter, shape, "torch")
    inputs = {k: v.to("cuda", torch.float16) for k, v in shape.example(2).items()}
    want, got = eager(**inputs).float(), trt_engine(**inputs).float()
    rel = ((got - want).norm() / want.norm()).item()
    # Refit: other identity weights in the same plan; torch with the same weights is the reference.
    with torch.no_grad():
        for p in adapter.processors.parameters():
            p.mul_(1.1)
    trt_engine.refit(processor_weights_by_onnx_name(adapter))
    refit_rel = ((trt_engine(**inputs).float() - eager(**inputs).float()).norm() / want.norm()).item()
    eager_ms, trt_ms = cuda_ms(lambda: eager(**inputs)), cuda_ms(lambda: trt_engine(**inputs))
    lines = [
        f"### gpu_check — {time.strftime('%Y-%m-%d')} — {device_tag()}; {machine_line()}",
        "",
        f"SD1.5-shaped UNet (random weights), decoupled identity processors, {args.latent * 8}x{args.latent * 8}, "
        f"batch 2, fp16. Engine export + build {build_s:.0f} s.",
        "",
        "| runtime | ms per call | vs eager | rel. error vs eager | after refit |",
        "|---|---|---|---|---|",
        f"| torch eager fp16 | {eager_ms:.1f} | 1.00x | - | - |",
        f"| TensorRT fp16 | {trt_ms:.1f} | {eager_ms / trt_ms:.2f}x | {rel:.2e} | {refit_rel:.2e} |",
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
