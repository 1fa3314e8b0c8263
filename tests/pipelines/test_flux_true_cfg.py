"""True classifier-free guidance on FLUX (a negative prompt, each step's transformer run twice): the
image equals diffusers' FluxPipeline(true_cfg_scale=, negative_prompt=) within 1/255; with PuLID-FLUX
its negative pass takes the IDFormer's unconditional tokens from step 1, as PuLID's app does."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import IdentityCondition
from tests.pipelines.test_flux import SIZE, STEPS, diffusers_images, folders  # noqa: F401 - a fixture
from tests.pipelines.test_pulid_flux import files, generator, tokens  # noqa: F401 - a fixture


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def test_true_cfg_makes_the_image_of_diffusers_flux_pipeline(folders):  # noqa: F811
    from ray_faceid.pipelines.flux import load_flux

    ours = FluxGenerator(load_flux(folders["dev"])).generate(
        "a portrait photo", seed=3, steps=STEPS, width=SIZE, height=SIZE, negative_prompt="blurry", true_cfg=3.0)
    want = diffusers_images(folders["dev"], [3], negative_prompt="blurry", true_cfg_scale=3.0)[0]
    plain = diffusers_images(folders["dev"], [3])[0]
    assert np.abs(pixels(ours) - want).max() <= 1 and np.abs(want - plain).max() > 2
    record = ours.provenance[0]
    assert record["true_cfg"] == 3.0 and record["negative_prompt"] == "blurry" and record["true_cfg_from_step"] == 0


def test_pulids_true_cfg_starts_at_step_1_with_its_unconditional_tokens(files):  # noqa: F811
    gen = generator(files)
    adapter = gen.adapter
    ann = IdentityCondition("ann", tokens(1))
    # PuLID's uncond_id: its IDFormer on zeros of the embeddings and of EVA-L's 577 hidden-state tokens.
    encoder = adapter.pulid_encoder
    zeros = torch.zeros(1, encoder.id_embedding_mapping[0].in_features)
    hidden = [torch.zeros(1, 577, encoder.mapping_0[0].in_features)] * 5
    with torch.no_grad():
        assert torch.allclose(adapter.uncond_tokens(), encoder(zeros, hidden)[0])

    def image(steps, **kwargs):
        return pixels(gen.generate("a portrait", [ann], seed=3, steps=steps, width=SIZE, height=SIZE, **kwargs))

    # One step: true CFG has not started (PuLID's timestep_to_start_cfg = 1), the image is the plain one.
    assert np.array_equal(image(1, negative_prompt="blurry", true_cfg=4.0), image(1))
    guided = image(2, negative_prompt="blurry", true_cfg=4.0)
    assert np.abs(guided - image(2)).max() > 2
    # The negative pass holds the unconditional tokens, not nobody: another image than without them.
    uncond = gen.adapter.uncond_tokens
    gen.adapter.uncond_tokens = None
    try:
        assert np.abs(image(2, negative_prompt="blurry", true_cfg=4.0) - guided).max() > 0
    finally:
        gen.adapter.uncond_tokens = uncond


def test_a_compiled_transformer_runs_true_cfg_without_recompiling(files):  # noqa: F811
    from torch._dynamo.utils import counters

    compiled, eager = generator(files, "torch.compile"), generator(files)
    ann = IdentityCondition("ann", tokens(1))
    compiled.generate("a portrait", [ann], seed=3, steps=2, width=SIZE, height=SIZE)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate("a portrait", [ann], seed=3, steps=2, width=SIZE, height=SIZE,
                                negative_prompt="blurry", true_cfg=2.0)
    assert counters["stats"]["unique_graphs"] == graphs
    want = eager.generate("a portrait", [ann], seed=3, steps=2, width=SIZE, height=SIZE, negative_prompt="blurry",
                          true_cfg=2.0)
    assert np.abs(pixels(got) - pixels(want)).max() <= 1


def test_the_command_takes_a_negative_prompt_with_true_cfg_and_says_what_it_needs(folders, tmp_path):  # noqa: F811
    from ray_faceid.pipelines.provenance import read_provenance

    common = ["generate", "--model", folders["dev"], "--prompt", "a portrait", "--steps", "2", "--negative-prompt",
              "blurry"]
    refused = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "give --true-cfg S over 1" in " ".join(refused.stderr.split()), refused.output
    made = CliRunner().invoke(app, [*common, "--true-cfg", "2.5", "--out", str(tmp_path / "a.png")])
    assert made.exit_code == 0, made.output
    assert read_provenance((tmp_path / "a.png").read_bytes())["true_cfg"] == 2.5
    alone = CliRunner().invoke(app, ["generate", "--model", folders["dev"], "--prompt", "a portrait", "--true-cfg", "2",
                                     "--out", str(tmp_path / "x.png")])  # diffusers runs none without a negative
    assert alone.exit_code == 2 and "give one" in alone.stderr, alone.output
    on_unet = CliRunner().invoke(app, ["generate", "--model", "tiny", "--prompt", "a portrait", "--true-cfg", "2",
                                       "--out", str(tmp_path / "x.png")])
    assert on_unet.exit_code == 2 and "--true-cfg is for FLUX bases" in on_unet.stderr, on_unet.output
    with pytest.raises(BadInput, match="not both"):
        from ray_faceid.pipelines.flux_sampling import check_true_cfg

        check_true_cfg(2.0, True, 0.1)
