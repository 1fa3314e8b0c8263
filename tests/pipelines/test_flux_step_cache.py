"""FLUX's optional step cache (first-block caching): off, or with a threshold nothing passes, it is
FLUX's own image; on, the steps it reuses skip the other blocks and are recorded per image; a row's
image is the one it gets alone whoever shares its batch and whatever another request runs between
its steps; compiled, it compiles its two parts once."""
import numpy as np
import pytest
import torch

from ray_faceid.errors import BadInput
from ray_faceid.identity.flux_adapter import load_flux_adapter
from ray_faceid.pipelines.flux import load_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition
from tests.pipelines.test_flux_identity import SIZE, embedding, files  # noqa: F401 - files: a fixture

STEPS = 6
LOOSE = 0.5  # tiny-flux's first block moves a lot between steps: most steps pass only a loose threshold


def generator(files, **kwargs) -> FluxGenerator:  # noqa: F811
    base = load_flux(str(files / "flux"))
    return FluxGenerator(base, load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer), **kwargs)


def made(gen, people, prompt="a portrait", seed=3):
    result = gen.generate(prompt, people, seed=seed, steps=STEPS, width=SIZE, height=SIZE)
    return np.asarray(result.images[0]).astype(int), result.provenance[0]


def test_the_split_transformer_is_fluxs_own_and_a_cache_nothing_passes_changes_nothing(files):  # noqa: F811
    from ray_faceid.pipelines.flux_step_cache import FluxStages, StepCache

    gen = generator(files)
    people = [IdentityCondition("a", embedding(1), region=(0.0, 0.0, 0.5, 1.0)), IdentityCondition("b", embedding(2))]
    states, pooled = gen.encode_prompt(["a portrait", "a photo"])
    inputs = dict(hidden_states=torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0)),
                  timestep=torch.full([2], 0.7), guidance=torch.full([2], 3.5), pooled_projections=pooled,
                  encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3),
                  img_ids=torch.tensor([[0, i // 4, i % 4] for i in range(16)], dtype=torch.float32),
                  joint_attention_kwargs=gen.identity_inputs([people, people[:1]], 8, 8))
    with torch.no_grad():
        want = gen.base.transformer(**inputs, return_dict=False)[0]
        stages = FluxStages(gen.base.transformer)
        got = StepCache(0.1, 2)(stages.head, stages.tail, stages, **dict(inputs))[0]
    assert torch.equal(got, want)  # the same modules in the same order
    uncached, _ = made(gen, people)
    tight, record = made(generator(files, step_cache=1e-9), people)
    assert np.array_equal(tight, uncached) and record["step_cache"] == {"threshold": 1e-9, "steps_reused": 0}


def test_reused_steps_skip_the_other_blocks_and_each_row_is_its_own(files):  # noqa: F811
    gen = generator(files, step_cache=LOOSE)
    tails = []
    tail = gen.tail
    gen.tail = lambda *a, **k: tails.append(1) or tail(*a, **k)
    person = [IdentityCondition("a", embedding(1))]
    cached, record = made(gen, person)
    reused = record["step_cache"]["steps_reused"]
    assert 0 < reused < STEPS and len(tails) == STEPS - reused  # the first step always runs them all
    uncached, _ = made(generator(files), person)
    assert 0 < np.abs(cached - uncached).max() <= 64  # near FLUX's own image, not it (measured in benchmarks/)
    # Rows of other people and prompts in one batch: each row's cache is its own.
    items = [GenerationItem("a portrait", person, seed=3), GenerationItem("a beach", [], seed=4),
             GenerationItem("a photo", [IdentityCondition("b", embedding(2), scale=0.5)], seed=5)]
    batch = gen.generate_items(items, steps=STEPS, width=SIZE, height=SIZE)
    for k, item in enumerate(items):
        alone, record = made(gen, item.identities, item.prompt, item.seed)
        assert np.abs(np.asarray(batch.images[k]).astype(int) - alone).max() <= 1, k
        assert batch.provenance[k]["step_cache"] == record["step_cache"], k


def test_another_request_between_two_steps_leaves_this_ones_cache(files):  # noqa: F811
    gen = generator(files, step_cache=LOOSE)
    mine, other = [IdentityCondition("a", embedding(1))], [IdentityCondition("b", embedding(2))]
    alone, _ = made(gen, mine)
    between = {}

    def another_request(step, total):
        if step == 2:  # Serve's turns: another batch runs between two of this call's steps
            gen.on_step = None
            between["image"] = made(gen, other, "a beach", seed=9)[0]

    gen.on_step = another_request
    interleaved, _ = made(gen, mine)
    gen.on_step = None
    assert np.array_equal(interleaved, alone)
    assert np.array_equal(between["image"], made(gen, other, "a beach", seed=9)[0])


def test_compiled_with_the_step_cache_its_two_parts_compile_once(files):  # noqa: F811
    from torch._dynamo.utils import counters

    compiled = generator(files, step_cache=LOOSE, backend="torch.compile")
    assert compiled.warm_up([(SIZE, SIZE)], 1)["buckets"] == 1
    graphs = counters["stats"]["unique_graphs"]
    person = [IdentityCondition("a", embedding(1))]
    got, record = made(compiled, person)
    made(compiled, [IdentityCondition("b", embedding(2), scale=0.5)])
    assert counters["stats"]["unique_graphs"] == graphs  # reused steps and people compile nothing
    eager, eager_record = made(generator(files, step_cache=LOOSE), person)
    assert np.abs(got - eager).max() <= 1 and record["step_cache"] == eager_record["step_cache"]
    assert "step cache" in compiled.engine_key(SIZE, SIZE, 1).adapter_structure  # its own artifacts


def test_a_step_cache_it_cannot_run_is_refused_in_one_line(files):  # noqa: F811
    for threshold in (-0.1, 2, float("nan")):
        with pytest.raises(BadInput, match="threshold between 0"):
            generator(files, step_cache=threshold)
    with pytest.raises(BadInput, match="not on FLUX's ONNX graph"):
        generator(files, step_cache=0.1, backend="onnxruntime")


def test_generate_render_and_serve_take_it_and_refuse_it_where_it_cannot_run(files, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from deployments.app import resolve_config
    from ray_faceid.cli.app import app
    from ray_faceid.config import RenderConfig, ServeConfig
    from ray_faceid.data.render import run_render
    from ray_faceid.pipelines.provenance import read_provenance

    out = tmp_path / "a.png"
    made = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--prompt", "a portrait", "--steps",
                                    str(STEPS), "--size", f"{SIZE}x{SIZE}", "--step-cache", str(LOOSE), "--out",
                                    str(out)])
    assert made.exit_code == 0, made.output
    assert read_provenance(out.read_bytes())["step_cache"]["threshold"] == LOOSE
    for model, backend, says in (("tiny", "torch", "--step-cache is for FLUX bases"),
                                 (str(files / "flux"), "onnxruntime", "not on FLUX's ONNX graph")):
        refused = CliRunner().invoke(app, ["generate", "--model", model, "--prompt", "a portrait", "--step-cache",
                                           "0.1", "--backend", backend, "--out", str(out)])
        assert refused.exit_code == 2 and says in refused.stderr, refused.output
        assert "Traceback" not in refused.output
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"id": "r", "prompt": "a beach"}\n')
    with pytest.raises(BadInput, match="--step-cache is for FLUX bases"):
        run_render(str(catalog), str(tmp_path / "out"), "tiny", str(tmp_path / "registry"), None,
                   RenderConfig(flux_step_cache=0.1))
    tokens = {"acme": "acme-token-0123456789abcdef"}
    with pytest.raises(BadInput, match="flux_step_cache: for FLUX models"):
        resolve_config(ServeConfig(model="tiny", flux_step_cache=0.1, api_tokens=tokens))
    with pytest.raises(BadInput, match="not on FLUX's ONNX graph"):
        resolve_config(ServeConfig(model=str(files / "flux"), flux_step_cache=0.1, backend="onnxruntime",
                                   api_tokens=tokens))


def test_a_replicas_memory_plan_counts_what_the_cache_keeps():
    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.model_ref import resolve_model

    ref = resolve_model("tiny-flux", flux=True)
    plain = flux_memory.replica_plan(ref, "fp32", "same", "same", 4, [(64, 64)])
    cached = flux_memory.replica_plan(ref, "fp32", "same", "same", 4, [(64, 64)], step_cache=True)
    hidden = plain.hidden
    assert cached.needed_bytes - plain.needed_bytes >= 2 * 4 * 16 * hidden * 4  # two residuals of 4 images' 16 patches
    assert "step cache" in cached.line()


def test_rows_that_reuse_beside_rows_that_do_not_keep_their_own_residuals():
    """With stand-in stages whose rows settle at their own rates (tiny-flux's images hide a wrong row
    by rounding), a batch's rows equal each run alone, reuse counts included."""
    from ray_faceid.pipelines.flux_step_cache import StepCache

    base, start = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 5)
    drift = torch.tensor([0.02, 0.5, 0.05])  # rows 0 and 2 reuse, row 1 keeps moving

    class Out:
        @staticmethod
        def out(hidden, temb):
            return hidden

    def run(rows: list[int]):
        cache, hidden = StepCache(0.15, len(rows)), start[rows].clone()
        for step in range(8):
            def head(hidden_states, joint_attention_kwargs=None, step=step):
                first = base[rows] * (1 + drift[rows].view(-1, 1, 1) * step)
                return hidden_states, None, None, None, first

            def tail(hidden, encoder, temb, rotary, joint_attention_kwargs=None):
                return hidden + 3 * torch.sin(hidden)

            hidden = hidden + 0.1 * cache(head, tail, Out, hidden_states=hidden)[0]
        return hidden, cache.reused

    together, reused = run([0, 1, 2])
    assert len(set(reused)) == 3 and min(reused) < 7  # rows reuse at their own rates, some steps beside rows that run
    for k in range(3):
        alone, alone_reused = run([k])
        assert torch.allclose(together[k], alone[0], atol=1e-5) and reused[k] == alone_reused[0], k
