"""Seconds per image on one GPU: plain diffusers vs ray_faceid eager vs the torch.compile engine.

SD1.5-shaped components (random weights: the speed of a real SD1.5 checkpoint is the same),
fp16, DDIM, CFG 5, one identity (decoupled processors) unless a row says otherwise. In one run:

(a) diffusers `StableDiffusionPipeline` on the same modules, stock processors, eager;
(b) ray_faceid eager (`--backend torch`); (c) ray_faceid `--backend torch.compile`;
(d) switching person, strength or personal adapter on the warm compiled engine (ms, recompiles);
(e) cold start, process start to ready and to first image, with and without the cached
    Inductor artifacts (the first from this process, the second from a fresh one);
(f) images/s through the Generator's batching (`generate_items` per batch, as the Serve
    replica calls it, without HTTP and Ray) at 16 concurrent one-image requests, batched 4 at a
    time vs one by one;
(g) UNet calls (ms) at batch 2 and 8: stock vs each identity method, eager; stock and decoupled compiled.

`--adapter faceid` measures a published adapter instead: an IP-Adapter-FaceID file in its authors'
layout at the published size (512-d ArcFace, 4 tokens, its LoRA of rank 128, random weights),
diffusers' own path (`load_ip_adapter`, the LoRA through PEFT, `ip_adapter_image_embeds`) against
ray_faceid eager and compiled loading the same file, seconds per image (1 and 4 images).

    python benchmarks/gpu_generate.py [--out results.md] [--no-record]      # on a GPU
    python benchmarks/gpu_generate.py --family sdxl                          # SDXL-shaped, 1024 px by default
    python benchmarks/gpu_generate.py --adapter faceid [--family sdxl]        # a published FaceID file
    python benchmarks/gpu_generate.py --smoke --no-record                   # the same code on CPU, tiny

`--family sdxl` builds SDXL's UNet, both CLIP text encoders and its VAE from their published
configs with random weights (timing needs no trained weights) and compares against diffusers'
`StableDiffusionXLPipeline` on the same modules.
"""
from __future__ import annotations

import time

STARTED = time.time()  # before torch is imported: "process start" in the cold-start rows

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

PROMPT = "a photo of a person smiling, studio light"


def sd15_components(device):
    """SD1.5's UNet, VAE and text encoder shapes, built on the device (fast), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from pipeline_overhead import sd15_unet
    from transformers import CLIPTextConfig, CLIPTextModel

    from ray_faceid.pipelines.models import BaseModel
    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), sample_size=512)
        tokenizer = tiny_tokenizer(max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, "sd15-shaped (random)", untrained=True).freeze()


def sdxl_components(device):
    """SDXL base 1.0's UNet, text encoders and VAE shapes (their published configs), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ray_faceid.pipelines.models import BaseModel
    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025,
                            force_upcast=True)
        tokenizer = tiny_tokenizer(max_length=77)
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, hidden_act="quick_gelu", **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
            hidden_act="gelu", **common))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, "sdxl-shaped (random)", untrained=True,
                     text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(max_length=77),
                     zero_empty_prompt=True).freeze()


def diffusers_pipeline(base):
    """What a user would run instead of us: diffusers' own pipeline of the family, same modules."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    if base.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                         scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(args):
    from pipeline_overhead import SPEC

    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.models import build_tiny

    if args.smoke:
        base = build_tiny(family=args.family if args.family == "sdxl" else "sd1")
    else:
        base = sdxl_components(args.device) if args.family == "sdxl" else sd15_components(args.device)
    adapter = IdentityAdapter.for_unet(base.unet, SPEC)
    with torch.no_grad():  # identity projections unlike the text ones, so identity changes the image
        for p in adapter.processors.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return base, adapter


def people(n, dim=128, seed=0):
    from ray_faceid.pipelines.generate import IdentityCondition

    rng = np.random.default_rng(seed)
    return [IdentityCondition(f"person{seed}-{i}", rng.normal(size=(2, dim)).astype(np.float32) * 0.1) for i in range(n)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warm_ups: int = 1) -> float:
    """Median seconds of fn() after `warm_ups` calls."""
    for _ in range(warm_ups):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(pipe, person, images, args, seed=0):
    from ray_faceid.pipelines.generate import GenerationItem

    items = [GenerationItem(PROMPT, [person], "", seed + k) for k in range(images)]
    return pipe.generate_items(items, args.steps, 5.0, args.size, args.size)


def compile_shapes(pipe, args, images=(1, 4)):
    """One bucket per batch measured: 2 (one image, CFG's two rows), 8 (four images)."""
    one = pipe.engine_shape(args.size, args.size, 1, 1)
    return [dataclasses.replace(one, batch=(2 * n,) * 3) for n in images]


def warm_compiled(pipe, args, cache, images=(1, 4)) -> dict:
    pipe.engine_cache = cache
    return pipe.warm_up_shapes(compile_shapes(pipe, args, images))


def cold_start(args, cache_dir: str) -> dict:
    """This script in a fresh process with fresh Inductor and Triton caches: start -> ready -> first image."""
    tmp = tempfile.mkdtemp(prefix="cold_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton")
    command = [sys.executable, __file__, "--cold-start", cache_dir, "--size", str(args.size), "--steps", str(args.steps),
               "--family", args.family]
    if args.smoke:
        command.append("--smoke")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cold_start_child(args) -> None:
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.pipelines.generate import IdentityPipeline

    process_start = STARTED
    base, adapter = build(args)
    pipe = IdentityPipeline(base, adapter, device=args.device, backend="torch.compile", precision=args.precision)
    warm = warm_compiled(pipe, args, EngineCache(args.cold_start))
    sync()
    ready = time.time() - process_start
    ours(pipe, people(1)[0], 1, args)
    sync()
    print(json.dumps({"ready_s": ready, "first_image_s": time.time() - process_start, **warm}))


def attempt(label, fn, lines):
    try:
        lines += fn()
    except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others' results
        traceback.print_exc()
        lines.append(f"{label}: failed: {type(exc).__name__}: {str(exc)[:300]}")
    lines.append("")
    print("\n".join(lines[-12:]), flush=True)


def generation_rows(args, base, adapter, cache, out):
    from torch._dynamo.utils import counters

    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline

    results = {}
    # (c, e) first, in a process that has compiled nothing yet: the cold start without artifacts.
    process_start = STARTED
    compiled = IdentityPipeline(base, adapter, device=args.device, backend="torch.compile", precision=args.precision)
    warm = warm_compiled(compiled, args, cache)
    sync()
    cold = {"ready_s": time.time() - process_start, **warm}
    person = people(1)[0]
    ours(compiled, person, 1, args)
    sync()
    cold["first_image_s"] = time.time() - process_start
    for images in (1, 4):
        results[("compiled", images)] = timed(lambda: ours(compiled, person, images, args), args.repeats)
    compiled_image = np.asarray(ours(compiled, person, 1, args).images[0]).astype(int)

    # (d) switching person / strength / personal adapter on the warm engine: 0 recompiles allowed.
    graphs = counters["stats"]["unique_graphs"]
    same = timed(lambda: ours(compiled, person, 1, args), args.repeats)
    fresh = iter(people(16, seed=7))
    with torch._dynamo.config.patch(error_on_recompile=True):
        new_person = timed(lambda: ours(compiled, next(fresh), 1, args), args.repeats)
        strengths = iter([0.3, 0.6, 0.9, 1.2, 1.5])
        new_scale = timed(lambda: ours(compiled, IdentityCondition("s", person.embeddings, scale=next(strengths)), 1,
                                       args), args.repeats)
        delta = {k: 0.01 * torch.randn_like(v).half().cpu() for k, v in adapter.processors.state_dict().items()}
        versions = iter(range(100))
        new_personal = timed(lambda: ours(compiled, IdentityCondition(
            "own", person.embeddings, personal=(f"v{next(versions)}", delta)), 1, args), args.repeats)
    recompiles = counters["stats"]["unique_graphs"] - graphs

    # (f) the Generator's batching: 16 one-image requests, batched 4 at a time vs one by one.
    requests = people(16, seed=11)
    unbatched = timed(lambda: [ours(compiled, p, 1, args) for p in requests], 1)
    from ray_faceid.pipelines.generate import GenerationItem

    def batched():
        for i in range(0, 16, 4):
            compiled.generate_items([GenerationItem(PROMPT, [p], "", 0) for p in requests[i:i + 4]], args.steps, 5.0,
                                    args.size, args.size)
    batched_s = timed(batched, 1)
    out["engine"] = compiled.compiled_engine()  # its buckets 2 and 8 serve the compiled UNet-call rows

    # (b) eager with one identity; (a) plain diffusers on the same modules, stock processors.
    eager = IdentityPipeline(base, adapter, device=args.device, backend="torch", precision=args.precision)
    for images in (1, 4):
        results[("eager", images)] = timed(lambda: ours(eager, person, images, args), args.repeats)
    same_image = int(np.abs(np.asarray(ours(eager, person, 1, args).images[0]).astype(int) - compiled_image).max())
    IdentityAdapter.remove(base.unet)
    sd = diffusers_pipeline(base)
    for images in (1, 4):
        results[("diffusers", images)] = timed(lambda: sd([PROMPT] * images, num_inference_steps=args.steps,
                                                          guidance_scale=5.0, height=args.size, width=args.size),
                                               args.repeats)
    adapter.install(base.unet)

    warm_start = cold_start(args, str(cache.root)) if not args.skip_cold_start else None
    rows = [f"Generation, {args.size}x{args.size}, {args.steps} DDIM steps, CFG 5, {args.precision}; median of "
            f"{args.repeats} after a warm-up (ours includes PNG + provenance encoding):", "",
            "| what | 1 image (s) | 4 images in one batch (s) | s / image at 4 | vs diffusers at 1 | vs diffusers at 4 |",
            "|---|---|---|---|---|---|"]
    for key, label in (("diffusers", f"(a) diffusers {type(sd).__name__}, no identity, eager"),
                       ("eager", "(b) ray_faceid eager, one identity"),
                       ("compiled", "(c) ray_faceid torch.compile + CUDA graphs, one identity")):
        one, four = results[(key, 1)], results[(key, 4)]
        rows.append(f"| {label} | {one:.3f} | {four:.3f} | {four / 4:.3f} | "
                    f"{results[('diffusers', 1)] / one:.2f}x | {results[('diffusers', 4)] / four:.2f}x |")
    engine = out["engine"]
    rows += ["", f"Compiled shapes replaying from CUDA graphs: {engine.graphs} of {len(engine.slots)}; the compiled "
             f"image differs from the eager one by at most {same_image}/255 per pixel.", "",
             f"(d) switching on the warm compiled engine (1 image, {args.steps} steps): same person {same:.3f} s; "
             f"a new person each call {new_person:.3f} s ({1000 * (new_person - same):+.1f} ms); a new strength "
             f"{new_scale:.3f} s ({1000 * (new_scale - same):+.1f} ms); a new personal adapter {new_personal:.3f} s "
             f"({1000 * (new_personal - same):+.1f} ms); recompiles: {recompiles} (error_on_recompile on).",
             "",
             f"(e) cold start (process start -> engines ready -> first image): without cached artifacts "
             f"{cold['ready_s']:.1f} s -> {cold['first_image_s']:.1f} s ({cold['buckets']} buckets compiled); "
             + ("not measured" if warm_start is None else
                f"with them, in a fresh process with empty Inductor/Triton caches {warm_start['ready_s']:.1f} s -> "
                f"{warm_start['first_image_s']:.1f} s (artifacts loaded: {warm_start['loaded']})") + ".",
             "",
             f"(f) 16 concurrent one-image requests on the compiled engine: one by one {16 / unbatched:.2f} images/s, "
             f"batched 4 per UNet batch {16 / batched_s:.2f} images/s ({unbatched / batched_s:.2f}x)."]
    out["generation"] = {k[0] + str(k[1]): v for k, v in results.items()}
    return rows


def unet_rows(args, base, adapter, engine):
    """(g) ms per UNet call: stock vs each identity method (eager), stock and decoupled compiled."""
    from pipeline_overhead import SPEC

    from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
    from ray_faceid.identity.context import identity_kwargs
    from ray_faceid.identity.routing import box_masks, strip_boxes

    unet, dtype, device = base.unet, base.unet.dtype, args.device
    latent, c = args.size // base.vae_scale_factor, unet.config.cross_attention_dim
    variants = [("stock", None, 1), ("decoupled", AdapterOptions(method="decoupled"), 1),
                ("PVA", AdapterOptions(method="pva"), 1), ("decoupled + SAA gate", AdapterOptions(gate=True), 1),
                ("2-identity routing (decoupled)", AdapterOptions(method="decoupled"), 2)]
    table = {}
    for batch in (2, 8):
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
        text = torch.randn(batch, base.tokenizer.model_max_length, c, generator=g).to(device, dtype)
        t = torch.tensor(500, device=device)
        added = added_conditioning(base, batch, device, dtype)
        for name, options, m in variants:
            if options is None:
                IdentityAdapter.remove(unet)
                kwargs = None
            else:
                IdentityAdapter.for_unet(unet, SPEC, options).to(device, dtype).install(unet)
                scale = torch.ones(batch, m, device=device, dtype=dtype)
                scale[: batch // 2] = 0
                masks = None if m == 1 else box_masks(strip_boxes(2), latent, latent).expand(batch, -1, -1, -1)
                kwargs = identity_kwargs(torch.randn(batch, m, 4, c, device=device, dtype=dtype), scale,
                                         None if masks is None else masks.to(device, dtype))
            with torch.no_grad():
                table[(name, batch, "eager")] = timed(
                    lambda: unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs, **added), 20, 3)
        adapter.install(unet)
    compiled_note = "compiled: not measured"
    switch = ""
    if engine is not None:
        for batch in args.compiled_batches:
            x = {k: v for k, v in base_example(base, batch, device, dtype).items()}
            x["identity_scale"][: batch // 2] = 0
            table[("decoupled", batch, "compiled")] = timed(lambda: engine(**x), 20, 3)
        switch = call_switch_cost(engine, x)
        compiled_note = "decoupled compiled: measured"
        if time.time() - STARTED < args.compile_budget_s:  # the stock UNet compiled the same way, for reference
            IdentityAdapter.remove(unet)
            stock = torch.compile(unet, fullgraph=True, mode="reduce-overhead")
            for batch in (2, 8):
                x = base_example(base, batch, device, dtype)
                with torch.no_grad():
                    table[("stock", batch, "compiled")] = timed(
                        lambda: stock(x["sample"], x["timestep"], encoder_hidden_states=x["text_tokens"],
                                      **added_conditioning(base, batch, device, dtype)).sample.clone(), 20)
            adapter.install(unet)
            compiled_note = "stock and decoupled compiled: measured"
    rows = [f"(g) UNet call, {args.size}x{args.size}, {args.precision}, ms (median of 20); half the rows have identity "
            f"scale 0 (CFG); {compiled_note}:", "",
            "| variant | batch 2 eager | vs stock | batch 8 eager | vs stock | batch 2 compiled | batch 8 compiled |",
            "|---|---|---|---|---|---|---|"]
    rows_after = [switch] if switch else []
    for name, _, _ in variants:
        cells = [name]
        for batch in (2, 8):
            ms = 1000 * table[(name, batch, "eager")]
            cells += [f"{ms:.1f}", f"{100 * (table[(name, batch, 'eager')] / table[('stock', batch, 'eager')] - 1):+.0f}%"]
        cells += [f"{1000 * table[(name, b, 'compiled')]:.1f}" if (name, b, "compiled") in table else "-" for b in (2, 8)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows + ([""] + rows_after if rows_after else [])


def call_switch_cost(engine, x) -> str:
    """ms per compiled UNet call with the same identity inputs vs a new person's tokens, a new
    strength, each call (copied into the bucket's buffers); recompiles are errors."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    same = timed(lambda: engine(**x), 50, 3)
    tokens = iter([torch.randn_like(x["identity_tokens"]) for _ in range(60)])
    scales = iter([x["identity_scale"] * (1 + k / 10) for k in range(60)])
    with torch._dynamo.config.patch(error_on_recompile=True):
        person = timed(lambda: engine(**{**x, "identity_tokens": next(tokens)}), 50, 3)
        strength = timed(lambda: engine(**{**x, "identity_scale": next(scales)}), 50, 3)
    return (f"(d, per UNet call at batch {x['sample'].shape[0]}) same identity {1000 * same:.2f} ms; a new person's "
            f"tokens {1000 * person:.2f} ms ({1000 * (person - same):+.2f}); a new strength {1000 * strength:.2f} ms "
            f"({1000 * (strength - same):+.2f}); recompiles: {counters['stats']['unique_graphs'] - graphs}.")


def added_conditioning(base, batch, device, dtype) -> dict:
    """SDXL's pooled text embedding and time ids for a stock UNet call (nothing for SD 1.x)."""
    if base.family != "sdxl":
        return {}
    ids = torch.tensor([[ARGS.size, ARGS.size, 0, 0, ARGS.size, ARGS.size]], dtype=dtype, device=device)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, base.pooled_dim, device=device, dtype=dtype),
                                  "time_ids": ids.expand(batch, 6)}}


def base_example(base, batch, device, dtype):
    from ray_faceid.engines.base import EngineShape

    latent = ARGS.size // base.vae_scale_factor
    shape = EngineShape(batch=(batch, batch, batch), latent=(latent, latent), identities=1, tokens=4,
                        text_length=base.tokenizer.model_max_length, channels=4,
                        cross_dim=base.unet.config.cross_attention_dim, pooled_dim=base.pooled_dim)
    return shape.example(batch, device, dtype)


def faceid_rows(args, progress) -> list[str]:
    """Seconds per image with a published IP-Adapter-FaceID file: diffusers' own path vs ours,
    eager and compiled, each on its own copy of the same base (ours fuses the file's LoRA into the
    UNet's weights; diffusers keeps it beside them through PEFT). `progress(rows)` gets the table
    after every measurement, so a run cut short keeps what it measured."""
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.identity.stand_ins import faceid_state_dict, save
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline

    embed = 16 if args.smoke else 512
    spec = EncoderSpec(name="arcface_w600k_r50", dim=embed, version="insightface", license="-", metric="cosine",
                       threshold=0.6)
    rank = 4 if args.smoke else 128  # the published files' LoRA rank
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    folder = Path(tempfile.mkdtemp(prefix="faceid_"))
    base, _ = build(args)
    path = save(faceid_state_dict(base.unet, tokens=4, hidden=2 * embed, rank=rank, embed=embed),
                folder / f"ip-adapter-faceid_{'sdxl' if base.family == 'sdxl' else 'sd15'}.bin")
    rng = np.random.default_rng(0)
    faces = rng.normal(size=(max(args.images), 1, embed)).astype(np.float32)
    faces /= np.linalg.norm(faces, axis=-1, keepdims=True)
    results, differs = {}, {}
    labels = {"diffusers": "diffusers {pipe} + load_ip_adapter (LoRA through PEFT), eager",
              "torch": "ray_faceid eager (LoRA fused at load)",
              "torch.compile": "ray_faceid torch.compile" + (" + CUDA graphs" if args.device == "cuda" else
                                                             " (Inductor on the CPU)")}

    def table(pipe_name: str, compile_s: float | None = None) -> list[str]:
        rows = [f"IP-Adapter-FaceID ({base.family}, the published layout: {embed}-d ArcFace, 4 tokens, LoRA rank "
                f"{rank}), {args.size}x{args.size}, {args.steps} DDIM steps, CFG 5, {args.precision}; median of "
                f"{args.repeats} after a warm-up (ours includes PNG + provenance encoding):", "",
                "| what | " + " | ".join(f"{n} image{'s' * (n > 1)} (s)" for n in args.images) + " | "
                + " | ".join(f"vs diffusers at {n}" for n in args.images) + " |",
                "|---" * (1 + 2 * len(args.images)) + "|"]
        for key, label in labels.items():
            if (key, args.images[0]) in results:
                seconds = [results.get((key, n)) for n in args.images]
                rows.append(f"| {label.format(pipe=pipe_name)} | "
                            + " | ".join("-" if s is None else f"{s:.3f}" for s in seconds) + " | "
                            + " | ".join("-" if s is None else f"{results[('diffusers', n)] / s:.2f}x"
                                         for n, s in zip(args.images, seconds)) + " |")
        rows.append("")
        if compile_s is not None:
            rows.append(f"Compiling the {len(args.images)} bucket(s): {compile_s:.0f} s.")
        if differs:
            rows.append("The same person and seed, one image, difference per pixel (max / mean, of 255): "
                        + "; ".join(f"{what} {m} / {a:.2f}" for what, (m, a) in differs.items())
                        + ". Fusing a LoRA into the weights rounds differently from adding it beside them, and "
                          "a random-weight UNet amplifies rounding over the steps: diffusers' own fuse_lora "
                          "against its unfused path is the floor for a fused engine.")
        return rows

    def difference(a, b) -> tuple[int, float]:
        d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        return int(d.max()), float(d.mean())

    # diffusers' own path on its own copy of the base.
    reference, _ = build(args)
    pipe = diffusers_pipeline(reference).to(args.device, dtype)
    pipe_name = type(pipe).__name__
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=Path(path).name, image_encoder_folder=None)

    def theirs_image():
        embeds = torch.cat([torch.zeros(1, 1, embed), torch.from_numpy(faces[:1])])  # the negative, then the face
        image = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
                     ip_adapter_image_embeds=[embeds.to(args.device, dtype)], generator=torch.Generator().manual_seed(0),
                     output_type="np").images[0]
        return np.round(image * 255).astype(int)

    for images in args.images:
        embeds = torch.cat([torch.zeros(images, 1, embed), torch.from_numpy(faces[:images])])  # negatives, then faces
        kwargs = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
                      ip_adapter_image_embeds=[embeds.to(args.device, dtype)])
        results[("diffusers", images)] = timed(lambda: pipe([PROMPT] * images, **kwargs), args.repeats)
        print(f"diffusers, {images} images: {results[('diffusers', images)]:.3f} s", flush=True)
        progress(table(pipe_name))
    theirs = theirs_image()
    pipe.fuse_lora()
    theirs_fused = theirs_image()
    differs["diffusers fused vs diffusers"] = difference(theirs_fused, theirs)
    pipe = reference = None
    adapter = IdentityAdapter.load(path, base.unet, spec)
    person = IdentityCondition("p0", faces[0])
    compile_s = None
    for backend in ("torch", "torch.compile"):
        ours_pipe = IdentityPipeline(base, adapter, device=args.device, backend=backend, precision=args.precision)
        if backend == "torch.compile":
            started = time.perf_counter()
            warm_compiled(ours_pipe, args, EngineCache(tempfile.mkdtemp(prefix="engines_")), args.images)
            compile_s = time.perf_counter() - started
        image = ours(ours_pipe, person, 1, args).images[0]
        differs[f"{labels[backend].split(' (')[0]} vs diffusers"] = difference(image, theirs)
        differs[f"{labels[backend].split(' (')[0]} vs diffusers fused"] = difference(image, theirs_fused)
        progress(table(pipe_name, compile_s))
        for images in args.images:
            results[(backend, images)] = timed(lambda: ours(ours_pipe, person, images, args), args.repeats)
            print(f"ray_faceid {backend}, {images} images: {results[(backend, images)]:.3f} s", flush=True)
            progress(table(pipe_name, compile_s))
    return table(pipe_name, compile_s)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1", help="base shapes: SD 1.5 or SDXL")
    parser.add_argument("--size", type=int, default=None, help="image side; default: the family's (512, SDXL 1024)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-budget-s", type=float, default=300,
                        help="skip the compiled UNet-call rows once the run has taken this long")
    parser.add_argument("--adapter", choices=("ours", "faceid"), default="ours",
                        help="ours: our identity adapter (every part); faceid: a published IP-Adapter-FaceID file")
    parser.add_argument("--images", default="1,4", help="--adapter faceid: images per call measured")
    parser.add_argument("--parts", default="generation,unet", help="generation and/or unet")
    parser.add_argument("--compiled-batches", default="2,8", help="UNet-call rows: compiled batch sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny model (the script's own check, any device)")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--cold-start", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the section and raw figures here (FILE.md, FILE.json)")
    parser.add_argument("--no-record", action="store_true")
    args = ARGS = parser.parse_args()
    args.size = args.size or (1024 if args.family == "sdxl" else 512)
    args.compiled_batches = [int(b) for b in args.compiled_batches.split(",")]
    args.images = [int(n) for n in args.images.split(",")]
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.precision = "fp16" if args.device == "cuda" else "fp32"
    if args.cold_start:
        return cold_start_child(args)
    from ray_faceid.engines.cache import EngineCache

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    base, adapter = build(args) if args.adapter == "ours" else (None, None)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    which = args.family + (", --adapter faceid" if args.adapter == "faceid" else "")
    lines = [f"### gpu_generate ({which}) — {time.strftime('%Y-%m-%d')} — {device}, torch {torch.__version__}, diffusers "
             f"{__import__('diffusers').__version__}; {machine_line()}" + (" (SMOKE: tiny model)" if args.smoke else ""),
             ""]
    raw = {}
    cache = EngineCache(tempfile.mkdtemp(prefix="engines_"))
    def save():  # after every part: a run cut short still leaves what it measured
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                {k: v for k, v in raw.items() if k != "engine"}, indent=2))

    if args.adapter == "faceid":
        measured: list[str] = []  # the table so far: kept if a later part fails

        def progress(rows):
            measured[:] = rows
            if args.out:
                Path(args.out).write_text("\n".join(lines + rows) + "\n")

        def faceid():
            try:
                return faceid_rows(args, progress)
            except Exception:
                lines.extend(measured)
                raise
        attempt("faceid", faceid, lines)
        save()
        return report(lines, not args.no_record)
    if "generation" in args.parts:
        attempt("generation", lambda: generation_rows(args, base, adapter, cache, raw), lines)
        save()
    elif "unet" in args.parts:  # the compiled rows need an engine: compile the measured buckets here
        from ray_faceid.engines.compiled_engine import CompiledUNetEngine

        base.to(args.device, torch.float16 if args.precision == "fp16" else None)
        adapter.to(args.device, base.unet.dtype).install(base.unet)
        raw["engine"] = CompiledUNetEngine(base.unet)
    attempt("unet calls", lambda: unet_rows(args, base, adapter, raw.pop("engine", None)), lines)
    save()
    report(lines, not args.no_record)


ARGS = None
if __name__ == "__main__":
    main()
