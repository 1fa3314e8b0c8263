"""PuLID-FLUX's file (its published names, built at toy size for tiny-flux) on the FLUX transformer:
its ID cross-attentions add to the image stream after every 2nd dual-stream and every 4th
single-stream block and nowhere else; a weight of 0 leaves FLUX's own image; people are inputs of
each call (batched rows and regions, the compiled transformer without recompiles); what is not built
(its face encoders) is refused in one line on every path that would need it."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.identity.pulid_flux import IdResidual, load_pulid_flux
from ray_faceid.identity.stand_ins import PULID_TOKENS, PULID_WIDTH, pulid_state_dict
from ray_faceid.pipelines.flux import build_tiny_flux, load_flux, save_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pulid")
    base = build_tiny_flux()
    save_flux(base, root / "flux")
    save_file(pulid_state_dict(base.transformer), root / "pulid_flux_v0.9.1.safetensors")
    return root


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(PULID_TOKENS, PULID_WIDTH)).astype(np.float32)


def generator(files, backend="torch") -> FluxGenerator:
    base = load_flux(str(files / "flux"))
    return FluxGenerator(base, load_pulid_flux(str(files / "pulid_flux_v0.9.1.safetensors"), base.transformer),
                         backend=backend)


def image(gen, people, seed=3) -> np.ndarray:
    return np.asarray(gen.generate("a portrait", people, seed=seed, steps=STEPS, width=SIZE, height=SIZE).images[0]
                      ).astype(int)


def test_the_residuals_sit_after_every_2nd_dual_and_every_4th_single_stream_block():
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=5,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    adapter = load_pulid_flux(_saved(pulid_state_dict(transformer)), transformer)
    adapter.install(transformer)
    adapter.install(transformer)  # a second install replaces the first's hooks
    hooked = [[isinstance(h, IdResidual) for h in block._forward_hooks.values()]
              for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]
    assert hooked == [[True], [], [True], [True], [], [], [], [True]]  # dual 0, 2; single 0, 4
    with pytest.raises(UnsupportedModel, match="blocks takes 4: it was made for another model"):
        load_pulid_flux(_saved(pulid_state_dict(build_tiny_flux().transformer)), transformer).install(transformer)


def _written_out(transformer, adapter, inputs: dict, tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """FLUX's forward pass with PuLID's residual written out from its description, apart from the
    hooks: after dual-stream blocks 0, 2, 4... and single-stream blocks 0, 4, 8..., the image stream
    plus weight x the softmax attention of its layer-normed queries over the layer-normed ID tokens."""
    import torch.nn.functional as F

    def residual(ca, image):
        q = ca.to_q(F.layer_norm(image, image.shape[-1:], ca.norm2.weight, ca.norm2.bias))
        k, v = ca.to_kv(F.layer_norm(tokens, tokens.shape[-1:], ca.norm1.weight, ca.norm1.bias)).chunk(2, dim=-1)
        heads = q.shape[-1] // 128
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return ca.to_out((attention @ v).transpose(1, 2).flatten(2))

    hidden = transformer.x_embedder(inputs["hidden_states"])
    temb = transformer.time_text_embed(inputs["timestep"] * 1000, inputs["pooled_projections"])
    text = transformer.context_embedder(inputs["encoder_hidden_states"])
    rotary = transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    attentions = iter(adapter.pulid_ca)
    for i, block in enumerate(transformer.transformer_blocks):
        text, hidden = block.forward(hidden, text, temb, rotary)
        if i % 2 == 0:
            hidden = hidden + weight * residual(next(attentions), hidden)
    for i, block in enumerate(transformer.single_transformer_blocks):
        text, hidden = block.forward(hidden, text, temb, rotary)
        if i % 4 == 0:
            hidden = hidden + weight * residual(next(attentions), hidden)
    assert next(attentions, None) is None
    return transformer.proj_out(transformer.norm_out(hidden, temb))


def test_the_hooked_transformer_equals_pulids_loop_written_out():
    """PuLID's reference code is no package: its loop and attention are written out here from their
    description, independently of the hooks, and the hooked transformer's output must match it."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=5,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    adapter = load_pulid_flux(_saved(pulid_state_dict(transformer)), transformer)
    adapter.install(transformer)
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=g), "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
              "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.7]),
              "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                                     -1).reshape(16, 3),
              "txt_ids": torch.zeros(8, 3)}
    person = torch.randn(1, PULID_TOKENS, PULID_WIDTH, generator=g)
    with torch.no_grad():
        hooked = transformer(**inputs, joint_attention_kwargs={"identity_tokens": person[:, None],
                                                               "identity_scale": torch.tensor([[0.8]])}).sample
        want = _written_out(transformer, adapter, inputs, person, 0.8)
        alone = transformer(**inputs).sample  # no identity inputs: FLUX's own
    assert (want - alone).abs().max() > 0.1  # the identity moves the output: the match below means something
    assert torch.allclose(hooked, want, atol=1e-4), (hooked - want).abs().max()


def _saved(state: dict) -> str:
    import tempfile

    path = tempfile.mktemp(suffix=".safetensors")
    save_file(state, path)
    return path


def test_the_id_tokens_reach_the_image_and_a_zero_weight_leaves_fluxs_own(files, caplog):
    with caplog.at_level("WARNING"):
        gen = generator(files)
    assert "recognised PuLID-FLUX: 4 ID tokens of 24, 2 ID cross-attentions" in caplog.text
    plain = FluxGenerator(load_flux(str(files / "flux")))
    base_image = image(plain, [])
    assert np.array_equal(image(gen, [IdentityCondition("ann", tokens(1), scale=0.0)]), base_image)
    ann, bob = image(gen, [IdentityCondition("ann", tokens(1))]), image(gen, [IdentityCondition("bob", tokens(2))])
    assert np.abs(ann - base_image).max() > 8 and np.abs(ann - bob).max() > 8
    # Several photos' tokens (N x T x C) are their mean.
    assert np.array_equal(image(gen, [IdentityCondition("ann", np.stack([tokens(1), tokens(1)]))]), ann)
    record = gen.generate("a portrait", [IdentityCondition("ann", tokens(1))], steps=1).provenance[0]
    assert record["adapter_published"]["kind"] == "PuLID-FLUX" and "Non-Commercial" in \
        record["adapter_published"]["licence"]
    with pytest.raises(BadInput, match="PuLID-FLUX takes its ID tokens, 4 x 24 finite numbers"):
        gen.generate("a portrait", [IdentityCondition("p", np.ones((1, 16), np.float32))], steps=1)
    assert "FLUX.1 dev" not in caplog.text  # said only where the base is not the one it was trained on
    caplog.clear()
    with caplog.at_level("WARNING"):  # on schnell it runs, and says it was trained on dev
        load_pulid_flux(str(files / "pulid_flux_v0.9.1.safetensors"), build_tiny_flux(guidance_embeds=False).transformer)
    assert "PuLID-FLUX was trained on FLUX.1 dev" in caplog.text


def test_rows_of_other_people_share_a_batch_and_each_person_keeps_to_their_region(files):
    gen = generator(files)
    rows = [[IdentityCondition("ann", tokens(1))],
            [IdentityCondition("ann", tokens(1), region=(0.0, 0.0, 0.5, 1.0)),
             IdentityCondition("bob", tokens(2), region=(0.5, 0.0, 1.0, 1.0))]]
    batch = gen.generate_items([GenerationItem("a portrait", people, seed=3) for people in rows], steps=STEPS,
                               width=SIZE, height=SIZE)
    for people, got in zip(rows, batch.images):
        assert np.abs(np.asarray(got).astype(int) - image(gen, people)).max() <= 1
    # Bob's tokens reach his half alone: his change moves the right half's patches, not the left's
    # (the joint attention carries some of it across: measured against a change of everyone's).
    other = [rows[1][0], IdentityCondition("bob", tokens(5), region=(0.5, 0.0, 1.0, 1.0))]
    left = SIZE // 2 - 4
    moved = np.abs(image(gen, other) - np.asarray(batch.images[1]).astype(int))
    assert moved[:, SIZE // 2:].mean() > 3 * moved[:, :left].mean()


def test_the_compiled_transformer_and_its_onnx_graph_take_people_as_inputs(files, tmp_path):
    from torch._dynamo.utils import counters

    compiled = generator(files, "torch.compile")
    compiled.warm_up([(SIZE, SIZE)], 1)
    graphs = counters["stats"]["unique_graphs"]
    first = image(compiled, [IdentityCondition("ann", tokens(1))])
    image(compiled, [IdentityCondition("bob", tokens(2), scale=0.5)])
    image(compiled, [])
    assert counters["stats"]["unique_graphs"] == graphs  # people and strengths are inputs
    eager = generator(files)
    assert np.abs(first - image(eager, [IdentityCondition("ann", tokens(1))])).max() <= 1
    # Its residual hooks are in FLUX's ONNX graph too (onnxruntime: the people are the graph's inputs).
    from ray_faceid.engines.cache import EngineCache

    base = load_flux(str(files / "flux"))
    onnx = FluxGenerator(base, load_pulid_flux(str(files / "pulid_flux_v0.9.1.safetensors"), base.transformer),
                         backend="onnxruntime", engine_cache=EngineCache(tmp_path))
    two = [IdentityCondition("ann", tokens(1), region=(0.0, 0.0, 0.5, 1.0)), IdentityCondition("bob", tokens(2))]
    assert np.abs(image(onnx, two) - image(eager, two)).max() <= 1
    assert np.abs(image(onnx, two) - image(eager, [])).max() > 2


def test_what_it_cannot_read_is_refused_in_one_line(files, tmp_path, sample_photos):
    from ray_faceid.cli import app

    pulid = str(files / "pulid_flux_v0.9.1.safetensors")
    np.save(tmp_path / "ann.npy", tokens(1)[None])  # as PuLID's get_id_embedding gives them: 1 x T x C
    made = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--adapter", pulid, "--face-embedding",
                                    str(tmp_path / "ann.npy"), "--prompt", "a portrait", "--steps", "2", "--out",
                                    str(tmp_path / "ann.png")])
    assert made.exit_code == 0, made.output
    photo = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--adapter", pulid, "--ref",
                                     str(sample_photos["Tom_Hanks_54745.png"]), "--prompt", "a portrait", "--out",
                                     str(tmp_path / "o.png")])
    said = " ".join(photo.stderr.split())
    assert photo.exit_code == 2 and "give --image-encoder FOLDER (EVA02-CLIP and its face parser) and " \
        "--insightface-root PACK (antelopev2: its ArcFace)" in said, photo.output
    on_sd = CliRunner().invoke(app, ["generate", "--model", "tiny", "--adapter", pulid, "--face-embedding",
                                     str(tmp_path / "ann.npy"), "--prompt", "a portrait", "--out", str(tmp_path / "o.png")])
    assert on_sd.exit_code == 2 and "PuLID-FLUX's, on a FLUX base" in on_sd.stderr, on_sd.output
    np.save(tmp_path / "flat.npy", np.ones((1, 16), np.float32))
    on_sd = CliRunner().invoke(app, ["generate", "--model", "tiny", "--adapter", pulid, "--face-embedding",
                                     str(tmp_path / "flat.npy"), "--prompt", "a portrait", "--out", str(tmp_path / "o.png")])
    assert on_sd.exit_code == 2 and "is a PuLID-FLUX file: it runs on a FLUX.1 base" in on_sd.stderr, on_sd.output
    from ray_faceid.data.render import run_render

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "r1", "identities": ["ann"], "prompt": "a portrait"}) + "\n")
    with pytest.raises(BadInput, match="PuLID-FLUX renders enrolled people read by its encoders"):
        run_render(str(catalog), str(tmp_path / "out"), str(files / "flux"), str(tmp_path / "registry"), pulid)
    state = pulid_state_dict(build_tiny_flux().transformer)
    state.pop("pulid_ca.1.to_out.weight")
    with pytest.raises(UnsupportedModel, match="do not fit PuLID-FLUX's layout"):
        load_pulid_flux(_saved(state), build_tiny_flux().transformer)
    state = pulid_state_dict(build_tiny_flux().transformer)
    state.pop("pulid_encoder.layers.0.0.to_q.weight")
    with pytest.raises(UnsupportedModel, match="lack PuLID-FLUX's layout"):
        load_pulid_flux(_saved(state), build_tiny_flux().transformer)
    from ray_faceid.identity.flux_adapter import load_flux_identity

    (tmp_path / "cut.safetensors").write_bytes(b"\x05\x00")  # a truncated download: one line, not a traceback
    with pytest.raises(UnsupportedModel, match="not a readable safetensors file"):
        load_flux_identity(str(tmp_path / "cut.safetensors"), build_tiny_flux().transformer)
    with pytest.raises(BadInput, match="its ID tokens are out of range"):  # else a black image
        generator(files).generate("a portrait", [IdentityCondition("p", tokens(1) * 1e30)], steps=1)


def test_the_idformer_turns_the_encoders_outputs_into_id_tokens(files):
    """The file's IDFormer, as PuLID's pipeline feeds it: a raw ArcFace embedding, a unit EVA-CLIP
    embedding (normalised here) and five EVA-CLIP hidden states; each face its own tokens."""
    adapter = generator(files).adapter
    g = torch.Generator().manual_seed(0)
    arc, eva = torch.randn(2, 16, generator=g) * 20, torch.randn(2, 8, generator=g)
    hidden = [torch.randn(2, 5, 12, generator=g) for _ in range(5)]
    made = adapter.encode(arc, eva, hidden)
    assert made.shape == (2, PULID_TOKENS, PULID_WIDTH) and torch.isfinite(made).all()
    assert torch.allclose(adapter.encode(arc, 3 * eva, hidden), made, atol=1e-5)  # the EVA embedding's length is not read
    assert torch.allclose(adapter.encode(arc[:1], eva[:1], [h[:1] for h in hidden])[0], made[0], atol=1e-5)
    assert (made[0] - made[1]).abs().max() > 1e-3


def test_id_tokens_of_the_wrong_shape_are_refused_before_the_base_loads(files, tmp_path, monkeypatch):
    """Read from the file's header: on FLUX.1-dev the base takes minutes to load before a mistyped
    array would be found."""
    from ray_faceid.cli import app
    from ray_faceid.pipelines import flux

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(flux, "load_flux", no_load)
    np.save(tmp_path / "flat.npy", np.ones((1, PULID_WIDTH), np.float32))  # an ArcFace-like vector, not ID tokens
    made = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--adapter",
                                    str(files / "pulid_flux_v0.9.1.safetensors"), "--face-embedding",
                                    str(tmp_path / "flat.npy"), "--prompt", "a portrait", "--out", str(tmp_path / "o.png")])
    assert made.exit_code == 2, made.output
    assert f"PuLID-FLUX takes its ID tokens, {PULID_TOKENS} x {PULID_WIDTH} finite numbers" in made.stderr
    assert f"got shape (1, {PULID_WIDTH})" in made.stderr
