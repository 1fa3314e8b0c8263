"""UNet runtimes on CPU, and the ported recogniser batched vs dlib one face at a time.

1. ms per UNet call (identity processors installed, decoupled attention, one identity) of an
   SD1.5-shaped UNet with random weights at a small latent, batch 1/2/4: torch eager,
   torch.compile and ONNX Runtime, in one run. Target: onnxruntime >= 1.5x eager at batch 4.
2. faces/s of dlib's ResNet: dlib's own runtime one face at a time, the torch port batched, and
   the port exported to ONNX on ONNX Runtime, on the same faces (the bundled photos, repeated).

    python benchmarks/unet_backends.py [--latent 16] [--repeats 3] [--no-record]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from pipeline_overhead import SPEC, sd15_unet  # noqa: E402


def time_calls(engine, inputs: dict, repeats: int) -> float:
    engine(**inputs)  # warm-up (and torch.compile's compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine(**inputs)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def unet_rows(latent: int, repeats: int) -> list[str]:
    from ray_faceid.engines.base import EngineShape
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.engines.select import unet_engine
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import BaseModel

    unet = sd15_unet()
    adapter = IdentityAdapter.for_unet(unet, SPEC)
    adapter.install(unet)
    base = BaseModel(unet, None, None, None, None, "sd15-shaped (random)")
    base.model_hash = lambda: "sd15-shaped-random"  # no VAE / text encoder needed to key the UNet graph
    shape = EngineShape(batch=(1, 2, 4), latent=(latent, latent), identities=1, tokens=4, text_length=77, channels=4,
                        cross_dim=768)
    cache = EngineCache(tempfile.mkdtemp(prefix="bench_engines_"))
    started = time.perf_counter()
    engines = {"torch eager": unet_engine(base, adapter, shape, "torch"),
               "onnxruntime": unet_engine(base, adapter, shape, "onnxruntime", cache=cache)}
    export_s = time.perf_counter() - started
    try:
        engines["torch.compile"] = unet_engine(base, adapter, shape, "torch.compile")
    except Exception as exc:  # a missing compiler toolchain is a result, not a crash
        print(f"torch.compile unavailable: {exc}")
    rows = []
    for batch in (1, 2, 4):
        inputs = shape.example(batch)
        # torch.compile specialises on shapes: it is compiled (minutes on 2 cores) and timed at batch 4 only.
        ms = {name: time_calls(engine, inputs, repeats) for name, engine in engines.items()
              if name != "torch.compile" or batch == 4}
        eager = ms["torch eager"]
        cells = " | ".join(f"{ms[n]:.0f} ({eager / ms[n]:.2f}x)" if n in ms else "-"
                           for n in ("torch eager", "torch.compile", "onnxruntime"))
        rows.append(f"| {batch} | {cells} |")
    return rows + ["", f"ONNX export (torch.export-based, external data) took {export_s:.0f} s."]


def recogniser_rows(repeat: int) -> list[str]:
    from ray_faceid.config import DetectionConfig, FaceConfig
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.face.analyzer import FaceAnalyzer, sample_images
    from ray_faceid.face.backends.dlib_backend import DlibEncoder, PortedDlibEncoder

    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))
    items = []
    for path in sample_images():
        image = analyzer.load(str(path))
        items.append((image, [f.landmarks for f in analyzer._locate(image)]))
    items = items * repeat
    images, landmarks = [i for i, _ in items], [lm for _, lm in items]
    faces = sum(len(lm) for lm in landmarks)
    dlib_enc, torch_enc = DlibEncoder(), PortedDlibEncoder(device="cpu")
    onnx_enc = PortedDlibEncoder(runtime="onnxruntime", cache=EngineCache(tempfile.mkdtemp(prefix="bench_recogniser_")))
    chips = np.stack([c for image, lms in items for c in torch_enc.chips(image, lms)])

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    dlib_s = timed(lambda: [dlib_enc.embed([im], [lm]) for im, lm in zip(images, landmarks)])
    torch_s = timed(lambda: torch_enc.embed_chips(chips))
    onnx_s = timed(lambda: onnx_enc.embed_chips(chips))
    return [
        f"| dlib, one face at a time | {faces / dlib_s:.1f} | 1.00x |",
        f"| torch port, one batch of {faces} | {faces / torch_s:.1f} | {dlib_s / torch_s:.2f}x |",
        f"| torch port on ONNX Runtime, one batch | {faces / onnx_s:.1f} | {dlib_s / onnx_s:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        f"### unet_backends — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"SD1.5-shaped UNet (random weights), decoupled identity processors, 1 identity, latent "
        f"{args.latent}x{args.latent} ({args.latent * 8} px), ms per call (median of {args.repeats}), speed-up vs eager:",
        "",
        "| batch | torch eager | torch.compile | onnxruntime |",
        "|---|---|---|---|",
        *unet_rows(args.latent, args.repeats),
        "",
        "dlib ResNet recogniser, the faces of the bundled photos x 4, faces/s:",
        "",
        "| runtime | faces/s | vs dlib |",
        "|---|---|---|",
        *recogniser_rows(4),
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
