"""Seconds per FLUX.1-dev image with identity: diffusers' FluxPipeline (the FLUX IP-Adapter through
`load_ip_adapter`) against ray_faceid, eager and with the transformer under torch.compile, on the
same modules, in one run.

FLUX.1-dev's shapes (19 dual- and 38 single-stream blocks of 3072, T5-XXL, CLIP-L, its VAE) with
random weights (timing needs no trained weights), bf16, 1024x1024, 28 steps, guidance 3.5, one
person through a FLUX IP-Adapter of XLabs' shape (4 tokens from a 768-d image embedding).

    python benchmarks/flux_generate.py [--no-record]            # on a GPU (34 GB of weights, 58 GB at the fp8 rows)
    python benchmarks/flux_generate.py --smoke --no-record      # the same code on tiny-flux, any device

Rows: (a) diffusers eager; (b) ray_faceid eager; (c) ray_faceid, transformer compiled (after its
warm-up; the compile time and the recompiles when the person changes are reported); (d) compiled
with fp8 weights and products (`flux_transformer_weights: fp8_matmul`) on a second transformer of
the same weights; (e) compiled with the step cache at each `--step-cache` threshold
(pipelines/flux_step_cache.py): the steps it reused; (f) four people's requests in one batch; (g)
fp8 weights alone (memory, not speed). (d), (e) and (g) compare their image with (c)'s of the same
seed: mean and largest pixel difference, PSNR, and the identity similarity of the two faces (cosine
of the face stack's embeddings; with random weights there is no face to compare, and the row says
so). Anchors from the issue: diffusers eager about 7.1 s on an H100, first-block caching about
1.9 s; the target with compile, without step caching, at most 2.0 s.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402
from gpu_generate import sync as gpu_sync  # noqa: E402
from gpu_generate import timed  # noqa: E402 - the same timing (median after a warm-up, synchronised)

PROMPT = "a photo of a person smiling, studio light"


def flux_dev_components(device: str, dtype: torch.dtype, shared=None):
    """FLUX.1-dev's transformer, text encoders and VAE from their published configs, random weights.
    `shared`: a base whose text encoders and VAE the new one shares (a second transformer, of the
    same weights: the same seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ray_faceid.pipelines.flux import FluxBase, flux_dev_modules
    from ray_faceid.pipelines.tiny_tokenizer import tiny_t5_tokenizer, tiny_tokenizer
    from ray_faceid.weights_hash import record

    torch.manual_seed(0)
    if shared is None:
        modules = flux_dev_modules(device, dtype)
    else:
        modules = {**{name: module for name, module in shared.modules.items() if name != "transformer"},
                   **flux_dev_modules(device, dtype, ("transformer",))}
    for name, module in modules.items():  # timing needs no provenance: hashing 17B parameters takes a minute
        record(module, f"random {name}, seed 0")
    # Tokenizers made in code: their vocabularies are downloads (token ids, not their meaning, set the time).
    tokenizer = tiny_tokenizer(max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    base = FluxBase(**modules, tokenizer=tokenizer, tokenizer_2=tiny_t5_tokenizer(512), scheduler=scheduler,
                    model_id="FLUX.1-dev shapes (random weights)").freeze()
    return base.to(device, dtype)  # bf16 on the GPU


def xlabs_adapter(base, embed: int, device, dtype):
    """A FLUX IP-Adapter of XLabs' shape for `base`, random weights, in its published layout."""
    from ray_faceid.identity.flux_adapter import FluxIdentityAdapter

    config = base.transformer.config
    adapter = FluxIdentityAdapter(embed, config.joint_attention_dim, config.num_attention_heads * config.attention_head_dim,
                                  len(base.transformer.transformer_blocks))
    adapter.published = {"kind": "FLUX IP-Adapter", "variant": "benchmark", "file": "random", "sha256": "-",
                         "tokens": 4, "embedding_dim": embed, "licence": "-"}
    return adapter.to(device, dtype).eval().requires_grad_(False)


def diffusers_state(adapter) -> dict:
    """The adapter's weights as diffusers' loader takes them (image_proj / ip_adapter)."""
    proj = {"proj.weight": adapter.proj.weight, "proj.bias": adapter.proj.bias, "norm.weight": adapter.norm.weight,
            "norm.bias": adapter.norm.bias}
    ip = {}
    for i, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        ip.update({f"{i}.to_k_ip.weight": k.weight, f"{i}.to_k_ip.bias": k.bias, f"{i}.to_v_ip.weight": v.weight,
                   f"{i}.to_v_ip.bias": v.bias})
    return {"image_proj": {k: t.detach().float().cpu() for k, t in proj.items()},
            "ip_adapter": {k: t.detach().float().cpu() for k, t in ip.items()}}


def image_difference(a, b) -> str:
    """Pixel difference, PSNR and the two faces' identity similarity of two images of one seed."""
    from ray_faceid.face.analyzer import FaceAnalyzer

    x, y = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    mse = ((x - y) ** 2).mean()
    psnr = "inf" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f} dB"
    try:
        analyzer = FaceAnalyzer()
    except Exception as error:  # a GPU machine without the face stack's weights: the pixels still compare
        return f"mean pixel difference {np.abs(x - y).mean():.2f}/255, largest {np.abs(x - y).max():.0f}, PSNR {psnr}, " \
               f"identity not compared (no face stack here: {type(error).__name__})"
    faces = [analyzer.analyze(np.asarray(image.convert("RGB"))) for image in (a, b)]
    if not faces[0] or not faces[1]:
        identity = "no face in " + ("either image" if not faces[0] and not faces[1] else
                                    "the uncached image" if not faces[0] else "the cached image")
    else:
        e, f = faces[0][0].embedding, faces[1][0].embedding
        identity = f"identity similarity {float(e @ f / np.linalg.norm(e) / np.linalg.norm(f)):.3f}"
    return f"mean pixel difference {np.abs(x - y).mean():.2f}/255, largest {np.abs(x - y).max():.0f}, PSNR {psnr}, {identity}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="image side; default 1024 (tiny: 32)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny-flux (the script's own check, any device)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the rows after the compiled one once the run has taken this long (a lent GPU's "
                        "minutes); they run in the order fp8_matmul, step cache, batch, fp8")
    parser.add_argument("--step-cache", default="0.08,0.12", help="step cache thresholds to measure (comma list; "
                        "empty: none)")
    parser.add_argument("--out", help="also write the section here after every row (a run cut short keeps its rows)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    started_run = time.perf_counter()
    notes = []
    from diffusers import FluxPipeline

    from ray_faceid.pipelines.flux import build_tiny_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator
    from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build_tiny_flux() if args.smoke else flux_dev_components(device, dtype)  # tiny: fp32 on the CPU
    size = args.size or (32 if args.smoke else 1024)
    embed = 16 if args.smoke else 768
    adapter = xlabs_adapter(base, embed, device, dtype)
    rng = np.random.default_rng(0)
    people = [[IdentityCondition(f"p{k}", rng.normal(size=(1, embed)).astype(np.float32))] for k in range(3)]

    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer._load_ip_adapter_weights([diffusers_state(adapter)])
    pipe.transformer.to(device, dtype)
    embeds = torch.from_numpy(people[0][0].embeddings)[None].to(device, dtype)

    def stock():
        pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=3.5,
             generator=torch.Generator("cpu").manual_seed(0), ip_adapter_image_embeds=[embeds],
             negative_ip_adapter_image_embeds=[torch.zeros_like(embeds)], output_type="np")

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    def section() -> list[str]:
        lines = [f"## FLUX.1-dev with identity ({time.strftime('%Y-%m-%d')}{', smoke: tiny-flux' if args.smoke else ''})",
                 "", f"{machine_line()}, {gpu}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
                 f"{size}x{size}, {args.steps} steps, guidance 3.5, one person (FLUX IP-Adapter), median of {args.repeats}.", "",
                 "| run | s / image | vs diffusers |", "|---|---|---|"]
        lines += [f"| {name} | {seconds:.3f} | {rows[0][1] / seconds:.2f}x |" for name, seconds in rows]
        return lines + ([""] + notes if notes else [])

    def save() -> None:
        if args.out:
            Path(args.out).write_text("\n".join(section()) + "\n")

    def row(name: str, seconds: float) -> None:
        rows.append((name, seconds))
        save()
        print(f"{name}: {seconds:.3f} s", flush=True)

    def over_budget(what: str) -> bool:
        if args.budget_s is None or time.perf_counter() - started_run < args.budget_s:
            return False
        notes.append(f"{what}: not measured (the run's time budget, {args.budget_s:.0f} s, was spent).")
        save()
        return True

    rows = []
    row("diffusers FluxPipeline, eager, FLUX IP-Adapter", timed(stock, args.repeats))
    generator = FluxGenerator(base, adapter, device=device, precision="bf16" if dtype == torch.bfloat16 else "fp32")

    def ours():
        generator.generate(PROMPT, people[0], steps=args.steps, width=size, height=size)

    row("ray_faceid, eager", timed(ours, args.repeats))
    from torch._dynamo.utils import counters

    if args.smoke:  # the smoke run checks the graph, not Inductor's kernels (minutes on a CPU)
        os.environ.setdefault("RAY_FACEID_TORCH_COMPILE_BACKEND", "eager")
    generator = FluxGenerator(base, adapter, device=device, precision=generator.precision, backend="torch.compile")
    started = time.perf_counter()
    generator.warm_up([(size, size)], 1)  # as a Serve replica or `generate` builds it: CUDA graphs are captured here
    ours()
    gpu_sync()
    compile_s = time.perf_counter() - started
    compiled_s = timed(ours, args.repeats)
    graphs = counters["stats"]["unique_graphs"]
    for person in people[1:]:  # another person: their tokens are inputs, not constants of the graph
        generator.generate(PROMPT, person, steps=args.steps, width=size, height=size)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    # On CUDA the compiled transformer replays CUDA graphs; the step cache's rows run compiled without them.
    compiler = "Dynamo eager backend: smoke" if args.smoke else "Inductor, CUDA graphs" if device == "cuda" else \
        "Inductor"
    notes.append(f"Compile and first image: {compile_s:.1f} s; graphs compiled anew when the person changed "
                 f"({len(people) - 1} other people): {recompiles}.")
    row(f"ray_faceid, --backend torch.compile ({compiler})", compiled_s)
    uncached = generator.generate(PROMPT, people[0], steps=args.steps, width=size, height=size).images[0]
    from ray_faceid.pipelines.flux import FluxBase
    from ray_faceid.pipelines.flux_memory import gigabytes

    def fp8_row(weights: str, label: str) -> None:
        """A second transformer of the same weights (same seed), its linear layers in float8, beside
        the first base's text encoders and VAE; compiled; its image against the bf16 one's."""
        second = build_tiny_flux() if args.smoke else flux_dev_components(device, dtype, shared=base)
        made = FluxGenerator(FluxBase(**second.modules, tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2,
                                      scheduler=base.scheduler, model_id=base.model_id).freeze(), copy.deepcopy(adapter),
                             device=device, precision=precision, backend="torch.compile", transformer_weights=weights)
        second = None
        held = sum(t.numel() * t.element_size() for t in [*made.base.transformer.parameters(),
                                                            *made.base.transformer.buffers()])
        started = time.perf_counter()
        made.warm_up([(size, size)], 1)
        image = made.generate(PROMPT, people[0], steps=args.steps, width=size, height=size).images[0]
        gpu_sync()
        notes.append(f"{label}: compile and first image {time.perf_counter() - started:.1f} s; against the compiled "
                     f"{precision} image of the same seed {image_difference(uncached, image)}.")
        row(f"ray_faceid, torch.compile, {label} (transformer {gigabytes(held)})",
            timed(lambda: made.generate(PROMPT, people[0], steps=args.steps, width=size, height=size), args.repeats))
        made = image = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    def attempt(what, measure) -> None:
        """A row that fails is a note, and the rows after it still run (a lent GPU's minutes)."""
        try:
            measure()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            notes.append(f"{what}: failed: {type(error).__name__}: {str(error)[:300]}")
            save()

    precision = generator.precision
    if not over_budget("fp8 weights and products"):
        attempt("fp8 weights and products", lambda: fp8_row("fp8_matmul", "fp8 weights and products"))
    for threshold in [float(t) for t in args.step_cache.split(",") if t.strip()]:
        if over_budget(f"the step cache at {threshold}"):
            break
        cached = FluxGenerator(base, adapter, device=device, precision=generator.precision, backend="torch.compile",
                               step_cache=threshold)
        made = cached.generate(PROMPT, people[0], steps=args.steps, width=size, height=size)  # compiles its parts
        notes.append(f"Step cache {threshold}: {made.provenance[0]['step_cache']['steps_reused']} of {args.steps} "
                     f"steps reused; against the uncached image {image_difference(uncached, made.images[0])}.")
        row(f"ray_faceid, torch.compile (no CUDA graphs), step cache {threshold}", timed(
            lambda: cached.generate(PROMPT, people[0], steps=args.steps, width=size, height=size), args.repeats))
        cached = None
    # Serve's and render's batches: four requests of other people and seeds denoised together.
    items = [GenerationItem(PROMPT, people[k % len(people)], "", k) for k in range(4)]

    def batched():
        generator.generate_items(items, steps=args.steps, width=size, height=size)

    if not over_budget("4 people's requests in one batch"):
        generator.warm_up([(size, size)], len(items))  # the buckets up to 4 (1 is there), their CUDA graphs
        row("ray_faceid, torch.compile, 4 people's requests in one batch (per image)",
            timed(batched, args.repeats) / len(items))
    if not over_budget("fp8 weights alone"):
        attempt("fp8 weights alone", lambda: fp8_row("fp8", "fp8 weights alone"))
    report(section(), not args.no_record)


if __name__ == "__main__":
    main()
