"""The torch.compile engine on CPU: same images as eager, identity as live data (no recompile for a
new person, strength or personal adapter), and Inductor's artifacts served to a fresh process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_faceid.engines.cache import EngineCache
from ray_faceid.engines.compiled_engine import batch_bucket
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny
from ray_faceid.pipelines.schedulers import Sampler

SIZE = 16


@pytest.fixture(scope="module")
def spec():
    from ray_faceid.face.spec import EncoderSpec

    return EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)


def pipeline(spec, backend, cache=None):
    base = build_tiny()
    torch.manual_seed(0)
    adapter = IdentityAdapter.for_unet(base.unet, spec)
    with torch.no_grad():  # identity projections unlike the text ones, so identity changes the image
        for p in adapter.processors.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return IdentityPipeline(base, adapter, backend=backend, engine_cache=cache)


def people(spec):
    rng = np.random.default_rng(0)
    return [IdentityCondition(f"p{i}", rng.normal(size=(2, spec.dim)).astype(np.float32)) for i in range(3)]


def personal_delta(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter.processors.state_dict().items()}


def image(pipe, person, sampler=None):
    result = pipe.generate("a photo of a person", [person], seed=3, steps=2, width=SIZE, height=SIZE, sampler=sampler)
    return np.asarray(result.images[0]).astype(int)


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 40)] == [1, 2, 4, 8, 8, 16, 16, 16]


def test_a_new_person_strength_or_personal_adapter_never_recompiles(spec, tmp_path, inductor):
    from torch._dynamo.utils import counters

    compiled = pipeline(spec, "torch.compile", EngineCache(tmp_path))
    eager = pipeline(spec, "torch")
    report = compiled.warm_up([(SIZE, SIZE)], [1], max_images=1)
    assert report["buckets"] == 1 and report["stored"] == 1
    a, b, c = people(spec)
    requests = [a, b, c, IdentityCondition("a weaker", a.embeddings, scale=0.4),
                IdentityCondition("a strong", a.embeddings, scale=1.6)]
    for seed in (1, 2):
        requests.append(IdentityCondition("b own", b.embeddings,
                                          personal=(f"v{seed}", personal_delta(compiled.adapter, seed))))
    graphs_before = counters["stats"]["unique_graphs"]
    images = {}
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile is an error, not a slow call
        for person in requests:
            images[person.name] = image(compiled, person)
            want = image(eager, person)
            assert np.abs(images[person.name] - want).max() <= 1, person.name
        # a scheduler is outside the graph: float sigmas-scaled timesteps (Euler, DPM++ Karras), ancestral
        # noise, and the tiny base's DDIM integer ones above, all run the one compiled UNet
        for name in ("euler", "dpm++2m-karras", "euler-a"):
            sampler = Sampler.parse(name)
            got, want = image(compiled, a, sampler), image(eager, a, sampler)
            assert np.abs(got - want).max() <= 1, name
            assert np.abs(got - images[a.name]).max() > 2, f"{name} gave the base scheduler's image"
    assert counters["stats"]["unique_graphs"] == graphs_before
    # identity really is live: every person, strength and personal adapter gives another image
    names = list(images)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert np.abs(images[x] - images[y]).max() > 2, (x, y)


def test_the_compile_cli_writes_artifacts_a_fresh_process_serves_from(spec, tmp_path, inductor):
    """`ray-faceid compile --backend torch.compile`, then a new process with an empty Inductor cache:
    it loads the artifacts, compiles from them (cache hits, no code generation) and gives the eager image."""
    engines = tmp_path / "engines"
    # The build shares the session's Inductor cache (the test above compiled this very shape): what
    # is checked is the fresh process below, whose cache starts empty and is filled from the artifacts.
    env = dict(os.environ)
    cli = [sys.executable, "-c", "from ray_faceid.cli import app; app()"]
    built = subprocess.run([*cli, "compile", "--backend", "torch.compile", "--size", f"{SIZE}x{SIZE}", "--batch", "2:2:2",
                            "--out", str(engines)], env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "stored: 1" in " ".join(built.stdout.split())  # rich wraps lines
    script = f"""
import json, numpy as np, torch
from torch._dynamo.utils import counters
from ray_faceid.engines.cache import EngineCache
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny
from ray_faceid.pipelines.schedulers import Sampler
images = {{}}
for backend in ("torch.compile", "torch"):
    base = build_tiny()
    adapter = IdentityAdapter.for_unet(base.unet, FaceAnalyzer().spec)
    pipe = IdentityPipeline(base, adapter, backend=backend, engine_cache=EngineCache({str(engines)!r}))
    report = pipe.warm_up([({SIZE}, {SIZE})], [1], max_images=1)
    if backend == "torch.compile":
        compiled_report = report
    person = IdentityCondition("p", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    out = pipe.generate("a person", [person], seed=1, steps=2, width={SIZE}, height={SIZE})
    images[backend] = np.asarray(out.images[0]).astype(int)
print(json.dumps({{"report": compiled_report, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "diff": int(np.abs(images["torch.compile"] - images["torch"]).max())}}))
"""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-b"))
    fresh = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["report"] == {"loaded": 1, "stored": 0, "buckets": 1}
    assert result["hits"] >= 1 and result["misses"] == 0
    assert result["diff"] <= 1


def test_an_unwarmed_size_runs_eager_instead_of_compiling_in_its_request(spec, tmp_path, monkeypatch):
    """What Serve does after its warm-up: a new size never compiles inline (no recompile, no new shape).
    The images say which torch.compile backend made them (RAY_FACEID_TORCH_COMPILE_BACKEND)."""
    monkeypatch.setenv("RAY_FACEID_TORCH_COMPILE_BACKEND", "aot_eager")
    compiled, eager = pipeline(spec, "torch.compile", EngineCache(tmp_path)), pipeline(spec, "torch")
    compiled.warm_up([(SIZE, SIZE)], [1], max_images=1)
    compiled.compile_new_shapes = False
    person = people(spec)[0]
    warmed = compiled.generate("a photo", [person], seed=3, steps=1, width=SIZE, height=SIZE).provenance[0]
    assert warmed["backend"] == "torch.compile" and warmed["compiler"] == "aot_eager"
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate("a photo", [person], seed=3, steps=2, width=24, height=24)
    want = eager.generate("a photo", [person], seed=3, steps=2, width=24, height=24)
    assert np.abs(np.asarray(got.images[0]).astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
    assert len(compiled.compiled_engine().slots) == 1
    # Guidance 1 (few-step models) runs one row per image: the warmed two-row bucket runs it, padded.
    engine, calls = compiled.compiled_engine(), []
    run = engine.compiled
    engine.compiled = lambda **inputs: calls.append(inputs["sample"].shape[0]) or run(**inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate("a photo", [person], seed=3, steps=2, guidance=1.0, width=SIZE, height=SIZE)
    want = eager.generate("a photo", [person], seed=3, steps=2, guidance=1.0, width=SIZE, height=SIZE)
    assert np.abs(np.asarray(got.images[0]).astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
    assert calls == [2, 2] and len(engine.slots) == 1


def test_a_full_engine_evicts_its_least_recently_used_shape(spec, monkeypatch):
    from ray_faceid.engines import compiled_engine
    from ray_faceid.engines.base import EngineShape

    monkeypatch.setattr(compiled_engine, "MAX_SLOTS", 2)
    base = build_tiny()
    IdentityAdapter.for_unet(base.unet, spec).install(base.unet)
    engine = compiled_engine.CompiledUNetEngine(base.unet, compiler="eager")  # the slot logic, not Inductor
    for latent in (2, 3, 2, 4):  # 3 is the least recently used when 4 arrives
        shape = EngineShape(batch=(2, 2, 2), latent=(latent, latent), identities=1, tokens=4, text_length=32,
                            channels=4, cross_dim=32)
        assert engine(**shape.example(2)).shape == (2, 4, latent, latent)
    assert engine.evicted == 1 and [key[2][1][1:] for key in engine.slots] == [(2, 2), (4, 4)]


def test_warm_up_beyond_the_engines_budget_is_refused_when_the_config_is_read():
    from pydantic import ValidationError

    from ray_faceid.config import ServeConfig

    ServeConfig(backend="torch.compile", warm_up_sizes=["512x512", "768x768"], warm_up_identities=[1, 2])
    with pytest.raises(ValidationError, match="compiled shapes; an engine keeps 16"):
        ServeConfig(backend="torch.compile", warm_up_sizes=["512x512", "768x768", "1024x1024"],
                    warm_up_identities=[1, 2])


def test_an_unknown_torch_compile_backend_is_refused_in_one_line(spec, monkeypatch):
    from ray_faceid.errors import BadInput

    monkeypatch.setenv("RAY_FACEID_TORCH_COMPILE_BACKEND", "nonesuch")
    with pytest.raises(BadInput, match="no backend 'nonesuch'.*known: .*inductor"):
        pipeline(spec, "torch.compile").compiled_engine()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph capture path needs CUDA")
def test_cuda_graphs_replay_new_people_and_personal_adapters_as_data(spec, tmp_path, perturbed_pipeline, inductor):
    """On CUDA each bucket is captured once; a new person or personal adapter replays the same graph."""
    from torch._dynamo.utils import counters

    def on_cuda(backend):
        return perturbed_pipeline(spec, backend, EngineCache(tmp_path), device="cuda", precision="fp32")

    compiled, eager = on_cuda("torch.compile"), on_cuda("torch")
    compiled.warm_up([(SIZE, SIZE)], [1], max_images=1)
    assert compiled.compiled_engine().graphs == 1
    a, b, _ = people(spec)
    own = IdentityCondition("b own", b.embeddings, personal=("v1", personal_delta(compiled.adapter, 1)))
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for person in (a, b, own):
            assert np.abs(image(compiled, person) - image(eager, person)).max() <= 2, person.name
    assert counters["stats"]["unique_graphs"] == graphs and compiled.compiled_engine().graphs == 1
