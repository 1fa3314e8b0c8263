"""Samplers: a base runs with its folder's own scheduler, and a request may name another; either way
the image is diffusers' own (its pipeline with `Scheduler.from_config(...)` swapped in), stochastic
schedulers included (each image's generator draws in diffusers' order, alone or batched)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.generate import IdentityPipeline
from ray_faceid.pipelines.models import build_tiny, load_base
from ray_faceid.pipelines.provenance import read_provenance
from ray_faceid.pipelines.schedulers import SHORT_NAMES, Sampler

SIZE = dict(width=32, height=32)


def diffusers_pipeline(base, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.family == "sdxl":
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                         scheduler=scheduler, add_watermarker=False)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def diffusers_images(pipe, seeds, steps=4, **kwargs) -> list[np.ndarray]:
    """diffusers' images for one prompt, one generator per image (a batch when several)."""
    out = pipe("a portrait", num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=len(seeds),
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **SIZE, **kwargs).images
    return [np.round(image * 255).astype(int) for image in out]


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny()


@pytest.mark.parametrize("name", list(SHORT_NAMES))
def test_each_named_scheduler_gives_diffusers_own_image(sd1, name):
    import diffusers

    class_name, settings = SHORT_NAMES[name]
    scheduler = getattr(diffusers, class_name).from_config(sd1.scheduler.config, **settings)
    (want,) = diffusers_images(diffusers_pipeline(sd1, scheduler), [7])
    got = IdentityPipeline(sd1).generate("a portrait", [], seed=7, steps=4, sampler=Sampler.parse(name), **SIZE)
    assert np.abs(pixels(got.images[0]) - want).max() <= 1
    assert got.provenance[0]["scheduler"]["class"] == class_name


@pytest.mark.parametrize("name", ["euler-a", "dpm++2m-sde-karras"])
def test_a_stochastic_scheduler_draws_per_image_as_diffusers_does_on_sdxl(name):
    """Two images in one batch, each with its own generator: diffusers' batch, and each image the
    same as when it is made alone."""
    import diffusers

    base = build_tiny(family="sdxl")
    class_name, settings = SHORT_NAMES[name]
    scheduler = getattr(diffusers, class_name).from_config(base.scheduler.config, **settings)
    want = diffusers_images(diffusers_pipeline(base, scheduler), [3, 4])
    pipe, sampler = IdentityPipeline(base), Sampler.parse(name)
    batch = pipe.generate("a portrait", [], seed=3, steps=4, num_images=2, sampler=sampler, **SIZE)
    for got, expected in zip(batch.images, want):
        assert np.abs(pixels(got) - expected).max() <= 1
    alone = pipe.generate("a portrait", [], seed=4, steps=4, sampler=sampler, **SIZE)
    assert np.abs(pixels(alone.images[0]) - pixels(batch.images[1])).max() <= 1
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).max() > 2


def test_a_folder_runs_with_its_own_scheduler_by_default(tmp_path, sd1):
    """A folder saved with Euler (SDXL's usual) samples with Euler, not DDIM: diffusers' image of the folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    euler = EulerDiscreteScheduler.from_config(sd1.scheduler.config)
    diffusers_pipeline(sd1, euler).save_pretrained(tmp_path / "model")
    (want,) = diffusers_images(StableDiffusionPipeline.from_pretrained(tmp_path / "model"), [5])
    base = load_base(str(tmp_path / "model"))
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    got = IdentityPipeline(base).generate("a portrait", [], seed=5, steps=4, **SIZE)
    assert np.abs(pixels(got.images[0]) - want).max() <= 1
    assert got.provenance[0]["scheduler"] == {"class": "EulerDiscreteScheduler", "name": "the base's own"}
    # A request's scheduler is its own: the base's stays what the folder says.
    IdentityPipeline(base).generate("a portrait", [], seed=5, steps=2, sampler=Sampler.parse("ddim"), **SIZE)
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"


def test_config_overrides_reach_the_scheduler_and_unknown_ones_are_refused(sd1):
    import diffusers

    sampler = Sampler.parse("EulerDiscreteScheduler", ["timestep_spacing=trailing", "use_karras_sigmas=true"])
    scheduler = diffusers.EulerDiscreteScheduler.from_config(sd1.scheduler.config, timestep_spacing="trailing",
                                                             use_karras_sigmas=True)
    (want,) = diffusers_images(diffusers_pipeline(sd1, scheduler), [2])
    got = IdentityPipeline(sd1).generate("a portrait", [], seed=2, steps=4, sampler=sampler, **SIZE)
    assert np.abs(pixels(got.images[0]) - want).max() <= 1
    assert got.provenance[0]["scheduler"]["config"] == {"timestep_spacing": "trailing", "use_karras_sigmas": True}
    with pytest.raises(BadInput, match="no setting karras; it has .*use_karras_sigmas"):
        Sampler.parse("euler", ["karras=true"])
    with pytest.raises(BadInput, match="no scheduler 'dpm\\+\\+3m'; use one of ddim, pndm, euler"):
        Sampler.parse("dpm++3m")


def test_the_cli_takes_a_scheduler_and_refuses_an_unknown_one_in_one_line(tmp_path):
    out = tmp_path / "a.png"
    fast = ["--prompt", "a portrait", "--face-embedding", str(tmp_path / "emb.npy"), "--size", "32x32", "--steps", "3"]
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    refused = CliRunner().invoke(app, ["generate", "--out", str(out), "--scheduler", "nonesuch", *fast])
    assert refused.exit_code == 2 and "no scheduler 'nonesuch'; use one of ddim" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    done = CliRunner().invoke(app, ["generate", "--out", str(out), "--scheduler", "euler-a",
                                    "--scheduler-config", "timestep_spacing=trailing", *fast])
    assert done.exit_code == 0, done.output
    record = read_provenance(out.read_bytes())
    assert record["scheduler"] == {"class": "EulerAncestralDiscreteScheduler", "name": "euler-a",
                                   "config": {"timestep_spacing": "trailing"}}
    assert Image.open(out).size == (32, 32)
    assert json.dumps(record)  # the record stays plain JSON
