"""FLUX's transformer as an ONNX graph on ONNX Runtime (--backend onnxruntime): people are inputs of
one graph per size, the image is the eager transformer's, and the graph `ray-faceid compile --backend
onnx` exports is the one generate then loads from the engine cache."""
import numpy as np
import pytest
from typer.testing import CliRunner

from ray_faceid.engines.cache import EngineCache
from ray_faceid.identity.flux_adapter import load_flux_adapter
from ray_faceid.pipelines.flux import build_tiny_flux, load_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition
from tests.pipelines.test_flux_identity import SIZE, embedding, files  # noqa: F401 - files: a fixture

pytest.importorskip("onnxruntime")
STEPS = 2


def generator(files, **kwargs) -> FluxGenerator:  # noqa: F811
    base = load_flux(str(files / "flux"))
    return FluxGenerator(base, load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer), **kwargs)


def image(gen, people, seed=3) -> np.ndarray:
    result = gen.generate("a portrait", people, seed=seed, steps=STEPS, width=SIZE, height=SIZE)
    return np.asarray(result.images[0]).astype(int)


def test_the_onnx_graph_takes_people_as_inputs_and_gives_the_eager_image(files, tmp_path, monkeypatch):  # noqa: F811
    cache = EngineCache(tmp_path / "engines")
    onnx = generator(files, backend="onnxruntime", engine_cache=cache)
    assert onnx.warm_up([(SIZE, SIZE)], 4) == {"buckets": 0, "graphs": 1, "loaded": 0, "stored": 1}
    eager = generator(files)
    two = [IdentityCondition("a", embedding(1), region=(0.0, 0.0, 0.5, 1.0)),
           IdentityCondition("b", embedding(2), scale=0.6)]
    for people in ([IdentityCondition("a", embedding(1))], two, []):
        got = image(onnx, people)
        assert np.abs(got - image(eager, people)).max() <= 1
    assert np.abs(image(onnx, two) - image(onnx, [])).max() > 2  # the people reach the graph
    # Any batch on the one graph: rows of other people, each its own image.
    items = [GenerationItem("a portrait", [IdentityCondition("a", embedding(k))], seed=k) for k in (1, 2, 3)]
    three = onnx.generate_items(items, steps=STEPS, width=SIZE, height=SIZE)
    assert np.abs(np.asarray(three.images[1]).astype(int) - image(eager, items[1].identities, seed=2)).max() <= 1
    assert three.provenance[0]["backend"] == "onnxruntime" and len(list(cache.root.glob("onnx-*"))) == 1
    # Another generator (a replica, a render actor) loads the graph: nothing exported again.
    from ray_faceid.engines import flux_onnx

    monkeypatch.setattr(flux_onnx, "export_flux_transformer", lambda *a, **k: pytest.fail("exported again"))
    again = generator(files, backend="onnxruntime", engine_cache=cache)
    assert again.warm_up([(SIZE, SIZE)], 4)["loaded"] == 1
    assert np.abs(image(again, two) - image(eager, two)).max() <= 1


def test_compile_exports_the_graph_that_generate_then_loads(files, tmp_path, monkeypatch):  # noqa: F811
    from ray_faceid.cli.app import app
    from ray_faceid.engines import flux_onnx

    embedding_file = tmp_path / "person.npy"
    np.save(embedding_file, embedding(1))
    env = {"RAY_FACEID_CACHE": str(tmp_path)}
    model, adapter = str(files / "flux"), str(files / "ip_adapter.safetensors")
    built = CliRunner().invoke(app, ["compile", "--model", model, "--adapter", adapter, "--backend", "onnx", "--size",
                                     f"{SIZE}x{SIZE}"], env=env)
    assert built.exit_code == 0, built.output
    assert "FLUX transformer ONNX graph for 32x32 (loaded from the cache: 0, stored: 1)" in " ".join(built.stdout.split())
    out = tmp_path / "a.png"
    monkeypatch.setattr(flux_onnx, "export_flux_transformer", lambda *a, **k: pytest.fail("exported again"))
    made = CliRunner().invoke(app, ["generate", "--model", model, "--adapter", adapter, "--face-embedding",
                                    str(embedding_file), "--prompt", "a portrait", "--steps", str(STEPS), "--size",
                                    f"{SIZE}x{SIZE}", "--seed", "3", "--backend", "onnxruntime", "--out", str(out)],
                               env=env)
    assert made.exit_code == 0, made.output  # found where compile put it: the export above would fail it
    from PIL import Image

    got = np.asarray(Image.open(out)).astype(int)
    assert np.abs(got - image(generator(files), [IdentityCondition("person", embedding(1))])).max() <= 1
    # A Serve config asking what the graph does not run is refused when read.
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig
    from ray_faceid.errors import BadInput

    tokens = {"acme": "acme-token-0123456789abcdef"}
    for precision, weights in (("fp16", "same"), ("auto", "fp8")):
        with pytest.raises(BadInput, match="fp32"):
            resolve_config(ServeConfig(model=model, backend="onnxruntime", precision=precision,
                                       flux_transformer_weights=weights, api_tokens=tokens))
    with pytest.raises(BadInput, match="each size would be a new ONNX export"):  # Fill: a graph per photo size
        resolve_config(ServeConfig(model="tiny-flux-fill", backend="onnxruntime", api_tokens=tokens))
    fp8 = CliRunner().invoke(app, ["compile", "--model", model, "--backend", "onnx", "--flux-transformer-weights",
                                   "fp8"], env=env)
    assert fp8.exit_code == 2 and "fp8 is for torch.compile" in fp8.stderr and "exporting" not in fp8.stderr
    # A replica's memory plan counts each loaded graph's own copy of the transformer.
    from ray_faceid.pipelines import flux_memory
    from ray_faceid.pipelines.model_ref import resolve_model

    ref = resolve_model(model, flux=True)
    plain = flux_memory.replica_plan(ref, "fp32", "same", "same", 1, [])
    on_onnx = flux_memory.replica_plan(ref, "fp32", "same", "same", 1, [], backend="onnxruntime")
    assert on_onnx.needed_bytes > plain.needed_bytes and "ONNX Runtime" in on_onnx.line()


def test_fill_repaints_on_the_graph_of_the_photos_size(tmp_path):
    """FLUX.1 Fill repaints at each photo's own size: its graph, with the packed photo and mask beside
    the latents, is exported at that size's first request and gives the eager image."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 12:30] = 255
    onnx = FluxGenerator(build_tiny_flux(fill=True), backend="onnxruntime", engine_cache=EngineCache(tmp_path))
    assert onnx.warm_up([(32, 32)], 1)["note"].startswith("FLUX.1 Fill: each photo size")
    got = np.asarray(onnx.inpaint(photo, mask, "a face", seed=3, steps=STEPS).images[0]).astype(int)
    want = FluxGenerator(build_tiny_flux(fill=True)).inpaint(photo, mask, "a face", seed=3, steps=STEPS).images[0]
    assert np.abs(got - np.asarray(want).astype(int)).max() <= 1 and len(onnx.graphs) == 1
