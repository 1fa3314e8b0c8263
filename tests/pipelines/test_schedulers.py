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


@pytest.fixture(scope="module")
def ddim_image(sd1):
    """The tiny base's own (DDIM) image: each other scheduler's differs from it."""
    return pixels(IdentityPipeline(sd1).generate("a portrait", [], seed=7, steps=4, **SIZE).images[0])


@pytest.mark.parametrize("name", list(SHORT_NAMES))
def test_each_named_scheduler_gives_diffusers_own_image(sd1, ddim_image, name):
    import diffusers

    class_name, settings = SHORT_NAMES[name]
    sampler = Sampler.parse(name)
    assert type(sampler.build(sd1.scheduler)).__name__ == class_name
    scheduler = getattr(diffusers, class_name).from_config(sd1.scheduler.config, **settings)
    (want,) = diffusers_images(diffusers_pipeline(sd1, scheduler), [7])
    got = IdentityPipeline(sd1).generate("a portrait", [], seed=7, steps=4, sampler=sampler, **SIZE)
    assert np.abs(pixels(got.images[0]) - want).max() <= 1
    assert (np.abs(pixels(got.images[0]) - ddim_image).max() > 1) == (name != "ddim")  # the test can tell them apart
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
    # A request's scheduler is its own: the base's stays what the folder says, in every setting.
    config, state = dict(base.scheduler.config), base.scheduler.num_inference_steps
    pipe = IdentityPipeline(base)
    pipe.generate("a portrait", [], seed=5, steps=2, sampler=Sampler.parse("ddim"), **SIZE)
    pipe.generate("a portrait", [], seed=5, steps=3, **SIZE)
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert dict(base.scheduler.config) == config and base.scheduler.num_inference_steps == state
    again = pipe.generate("a portrait", [], seed=5, steps=4, **SIZE)
    assert np.array_equal(pixels(again.images[0]), pixels(got.images[0]))


def test_a_folder_without_a_scheduler_config_is_refused_in_one_line(tmp_path, sd1):
    from ray_faceid.errors import UnsupportedModel
    from ray_faceid.pipelines.schedulers import folder_scheduler

    (tmp_path / "scheduler").mkdir()
    with pytest.raises(UnsupportedModel, match="no readable scheduler/scheduler_config.json"):
        folder_scheduler(str(tmp_path))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**dict(sd1.scheduler.config), "_class_name": "SomeoneElsesScheduler"}))
    assert type(folder_scheduler(str(tmp_path))).__name__ == "DDIMScheduler"  # and a warning says so


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
    # diffusers' ValueError, in one line
    with pytest.raises(BadInput, match="EulerDiscreteScheduler with timestep_spacing=sideways: sideways is not supported"):
        Sampler.parse("euler", ["timestep_spacing=sideways"])
    with pytest.raises(BadInput, match="scheduler EulerDiscreteScheduler with use_karras_sigmas=maybe: "):
        Sampler.parse("euler", ["use_karras_sigmas=maybe"])
    assert Sampler.parse("Euler-A").name == "euler-a"  # one name per sampler in the provenance
    with pytest.raises(BadInput, match="DPMSolverSDEScheduler draws its noise from a seed of its own"):
        Sampler.parse("DPMSolverSDEScheduler")
    with pytest.raises(BadInput, match="scheduler LCMScheduler: "):  # LCM takes at most its 50 original steps
        IdentityPipeline(sd1).generate("a portrait", [], steps=60, sampler=Sampler.parse("lcm"), **SIZE)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_inpaint_takes_a_scheduler_and_keeps_the_pixels_outside_the_mask(spec128, name):
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.pipelines.inpaint import inpaint

    base = build_tiny()  # a text-to-image base: the blended path, which noises with the scheduler's add_noise
    person = IdentityCondition("ann", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    pipe = IdentityPipeline(base, IdentityAdapter.for_unet(base.unet, spec128))
    default = pixels(inpaint(pipe, image, mask, person, "a face", steps=3, feather=0).images[0])
    result = inpaint(pipe, image, mask, person, "a face", steps=3, feather=0, sampler=Sampler.parse(name))
    got = pixels(result.images[0])
    assert np.array_equal(got[mask == 0], image[mask == 0])
    assert np.abs(got - default)[mask > 0].max() > 1
    assert result.provenance[0]["scheduler"]["name"] == name


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


def test_training_noises_as_ddpm_whatever_scheduler_the_folder_samples_with(sd1):
    """train and personalize noise latents as the model was trained (sqrt(a) x + sqrt(1 - a) e, and
    v targets), not with a sampler's own add_noise: Euler's is x + sigma e."""
    from diffusers import EulerDiscreteScheduler

    from ray_faceid.identity.objective import diffusion_target, training_noise
    from ray_faceid.pipelines.models import BaseModel

    euler = EulerDiscreteScheduler.from_config(sd1.scheduler.config, prediction_type="v_prediction")
    base = BaseModel(sd1.unet, sd1.vae, sd1.text_encoder, sd1.tokenizer, euler, model_id="euler folder")
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    alpha = torch.cumprod(1 - sd1.scheduler.betas, 0)[t].view(-1, 1, 1, 1)
    noisy = training_noise(base).add_noise(latents, noise, t)
    assert torch.allclose(noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise, atol=1e-5)
    velocity = diffusion_target(training_noise(base), latents, noise, t)
    assert torch.allclose(velocity, alpha.sqrt() * noise - (1 - alpha).sqrt() * latents, atol=1e-5)
    assert type(base.scheduler) is EulerDiscreteScheduler  # the base's sampler stays its own


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_at_most_one_samples_the_prompt_alone_as_diffusers_does(sd1, guidance):
    """Few-step models (SDXL-Turbo, Lightning, LCM) run with guidance 0 or 1: diffusers then drops
    classifier-free guidance and takes the prompt's prediction alone (guidance 0 gave the empty
    prompt's image here), with the folder's trailing spacing as such models ship it."""
    from diffusers import EulerAncestralDiscreteScheduler

    sampler = Sampler.parse("euler-a", ["timestep_spacing=trailing"])

    scheduler = EulerAncestralDiscreteScheduler.from_config(sd1.scheduler.config, timestep_spacing="trailing")
    out = diffusers_pipeline(sd1, scheduler)("a portrait", num_inference_steps=2, guidance_scale=guidance,
                                             generator=[torch.Generator().manual_seed(7)], output_type="np", **SIZE)
    want = np.round(out.images[0] * 255).astype(int)
    rows = []
    hook = sd1.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        got = IdentityPipeline(sd1).generate("a portrait", [], seed=7, steps=2, guidance=guidance, sampler=sampler,
                                             num_images=2, **SIZE)
    finally:
        hook.remove()
    assert np.abs(pixels(got.images[0]) - want).max() <= 1
    assert rows == [2, 2]  # the two images' prompt rows alone: no unconditional rows are run (half the work)


def test_a_serve_config_sets_the_scheduler_of_requests_that_name_none(tmp_path, monkeypatch):
    """The deployment's scheduler (a few-step model's, say) is checked when its config is read, in
    one line, and is what requests without their own get; a request's own wins."""
    from deployments.app import ServeConfigRefused, build_app
    from deployments.schemas import GenerateRequest
    from deployments.service import sampling
    from ray_faceid.config import ServeConfig

    monkeypatch.setenv("RAY_FACEID_API_TOKENS", "ops:0123456789abcdef0123")
    with pytest.raises(ServeConfigRefused, match="scheduler: no scheduler 'eulerr'") as refused:
        build_app(ServeConfig(scheduler="eulerr", registry=str(tmp_path / "registry")))
    assert "\n" not in str(refused.value)
    with pytest.raises(ServeConfigRefused, match="timestep_spacing=sideways"):
        build_app(ServeConfig(scheduler="euler", scheduler_config={"timestep_spacing": "sideways"},
                              registry=str(tmp_path / "registry")))
    config = ServeConfig(scheduler="euler", scheduler_config={"timestep_spacing": "trailing"},
                         registry=str(tmp_path / "registry"))
    assert build_app(config) is not None
    plain = GenerateRequest(prompt="a", identities=[{"name": "ann"}])
    assert sampling(plain, config) == {"scheduler": "euler", "scheduler_config": {"timestep_spacing": "trailing"}}
    own = GenerateRequest(prompt="a", identities=[{"name": "ann"}], scheduler="ddim")
    assert sampling(own, config) == {"scheduler": "ddim", "scheduler_config": {}}


def test_several_people_in_one_image_sample_with_the_scheduler_asked(sd1, spec128):
    """Two people routed to their regions, a stochastic sampler: each image of a batch is the one made
    alone (its own draws), and the sampler asked is the one that made it."""
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityCondition

    rng = np.random.default_rng(0)
    people = [IdentityCondition(name, rng.normal(size=(1, 128)).astype(np.float32), region=box)
              for name, box in (("ann", (0.0, 0.0, 0.5, 1.0)), ("bo", (0.5, 0.0, 1.0, 1.0)))]
    pipe = IdentityPipeline(sd1, IdentityAdapter.for_unet(sd1.unet, spec128))
    try:
        sampler = Sampler.parse("euler-a")
        batch = pipe.generate("two people", people, seed=3, steps=3, num_images=2, sampler=sampler, **SIZE)
        alone = pipe.generate("two people", people, seed=4, steps=3, sampler=sampler, **SIZE)
        own = pipe.generate("two people", people, seed=4, steps=3, **SIZE)
    finally:
        IdentityAdapter.remove(sd1.unet)
    assert np.abs(pixels(alone.images[0]) - pixels(batch.images[1])).max() <= 1
    assert np.abs(pixels(own.images[0]) - pixels(alone.images[0])).max() > 2
    assert batch.provenance[1]["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert [p["name"] for p in batch.provenance[1]["identities"]] == ["ann", "bo"]
