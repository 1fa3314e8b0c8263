"""UNet engines on CPU: ONNX Runtime matches torch with identity as runtime inputs; the cache
keys and rebuilds what it must."""
import logging

import numpy as np
import pytest
import torch

from ray_faceid.engines.base import EngineShape
from ray_faceid.engines.cache import EngineCache, EngineKey
from ray_faceid.engines.select import resolve_backend, unet_engine
from ray_faceid.errors import BackendUnavailable
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.pipelines.models import build_tiny

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def shape_for(base, identities, tokens=4):
    return EngineShape(batch=(1, 2, 8), latent=(8, 8), identities=identities, tokens=tokens, text_length=32,
                       channels=base.unet.config.in_channels, cross_dim=base.cross_attention_dim)


def inputs(shape, batch, seed, regions=False):
    example = shape.example(batch)
    g = torch.Generator().manual_seed(seed)
    example["identity_tokens"] = torch.randn(example["identity_tokens"].shape, generator=g)
    example["identity_scale"] = torch.rand(example["identity_scale"].shape, generator=g) + 0.5
    if regions:
        masks = torch.zeros_like(example["region_masks"])
        masks[:, 0, :, :4] = 1
        masks[:, 1, :, 4:] = 1
        example["region_masks"] = masks
    return example


@pytest.fixture(scope="module")
def spec():
    from ray_faceid.face.spec import EncoderSpec

    return EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)


@pytest.fixture(scope="module")
def pipeline_engines(tmp_path_factory):
    """One engine cache for the pipeline tests at 16x16: the graph is exported once (tens of seconds)
    and each later test gets it from the cache with its own adapter's weights refitted."""
    return tmp_path_factory.mktemp("pipeline_engines")


# Each method and each identity layout (one person; two with regions), one export each (~30 s on 2 cores).
@pytest.mark.parametrize("method,identities", [("decoupled", 1), ("pva", 2)])
def test_onnxruntime_matches_torch(spec, tmp_path, method, identities):
    base = build_tiny()
    torch.manual_seed(1)
    adapter = IdentityAdapter.for_unet(base.unet, spec, AdapterOptions(method=method, gate=method == "pva"))
    with torch.no_grad():  # move the identity projections away from the text ones: identity must matter
        for p in adapter.processors.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.install(base.unet)
    shape = shape_for(base, identities)
    cache = EngineCache(tmp_path)
    reference = unet_engine(base, adapter, shape, "torch")
    engine = unet_engine(base, adapter, shape, "onnxruntime", cache=cache)
    for batch in (1, 3):
        for seed in (0, 1):  # new identity tokens per call: no rebuild, still exact
            x = inputs(shape, batch, seed, regions=identities == 2)
            want, got = reference(**x), engine(**x)
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 1e-4, (batch, seed, rel)
    x = inputs(shape, 2, 0, regions=identities == 2)
    other = dict(x, identity_tokens=torch.randn_like(x["identity_tokens"]))
    assert not torch.allclose(engine(**x), engine(**other), atol=1e-5)  # identity is a live input
    assert len(list(tmp_path.iterdir())) == 1  # one graph for all of it
    refit_names_hold(next(tmp_path.glob("*/unet.onnx")), adapter, torch.float32)


def refit_names_hold(path, adapter, dtype) -> None:
    """TensorRT refits per-identity weights by name: each must be a named initializer of the graph,
    with the adapter's values in the graph's precision."""
    import onnx

    from ray_faceid.engines.select import processor_weights_by_onnx_name

    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    weights = processor_weights_by_onnx_name(adapter)
    assert len(weights) == len(adapter.processors.state_dict()) > 0
    for name, tensor in weights.items():
        assert name in initializers, name
        np.testing.assert_array_equal(initializers[name], tensor.to(dtype).numpy())


def test_a_half_precision_graph_keeps_every_identity_weight_under_its_refit_name(spec, tmp_path):
    """A half-precision graph (what TensorRT 11 builds fp16 engines from) keeps the refit names, takes
    half inputs and still computes the UNet (the fp32 graph: test_onnxruntime_matches_torch)."""
    import onnx
    import onnxruntime as ort

    from ray_faceid.engines.base import INPUT_NAMES, UNetCall
    from ray_faceid.engines.onnx_export import export_unet

    base = build_tiny()
    adapter = IdentityAdapter.for_unet(base.unet, spec)
    adapter.install(base.unet)
    shape = shape_for(base, 1)
    path = export_unet(base.unet, shape, tmp_path / "unet.onnx", torch.float16)
    assert next(base.unet.parameters()).dtype == torch.float32  # exported from a copy, not cast in place
    refit_names_hold(path, adapter, torch.float16)
    graph = onnx.load(str(path)).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types.pop("timestep") == onnx.TensorProto.FLOAT and set(types.values()) == {onnx.TensorProto.FLOAT16}
    x = inputs(shape, 3, 0)
    with torch.no_grad():
        want = UNetCall(base.unet)(*(x[n] for n in INPUT_NAMES))
    feed = {n: x[n].numpy().astype(np.float32 if n == "timestep" else np.float16) for n in INPUT_NAMES}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    rel = np.linalg.norm(got.astype(np.float32) - want.numpy()) / np.linalg.norm(want.numpy())
    assert rel < 1e-2, rel


def test_engine_keys_follow_the_base_weights_not_its_path(tmp_path, spec128, monkeypatch):
    """A UNet with other weights (same architecture) gets another engine; the same weights loaded
    from a folder reuse the engine built for them."""
    from ray_faceid.engines.compile_artifacts import compiled_key
    from ray_faceid.engines.select import adapter_structure
    from ray_faceid.pipelines.models import load_base, save_base

    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    a, b = build_tiny(seed=0), build_tiny(seed=1)
    save_base(a, tmp_path / "a")
    shape = shape_for(a, identities=1)
    structure = adapter_structure(IdentityAdapter.for_unet(a.unet, spec128))
    keys = {name: compiled_key(base.model_hash(), structure, shape, "fp32", torch.device("cpu")).compute_hash()
            for name, base in {"a": a, "b": b, "a from disk": load_base(str(tmp_path / "a"))}.items()}
    assert keys["a"] == keys["a from disk"] != keys["b"]
    other_compiler = compiled_key(a.model_hash(), structure, shape, "fp32", torch.device("cpu"), "aot_eager")
    assert other_compiler.compute_hash() != keys["a"]  # artifacts of one torch.compile backend never serve another


def test_cache_key_changes_exactly_with_the_keyed_fields():
    key = EngineKey(backend="onnx", model_hash="m", adapter_structure="a", batch=(1, 2, 4), latent=(64, 64),
                    identities=1, tokens=4)
    assert key.compute_hash() == EngineKey(**key.model_dump()).compute_hash()
    changes = {"model_hash": "m2", "adapter_structure": "a2", "weight_inputs": True, "batch": (1, 2, 8),
               "latent": (64, 96), "identities": 2, "tokens": 8, "precision": "fp16", "device": "NVIDIA H100 sm_90",
               "runtime_version": "10.3", "backend": "tensorrt", "graph": "face_encoder"}
    hashes = {field: key.model_copy(update={field: value}).compute_hash() for field, value in changes.items()}
    assert key.compute_hash() not in hashes.values() and len(set(hashes.values())) == len(changes)


def test_a_corrupted_engine_file_is_rebuilt_with_a_warning(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    key = EngineKey(backend="onnx", model_hash="m", adapter_structure="a", batch=(1, 2, 4), latent=(8, 8),
                    identities=1, tokens=4)
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "unet.onnx").write_bytes(b"graph bytes")
        return folder / "unet.onnx"

    path = cache.get_or_build(key, "unet.onnx", build)
    assert cache.get_or_build(key, "unet.onnx", build) == path and len(builds) == 1
    path.write_bytes(b"graph bytes, truncat")
    with caplog.at_level(logging.WARNING):
        assert cache.get_or_build(key, "unet.onnx", build).read_bytes() == b"graph bytes"
    assert len(builds) == 2 and "corrupted or stale" in caplog.text


def test_tensorrt_without_tensorrt_says_how_to_install(spec, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT is installed here: benchmarks/gpu_check.py exercises it")
    base = build_tiny()
    adapter = IdentityAdapter.for_unet(base.unet, spec)
    adapter.install(base.unet)
    with pytest.raises(BackendUnavailable, match="tensorrt|TensorRT|CUDA"):
        unet_engine(base, adapter, shape_for(base, 1), "tensorrt", cache=EngineCache(tmp_path))
    assert resolve_backend("auto") == "onnxruntime" or torch.cuda.is_available()


def test_the_pipeline_gives_the_same_image_on_onnxruntime(spec, pipeline_engines):
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline

    rng = np.random.default_rng(0)
    person = IdentityCondition("p", rng.normal(size=(2, 128)).astype(np.float32))
    images = {}
    for backend in ("torch", "onnxruntime"):
        base = build_tiny()
        torch.manual_seed(0)
        adapter = IdentityAdapter.for_unet(base.unet, spec)
        pipe = IdentityPipeline(base, adapter, backend=backend, engine_cache=EngineCache(pipeline_engines))
        result = pipe.generate("a photo of a person", [person], seed=5, steps=3, width=16, height=16)
        images[backend] = np.asarray(result.images[0]).astype(int)
        assert result.provenance[0]["backend"] == backend
    assert np.abs(images["torch"] - images["onnxruntime"]).max() <= 1


def test_compile_cli_builds_a_cached_graph_and_explains_a_missing_tensorrt(tmp_path, monkeypatch, caplog):
    import importlib.util

    from typer.testing import CliRunner

    from ray_faceid.cli import app

    runner = CliRunner()
    if importlib.util.find_spec("tensorrt") is None:
        missing = runner.invoke(app, ["compile", "--out", str(tmp_path), "--backend", "tensorrt", "--size", "16x16"])
        assert missing.exit_code == 2 and "pip install 'ray_faceid[tensorrt]'" in missing.output
    bad = runner.invoke(app, ["compile", "--out", str(tmp_path), "--batch", "4:2:1"])
    assert bad.exit_code == 2 and "1 <= MIN <= OPT <= MAX" in bad.output
    half = runner.invoke(app, ["compile", "--out", str(tmp_path), "--backend", "onnx", "--precision", "fp16"])
    assert half.exit_code == 2 and "ONNX Runtime runs fp32 graphs" in half.output
    with caplog.at_level(logging.INFO, logger="ray_faceid.engines.select"):
        built = runner.invoke(app, ["compile", "--out", str(tmp_path), "--backend", "onnx", "--size", "16x16"])
    assert built.exit_code == 0, built.output
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "exporting" in said and "builds it ahead" not in said  # compile is the building ahead
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert entry.name.startswith("onnx-") and {"unet.onnx", "meta.json"} <= {p.name for p in entry.iterdir()}
    # What compile built is what a pipeline looks up, whatever a request's rows: no export at serve time.
    from ray_faceid.engines import onnx_export
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline

    base = build_tiny()
    pipe = IdentityPipeline(base, IdentityAdapter.for_unet(base.unet, FaceAnalyzer().spec), backend="onnxruntime",
                            engine_cache=EngineCache(tmp_path))
    face = IdentityCondition("ann", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))

    def no_export(*args, **kwargs):
        raise AssertionError("exported at request time: compile built another key")

    monkeypatch.setattr(onnx_export, "export_unet", no_export)
    pipe.generate("a portrait", [face], num_images=2, steps=1, width=16, height=16)  # a first call of 4 rows


def _personal_images(spec, backend, cache):
    """One face rendered three times: with ann's own adapter, with bob's, then with the shared one."""
    from ray_faceid.identity.personalization import processor_weights
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline

    face = np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32)
    base = build_tiny()
    torch.manual_seed(0)
    adapter = IdentityAdapter.for_unet(base.unet, spec)
    pipe = IdentityPipeline(base, adapter, backend=backend, engine_cache=cache)
    people = []
    for i, name in enumerate(("ann", "bob")):
        g = torch.Generator().manual_seed(i)
        delta = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in processor_weights(adapter).items()}
        people.append(IdentityCondition(name, face, personal=(f"v{i}", delta)))
    people.append(IdentityCondition("cy", face))
    return [np.asarray(pipe.generate("a photo", [p], seed=5, steps=2, width=16, height=16).images[0]).astype(int)
            for p in people]


def test_per_identity_adapters_on_onnxruntime_share_one_graph_and_give_the_torch_images(spec, pipeline_engines):
    torch_images = _personal_images(spec, "torch", None)
    onnx_images = _personal_images(spec, "onnxruntime", EngineCache(pipeline_engines))
    # no graph per person (their weights are inputs), nor per test at this size
    assert len([p for p in pipeline_engines.iterdir() if p.is_dir()]) == 1
    assert len({im.tobytes() for im in torch_images}) == 3  # each adapter makes its own image of the face
    for a, b in zip(torch_images, onnx_images):
        assert np.abs(a - b).max() <= 1


def test_a_serve_config_warming_more_file_engines_than_a_replica_keeps_is_refused():
    from ray_faceid.config import ServeConfig

    assert ServeConfig(backend="onnxruntime", warm_up_sizes=["512x512", "768x768"], warm_up_identities=[1, 2])
    ServeConfig(backend="tensorrt")  # 8, 16 and 32 rows: three plans
    with pytest.raises(ValueError, match="tensorrt engines; a replica keeps 4"):
        ServeConfig(backend="tensorrt", warm_up_identities=[1, 2])
