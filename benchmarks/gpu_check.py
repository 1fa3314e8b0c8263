"""On a GPU machine: the UNet and recogniser engines on CUDA, compared and timed in one run.

1. UNet: SD1.5-shaped (random weights), decoupled identity processors, 512x512 (latent 64),
   batch 2 (one classifier-free-guidance pair), fp16: ms per call of torch eager, torch.compile
   and TensorRT (when installed: build from the fp16 graph, compare with eager, refit other
   identity weights and compare again). Target: TensorRT >= 2x eager. The fp16 ONNX export
   TensorRT builds from is made and checked either way (every identity weight under its name).
2. Recogniser: the dlib ResNet port on CUDA vs on this machine's CPU, faces/s, and its largest
   difference from dlib's own descriptors (chips and descriptors made where dlib runs:
   `--save-chips`), with cuDNN's TF32 off (the engine) and on (torch's default).
3. Pipeline: the tiny pipeline end to end on CUDA (fp32 and fp16), one and two identities.

    python benchmarks/gpu_check.py --save-chips chips.npz   # where dlib and the faces are
    python benchmarks/gpu_check.py [--chips chips.npz] [--latent 64] [--no-record]   # on the GPU
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from pipeline_overhead import SPEC, sd15_unet  # noqa: E402


def cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def attempt(label: str, fn) -> str:
    """fn's result line, or the failure as a line: one failing check must not hide the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return f"| {label} | failed: {type(exc).__name__}: {str(exc)[:160]} | - | - | - |"


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def unet_rows(latent: int) -> list[str]:
    from ray_faceid.engines.base import EngineShape
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.engines.onnx_export import export_unet
    from ray_faceid.engines.select import processor_weights_by_onnx_name, unet_engine
    from ray_faceid.errors import BackendUnavailable
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import BaseModel

    torch.manual_seed(0)
    unet = sd15_unet()
    adapter = IdentityAdapter.for_unet(unet, SPEC)
    with torch.no_grad():  # identity projections unlike the text ones, so identity changes the output
        for p in adapter.processors.parameters():
            p.add_(0.02 * torch.randn_like(p))
    adapter.install(unet)
    unet.to("cuda", torch.float16)
    adapter.to("cuda", torch.float16)
    base = BaseModel(unet, None, None, None, None, "sd15-shaped (random)")
    base.model_hash = lambda: "sd15-shaped-random"
    shape = EngineShape(batch=(1, 2, 4), latent=(latent, latent), identities=1, tokens=adapter.options.num_tokens,
                        text_length=77, channels=4, cross_dim=768)
    inputs = shape.example(2, "cuda", torch.float16)
    eager = unet_engine(base, adapter, shape, "torch")
    want = eager(**inputs)
    eager_ms = cuda_ms(lambda: eager(**inputs))
    rows = [f"| torch eager fp16 | {eager_ms:.1f} | 1.00x | - | - |"]

    def compiled_row() -> str:
        started = time.perf_counter()
        compiled = unet_engine(base, adapter, shape, "torch.compile")
        compiled_rel = rel_error(compiled(**inputs), want)
        compile_s = time.perf_counter() - started
        compiled_ms = cuda_ms(lambda: compiled(**inputs))
        return (f"| torch.compile fp16 (compiled in {compile_s:.0f} s) | {compiled_ms:.1f} | "
                f"{eager_ms / compiled_ms:.2f}x | {compiled_rel:.1e} | - |")

    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def export_note() -> str:
        import onnx

        started = time.perf_counter()
        path = export_unet(unet, shape, folder / "onnx" / "unet.onnx", torch.float16)
        export_s = time.perf_counter() - started
        names = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
        weights = processor_weights_by_onnx_name(adapter)
        size_gb = sum(f.stat().st_size for f in path.parent.iterdir()) / 1e9
        return (f"fp16 ONNX export (what TensorRT builds from): {export_s:.0f} s, {size_gb:.2f} GB, checked; "
                f"{sum(n in names for n in weights)}/{len(weights)} identity weights under their refit names.")

    def tensorrt_row() -> str:
        try:
            started = time.perf_counter()
            engine = unet_engine(base, adapter, shape, "tensorrt", "fp16", EngineCache(folder / "cache"))
        except BackendUnavailable as exc:
            return f"| TensorRT fp16 | not run: {str(exc).split(':')[0]} | - | - | - |"
        build_s = time.perf_counter() - started
        trt_rel = rel_error(engine(**inputs), want)
        trt_ms = cuda_ms(lambda: engine(**inputs))
        with torch.no_grad():  # refit: other identity weights in the same plan; torch is the reference
            for p in adapter.processors.parameters():
                p.mul_(1.1)
        engine.refit(processor_weights_by_onnx_name(adapter))
        refit_rel = rel_error(engine(**inputs), eager(**inputs))
        return (f"| TensorRT fp16 (export + build {build_s:.0f} s) | {trt_ms:.1f} | {eager_ms / trt_ms:.2f}x | "
                f"{trt_rel:.1e} | {refit_rel:.1e} |")

    rows.append(attempt("torch.compile", compiled_row))
    notes = [attempt("fp16 ONNX export", export_note)]
    rows.append(attempt("TensorRT", tensorrt_row))
    return [
        f"UNet: SD1.5-shaped (random weights), decoupled identity processors, {latent * 8}x{latent * 8}, batch 2, "
        "ms per call (median of 20):",
        "",
        "| runtime | ms per call | vs eager | rel. error vs eager | after refit |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *notes,
    ]


def save_chips(path: str) -> None:
    """Chips of every face of the shared set (or the bundled photos) and dlib's own descriptors."""
    from ray_faceid.config import DetectionConfig, FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer, sample_images
    from ray_faceid.face.backends.dlib_backend import DlibEncoder, PortedDlibEncoder

    faces = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
    paths = sorted(p for p in faces.glob("*/*") if p.suffix.lower() in (".jpg", ".png")) or list(sample_images())
    analyzer = FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)))
    dlib_enc, ported = DlibEncoder(), PortedDlibEncoder(device="cpu")
    chips, descriptors = [], []
    for p in paths:
        image = analyzer.load(str(p))
        lms = [f.landmarks for f in analyzer._locate(image)]
        if lms:
            chips.extend(ported.chips(image, lms))
            descriptors.append(dlib_enc.embed([image], [lms])[0])
    np.savez_compressed(path, chips=np.stack(chips), dlib=np.concatenate(descriptors))
    print(f"{len(chips)} faces from {len(paths)} photos -> {path}")


def recogniser_rows(chips_path: str | None) -> list[str]:
    from ray_faceid.engines.face_encoder import TorchFaceEncoderEngine
    from ray_faceid.face.backends.dlib_backend import RECOGNIZER_FILE, model_path
    from ray_faceid.face.backends.dlib_dat import read_dlib_resnet
    from ray_faceid.face.backends.dlib_resnet_torch import DlibResNet

    if chips_path is None:
        return ["Recogniser: not run (no --chips file; make one with --save-chips where dlib runs)."]
    data = np.load(chips_path)
    chips, theirs = data["chips"], data["dlib"]
    net = DlibResNet(read_dlib_resnet(model_path(RECOGNIZER_FILE).read_bytes())).eval()
    gpu = TorchFaceEncoderEngine(copy.deepcopy(net), "cuda", batch_size=256)
    cpu = TorchFaceEncoderEngine(net, "cpu", batch_size=64)
    diff_gpu = np.abs(gpu(chips) - theirs).max()
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        tf32 = gpu.net(torch.from_numpy(chips).cuda()).float().cpu().numpy()
    diff_tf32 = np.abs(tf32 - theirs).max()
    diff_cpu = np.abs(cpu(chips) - theirs).max()
    many = np.concatenate([chips] * max(1, 2048 // len(chips)))

    def faces_per_s(engine, repeats: int) -> float:
        engine(many[:256])
        started = time.perf_counter()
        for _ in range(repeats):
            engine(many)
        return repeats * len(many) / (time.perf_counter() - started)

    gpu_rate, cpu_rate = faces_per_s(gpu, 5), faces_per_s(cpu, 1)
    return [
        f"Recogniser (dlib ResNet port), {len(chips)} real faces; faces/s over {len(many)} chips:",
        "",
        "| runtime | faces/s | vs CPU | max abs diff from dlib |",
        "|---|---|---|---|",
        f"| torch, CPU ({torch.get_num_threads()} threads), batches of 64 | {cpu_rate:.0f} | 1.00x | {diff_cpu:.1e} |",
        f"| torch, CUDA fp32 (TF32 off, the engine), batches of 256 | {gpu_rate:.0f} | {gpu_rate / cpu_rate:.1f}x | "
        f"{diff_gpu:.1e} |",
        f"| torch, CUDA with cuDNN TF32 on (torch's default) | - | - | {diff_tf32:.1e} |",
    ]


def pipeline_rows() -> list[str]:
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
    from ray_faceid.pipelines.models import build_tiny

    rows = []
    rng = np.random.default_rng(0)
    people = [IdentityCondition(name, rng.normal(size=(2, 128)).astype(np.float32) * 0.1) for name in ("a", "b")]
    for precision in ("fp32", "fp16"):
        try:
            base = build_tiny()
            adapter = IdentityAdapter.for_unet(base.unet, SPEC)
            pipe = IdentityPipeline(base, adapter, device="cuda", precision=precision)
            for count in (1, 2):
                started = time.perf_counter()
                result = pipe.generate("a portrait", people[:count], steps=4, width=64, height=64)
                pixels = np.asarray(result.images[0], dtype=np.float32)
                ok = pixels.shape == (64, 64, 3) and np.isfinite(pixels).all() and pixels.std() > 0
                rows.append(f"| {precision} | {count} | {'ok' if ok else 'BAD IMAGE'} | "
                            f"{time.perf_counter() - started:.2f} |")
        except Exception as exc:  # noqa: BLE001 - recorded, the other checks go on
            traceback.print_exc()
            rows.append(f"| {precision} | - | failed: {type(exc).__name__}: {str(exc)[:120]} | - |")
    return ["Tiny pipeline on CUDA, 4 steps, 64x64:", "", "| precision | identities | image | s |", "|---|---|---|---|",
            *rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--chips", help="npz from --save-chips")
    parser.add_argument("--save-chips", help="write face chips and dlib's descriptors here, then stop")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.save_chips:
        return save_chips(args.save_chips)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine")
    major, minor = torch.cuda.get_device_capability()
    lines = [f"### gpu_check — {time.strftime('%Y-%m-%d')} — {torch.cuda.get_device_name()} sm_{major}{minor}, "
             f"torch {torch.__version__}; {machine_line()}", ""]
    for name, part in (("unet", lambda: unet_rows(args.latent)), ("recogniser", lambda: recogniser_rows(args.chips)),
                       ("pipeline", pipeline_rows)):
        try:
            lines += part() + [""]
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others' results
            traceback.print_exc()
            lines += [f"{name}: failed: {type(exc).__name__}: {exc}", ""]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
