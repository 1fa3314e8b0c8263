"""Our identity adapter on FLUX (tiny-flux): its flow-matching objective learns, the untrained adapter
leaves FLUX's image as it is, `ray-faceid train --model tiny-flux` trains it on Ray Train, and the
folder it writes generates enrolled people from one command, recording what made the image."""
import asyncio
import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.config import PersonalizeConfig
from ray_faceid.errors import BadInput
from ray_faceid.identity.cross_training import CrossBatch
from ray_faceid.identity.flux_training import FluxAdapterObjective, new_flux_adapter, save_flux_adapter
from ray_faceid.pipelines.flux import build_tiny_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import IdentityCondition

SIZE = 32


def batch(seed: int = 0) -> CrossBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 8:24, 8:24] = 1
    return CrossBatch(id_embeddings=torch.nn.functional.normalize(torch.randn(2, 128, generator=g), dim=-1),
                      pixels=torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, face_masks=mask,
                      captions=["a photo of amy", "a photo of bob"], expressions=None, people=["amy", "bob"])


def image(generator, people) -> np.ndarray:
    made = generator.generate("a portrait", people, seed=3, steps=2, width=SIZE, height=SIZE)
    return np.asarray(made.images[0]).astype(int)


def test_the_objective_learns_and_the_untrained_adapter_leaves_fluxs_image(spec128, tmp_path):
    from ray_faceid.identity.flux_adapter import load_flux_adapter

    base = build_tiny_flux().freeze()
    adapter = new_flux_adapter(base.transformer, spec128, seed=0)
    adapter.install(base.transformer)
    person = [IdentityCondition("amy", batch().id_embeddings[:1].numpy())]
    before = FluxGenerator(build_tiny_flux())
    untrained = save_flux_adapter(str(tmp_path / "untrained"), adapter, base.model_hash(), 0)
    with_it = FluxGenerator(build_tiny_flux(), load_flux_adapter(untrained, build_tiny_flux().transformer))
    assert np.array_equal(image(with_it, person), image(before, []))  # its values start at zero

    objective = FluxAdapterObjective(base, adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(objective(batch(), torch.Generator().manual_seed(99))["total"])

    start = fixed_loss()
    for step in range(15):
        loss = objective(batch(), torch.Generator().manual_seed(step))["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.97 * start
    trained = save_flux_adapter(str(tmp_path / "trained"), adapter, base.model_hash(), 15)
    loaded = load_flux_adapter(str(tmp_path / "trained"), build_tiny_flux().transformer)  # the folder `train` wrote
    assert loaded.encoder_spec == spec128 and loaded.trained["trained_steps"] == 15 and loaded.published is None
    assert trained.endswith("flux_identity.safetensors")
    from ray_faceid.pipelines.flux_memory import replica_plan
    from ray_faceid.pipelines.model_ref import resolve_model

    plan = replica_plan(resolve_model("tiny-flux", flux=True), "bf16", "same", "same", 1, [], str(tmp_path / "trained"))
    # Its bank: 8 people's projections and the shared slot, in bf16 (the file holds fp32).
    assert plan.components["people's own adapters"] == 9 * (plan.components["FLUX IP-Adapter"] // 2)
    gen = FluxGenerator(build_tiny_flux(), loaded)
    amy, bob = image(gen, person), image(gen, [IdentityCondition("bob", batch().id_embeddings[1:].numpy())])
    assert np.abs(amy - image(before, [])).max() > 2 and np.abs(amy - bob).max() > 2
    record = gen.generate("a portrait", person, steps=1).provenance[0]
    assert record["encoder"] == spec128.key() and record["adapter_trained"]["trained_steps"] == 15
    with pytest.raises(BadInput, match=f"reads N x 128 finite {spec128.key()} identity embeddings"):
        gen.generate("a portrait", [IdentityCondition("p", np.ones((1, 64), np.float32))], steps=1)
    # Identity embeddings at unit length, as trained (the cross-training shots' and a person's fused references).
    from ray_faceid.identity.tokens import fuse_embeddings

    two, quality = batch().id_embeddings.numpy(), np.array([1.0, 3.0], np.float32)  # one person's two photos
    want = loaded.tokens(fuse_embeddings(torch.from_numpy(two), torch.from_numpy(quality))[None])[0]
    assert torch.allclose(loaded.person_tokens(two, "p", "cpu", quality), want, atol=1e-5)
    assert not torch.allclose(loaded.person_tokens(two, "p", "cpu"), want, atol=1e-3)  # their quality weighs them
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(loaded.tokens(x), loaded.tokens(5 * x), atol=1e-5)  # training's fused ones too


def test_what_does_not_fit_our_flux_adapter_is_refused_in_one_line(spec128, tmp_path):
    """Another base's weights (as the UNet adapters refuse them), a damaged record of what made it,
    and personalize on a base of other widths before any worker starts."""
    from safetensors.torch import load_file, save_file

    from ray_faceid.errors import BaseModelMismatch
    from ray_faceid.identity.flux_adapter import FluxIdentityAdapter, load_flux_adapter
    from ray_faceid.train.personalize import run_personalize

    base = build_tiny_flux()
    saved = save_flux_adapter(str(tmp_path / "dev"), new_flux_adapter(base.transformer, spec128, 0),
                              base.model_hash(), 5)
    schnell = build_tiny_flux(guidance_embeds=False)
    with pytest.raises(BaseModelMismatch, match="was trained on base weights"):
        FluxGenerator(schnell, load_flux_adapter(saved, schnell.transformer))
    from safetensors import safe_open

    with safe_open(saved, "pt") as f:
        made = json.loads(f.metadata()["ray_faceid"])
    made.pop("encoder")
    save_file(load_file(saved), str(tmp_path / "damaged.safetensors"), metadata={"ray_faceid": json.dumps(made)})
    np.save(tmp_path / "e.npy", np.ones((1, 128), np.float32))
    refused = CliRunner().invoke(app, ["generate", "--model", "tiny-flux", "--adapter",
                                       str(tmp_path / "damaged.safetensors"), "--face-embedding", str(tmp_path / "e.npy"),
                                       "--prompt", "a portrait", "--out", str(tmp_path / "o.png")])
    assert refused.exit_code == 2 and "its record of what made it (encoder, base, tokens, steps) is damaged" in \
        refused.stderr, refused.output
    narrow = FluxIdentityAdapter(128, 8, 16, 1)
    narrow.encoder_spec = spec128
    other = save_flux_adapter(str(tmp_path / "narrow"), narrow, "another base", 1)
    with pytest.raises(BaseModelMismatch, match="text width, inner width and dual-stream blocks"):
        run_personalize(str(tmp_path / "registry"), other, "tiny-flux", PersonalizeConfig(steps=1))
    from ray_faceid.identity.stand_ins import pulid_state_dict, xlabs_state_dict

    save_file(xlabs_state_dict(base.transformer), str(tmp_path / "ip_adapter.safetensors"))
    save_file(pulid_state_dict(base.transformer), str(tmp_path / "pulid_flux_v0.9.1.safetensors"))
    for published in ("ip_adapter.safetensors", "pulid_flux_v0.9.1.safetensors"):  # with or without --image-encoder
        for encoder in (None, str(tmp_path)):
            with pytest.raises(BadInput, match="is used as it is"):
                run_personalize(str(tmp_path / "registry"), str(tmp_path / published), "tiny-flux",
                                PersonalizeConfig(steps=1), image_encoder=encoder)


def test_a_persons_own_adapter_applies_to_their_row_alone_as_their_weights_would(spec128, tmp_path, monkeypatch):
    """Per row and person, from the bank (never the shared weights changed): the image equals that of
    the shared adapter with the person's delta added to its weights, biases included."""
    from ray_faceid.identity.flux_adapter import load_flux_adapter
    from ray_faceid.pipelines.generate import GenerationItem

    base = build_tiny_flux()
    adapter = new_flux_adapter(base.transformer, spec128, seed=0)
    with torch.no_grad():
        for p in adapter.to_v_ip.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    saved = save_flux_adapter(str(tmp_path / "shared"), adapter, base.model_hash(), 10)
    generator = torch.Generator().manual_seed(2)
    delta = {name: (torch.randn(p.shape, generator=generator) * 0.3).half()
             for name, p in adapter.processors.named_parameters()}
    amy_emb, bob_emb = batch().id_embeddings[:1].numpy(), batch().id_embeddings[1:].numpy()
    gen = FluxGenerator(build_tiny_flux(), load_flux_adapter(saved, build_tiny_flux().transformer))
    amy = IdentityCondition("amy", amy_emb, personal=("v1@amy", delta))
    own = image(gen, [amy])
    assert np.abs(own - image(gen, [IdentityCondition("amy", amy_emb)])).max() > 2
    summed = load_flux_adapter(saved, build_tiny_flux().transformer)
    with torch.no_grad():
        for name, p in summed.processors.named_parameters():
            p.add_(delta[name].float())
    assert np.abs(own - image(FluxGenerator(build_tiny_flux(), summed), [IdentityCondition("amy", amy_emb)])).max() <= 1
    bob = [IdentityCondition("bob", bob_emb)]
    both = gen.generate_items([GenerationItem("a portrait", [amy], seed=3), GenerationItem("a portrait", bob, seed=3)],
                              steps=2, width=SIZE, height=SIZE)
    assert np.abs(np.asarray(both.images[0]).astype(int) - own).max() <= 1
    assert np.abs(np.asarray(both.images[1]).astype(int) - image(gen, bob)).max() <= 1
    assert both.provenance[0]["identities"][0]["personal_adapter"] == "v1"
    # Compiled (the suite's Dynamo backend): each row's slot is an input; a person's own adapter, or
    # none, compiles nothing anew.
    from torch._dynamo.utils import counters

    compiled = FluxGenerator(build_tiny_flux(), load_flux_adapter(saved, build_tiny_flux().transformer),
                             backend="torch.compile")
    compiled.warm_up([(SIZE, SIZE)], 1)
    graphs = counters["stats"]["unique_graphs"]
    assert np.abs(image(compiled, [amy]) - own).max() <= 1
    assert np.abs(image(compiled, bob) - image(gen, bob)).max() <= 1
    assert counters["stats"]["unique_graphs"] == graphs
    # On FLUX's ONNX graph the bank's stacks are inputs: a person's own adapter loaded after the export
    # (bob's image exported it) applies as well.
    from ray_faceid.engines.cache import EngineCache

    onnx = FluxGenerator(build_tiny_flux(), load_flux_adapter(saved, build_tiny_flux().transformer),
                         backend="onnxruntime", engine_cache=EngineCache(tmp_path / "engines"))
    assert np.abs(image(onnx, bob) - image(gen, bob)).max() <= 1
    assert np.abs(image(onnx, [amy]) - own).max() <= 1
    # A graph exported while amy's adapter is in the bank holds nothing of it: the stacks are inputs
    # without data (erasing her leaves nothing of hers in the engine cache).
    import onnx as onnx_format

    from ray_faceid.engines import flux_onnx

    monkeypatch.setattr(flux_onnx, "EXTERNAL_DATA_BYTES", 0)  # the second graph's weights written apart, as FLUX.1's
    held = onnx.personal_bank.stack(onnx.personal_bank.names[0])
    hers = held[held.flatten(1).abs().sum(1).argmax()].flatten()[:8].numpy().tobytes()  # her delta's first values
    assert any(hers)
    onnx.generate("a portrait", bob, seed=3, steps=1, width=2 * SIZE, height=2 * SIZE)
    graphs = sorted((tmp_path / "engines").glob("onnx-*/flux_transformer.onnx"))
    assert len(graphs) == 2
    for path in graphs:
        model = onnx_format.load(str(path))
        assert not [t.name for t in model.graph.initializer if t.name.startswith("bank.")]
        assert [i.name for i in model.graph.input if i.name.startswith("bank.")]
        assert all(hers not in f.read_bytes() for f in path.parent.iterdir() if f.is_file())
    assert len(list(graphs[0].parent.iterdir()) + list(graphs[1].parent.iterdir())) > 4  # one holds external data
    # A graph exported before the stacks became inputs (they stayed in it as initializers, her delta
    # with them) is refused when loaded, never run on the bank it was exported with.
    from ray_faceid.errors import BackendUnavailable

    monkeypatch.setattr(flux_onnx, "_required_inputs", lambda path, names: None)
    latent = SIZE // onnx.base.vae_scale_factor
    older = flux_onnx.export_flux_transformer(flux_onnx.FluxCall(onnx.base.transformer, onnx.adapter,
                                                                 onnx.personal_bank),
                                              onnx._example(latent, latent), tmp_path / "older" / "graph.onnx")
    with pytest.raises(BackendUnavailable, match="an older export; delete it from the engine cache"):
        flux_onnx.OnnxRuntimeFluxTransformer(older, onnx.personal_bank)
    # A bank of one person (FLUX.1's projections are about 1 GB a person): two people's own adapters
    # in one batch run one after the other, each its own image; in one image, refused in one line.
    from ray_faceid.identity import personal_bank

    monkeypatch.setattr(personal_bank, "BANK_SLOTS", 1)
    one_slot = FluxGenerator(build_tiny_flux(), load_flux_adapter(saved, build_tiny_flux().transformer))
    bob_own = IdentityCondition("bob", bob_emb, personal=("v2@bob", {k: -v for k, v in delta.items()}))
    pair = one_slot.generate_items([GenerationItem("a portrait", [amy], seed=3),
                                    GenerationItem("a photo", [bob_own], seed=4)], steps=2, width=SIZE, height=SIZE)
    assert np.abs(np.asarray(pair.images[0]).astype(int) - own).max() <= 1 and pair.seeds == [3, 4]
    alone = one_slot.generate("a photo", [bob_own], seed=4, steps=2, width=SIZE, height=SIZE).images[0]
    assert np.abs(np.asarray(pair.images[1]).astype(int) - np.asarray(alone).astype(int)).max() <= 1
    with pytest.raises(BadInput, match="2 people with their own adapter in one image; this generator holds 1"):
        one_slot.generate("a portrait", [amy, bob_own], steps=1)
    gen.forget_personal("v1@amy")  # an erased person's: refused from then on
    with pytest.raises(Exception, match="erased"):
        image(gen, [amy])


@pytest.fixture(scope="module")
def flux_adapter(small_dataset, tmp_path_factory):
    from ray_faceid.config import TrainConfig
    from ray_faceid.train.adapter import run_training

    out = tmp_path_factory.mktemp("flux_adapter")
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, workers=1, cpus_per_worker=0.5, checkpoint_every=2)
    return str(out), run_training(small_dataset, "tiny-flux", str(out), config)


def test_train_on_flux_and_generate_an_enrolled_person_from_the_folder(flux_adapter, small_dataset, tmp_path):
    from deployments.app import resolve_config
    from deployments.flux_generator import FluxServeGenerator
    from ray_faceid.config import RenderConfig, ServeConfig, TrainConfig
    from ray_faceid.data.render_flux import FluxRenderer
    from ray_faceid.enrollment import enroll_dataset
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.pipelines.provenance import read_provenance
    from ray_faceid.registry import Registry
    from ray_faceid.train.adapter import run_training
    from ray_faceid.train.personalize import run_personalize

    out, record = flux_adapter
    assert record["steps"] == 2 and record["eval_loss_start"] > 0
    registry = Registry(str(tmp_path / "registry"))
    enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")
    made = CliRunner().invoke(app, ["generate", "--model", "tiny-flux", "--adapter", out, "--identity", "amy",
                                    "--registry", registry.store, "--prompt", "a portrait", "--steps", "2", "--seed",
                                    "3", "--out", str(tmp_path / "amy.png")])
    assert made.exit_code == 0, made.output
    generated = np.asarray(Image.open(tmp_path / "amy.png")).astype(int)
    provenance = read_provenance((tmp_path / "amy.png").read_bytes())
    enrolled_with = EncoderSpec(**registry.get("default", registry.resolve("default", "amy"))["encoder"])
    assert provenance["adapter_trained"]["trained_steps"] == 2 and provenance["base_family"] == "flux"
    assert provenance["identities"][0]["embeddings_encoder"] == enrolled_with.key() == provenance["encoder"]
    # A catalog row and a Serve request of the same person, prompt and seed: the same image.
    renderer = FluxRenderer(RenderConfig(steps=2, device="cpu"), "tiny-flux", out, registry.store, "default",
                            str(tmp_path / "rendered"))
    row = renderer.render_batch([json.dumps({"id": "amy-1", "identities": ["amy"], "prompt": "a portrait",
                                             "seed": 3})], [0])[0]
    assert row["status"] == "ok", row
    assert np.abs(np.asarray(Image.open(row["output_uri"])).astype(int) - generated).max() <= 1
    amy = registry.resolve("default", "amy")
    config = resolve_config(ServeConfig(model="tiny-flux", adapter=out, registry=registry.store,
                                        api_tokens={"default": "default-token-0123456789abcdef"}))
    generator = FluxServeGenerator(config.model_dump_json())
    held = {}

    async def load_identity(key):  # Serve's multiplexing needs a replica context
        held[key] = held.get(key) or await generator._load_identity(key)
        return held[key]

    generator.load_identity = load_identity
    assert "2 steps trained" in generator.defaults()["served"]
    (answer,) = asyncio.run(generator._generate_group([{
        "kind": "generate", "tenant": "default", "identities": [{"id": amy}], "prompt": "a portrait",
        "negative_prompt": "", "seed": 3, "num_images": 1, "steps": 2, "guidance": None, "width": 32, "height": 32,
        "cancelled": threading.Event()}]))
    assert "error" not in answer, answer
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
    assert np.abs(served - generated).max() <= 1
    with pytest.raises(BadInput, match="leave image_encoder out"):
        resolve_config(config.model_copy(update={"image_encoder": str(tmp_path)}))
    # Amy's own adapter (personalize on Ray Train): generate, render and the replica that cached her
    # before it all use it, and give the same image.
    summary = run_personalize(registry.store, out, "tiny-flux", PersonalizeConfig(steps=2, lr=1e-2, workers=1,
                                                                                  cpus_per_worker=0.5),
                              identities=["amy"])
    assert summary["trained"] == [amy] and not summary["failed"], summary
    version = registry.get("default", amy)["adapters"][-1]["version"]
    again = CliRunner().invoke(app, ["generate", "--model", "tiny-flux", "--adapter", out, "--identity", "amy",
                                     "--registry", registry.store, "--prompt", "a portrait", "--steps", "2", "--seed",
                                     "3", "--out", str(tmp_path / "own.png")])
    assert again.exit_code == 0, again.output
    own = np.asarray(Image.open(tmp_path / "own.png")).astype(int)
    assert read_provenance((tmp_path / "own.png").read_bytes())["identities"][0]["personal_adapter"] == version
    assert np.abs(own - generated).max() > 0  # two steps on 32 px: a small change, but hers
    renderer = FluxRenderer(RenderConfig(steps=2, device="cpu"), "tiny-flux", out, registry.store, "default",
                            str(tmp_path / "rendered"))  # the next render job, into the same folder
    row = renderer.render_batch([json.dumps({"id": "amy-1", "identities": ["amy"], "prompt": "a portrait",
                                             "seed": 3})], [0])[0]
    assert row["status"] == "ok" and not row["cached"], row  # a new key: her own adapter
    assert np.abs(np.asarray(Image.open(row["output_uri"])).astype(int) - own).max() <= 1
    (answer,) = asyncio.run(generator._generate_group([{
        "kind": "generate", "tenant": "default", "identities": [{"id": amy}], "prompt": "a portrait",
        "negative_prompt": "", "seed": 3, "num_images": 1, "steps": 2, "guidance": None, "width": 32, "height": 32,
        "cancelled": threading.Event()}]))
    assert np.abs(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int) - own).max() <= 1
    with pytest.raises(BadInput, match="makes its identity adapter from scratch"):
        run_training(small_dataset, "tiny-flux", str(tmp_path / "imr"), TrainConfig(method="imr", steps=1, workers=1),
                     adapter=out)
