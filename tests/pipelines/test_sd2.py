"""SD 2.x: a folder saved by diffusers with a 1024-wide text encoder and a v-prediction scheduler (as
stable-diffusion-2-1 ships) is read as SD 2.x and samples as diffusers does with every named
scheduler, generate and inpaint (the v-prediction target reaching each sampler's update)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import load_base
from ray_faceid.pipelines.schedulers import SHORT_NAMES, Sampler

SIZE = dict(width=32, height=32)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """SD 2.x's structure at toy size: OpenCLIP's 1024 width, linear projections in the transformer
    blocks, DDIM with v-prediction (stable-diffusion-2-1's scheduler)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ray_faceid.pipelines.tiny_tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, layers_per_block=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    folder = tmp_path_factory.mktemp("sd21")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd2(sd2_folder):
    base = load_base(str(sd2_folder))
    assert base.family == "sd2" and base.scheduler.config.prediction_type == "v_prediction"
    return base


def swapped(base, name: str):
    import diffusers

    class_name, settings = SHORT_NAMES[name]
    return getattr(diffusers, class_name).from_config(base.scheduler.config, **settings)


@pytest.mark.parametrize("name", list(SHORT_NAMES))
def test_each_named_scheduler_samples_v_prediction_as_diffusers_does(sd2_folder, sd2, name):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = swapped(sd2, name)
    want = reference("a portrait", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                     output_type="np", **SIZE).images[0]
    got = IdentityPipeline(sd2).generate("a portrait", [], seed=7, steps=4, sampler=Sampler.parse(name), **SIZE)
    assert np.abs(np.asarray(got.images[0]).astype(int) - np.round(want * 255).astype(int)).max() <= 1
    assert got.provenance[0]["base_family"] == "sd2" and got.provenance[0]["scheduler"]["class"] == SHORT_NAMES[name][0]
    if name == "ddim":  # the test can tell: the same UNet read as epsilon-predicting is another image
        epsilon = IdentityPipeline(sd2).generate("a portrait", [], seed=7, steps=4, sampler=Sampler.parse(
            name, ["prediction_type=epsilon"]), **SIZE)
        assert np.abs(np.asarray(epsilon.images[0]).astype(int) - np.asarray(got.images[0]).astype(int)).max() > 2


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m-karras", "unipc"])
def test_inpaint_with_each_scheduler_is_diffusers_own_inside_the_mask(sd2, spec128, name):
    """The blended path (a text-to-image base), identity scale 0: diffusers' inpaint pipeline's pixels
    inside the mask, the photo's own outside."""
    from diffusers import StableDiffusionInpaintPipeline

    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.inpaint import inpaint

    pipe = IdentityPipeline(sd2, IdentityAdapter.for_unet(sd2.unet, spec128))
    try:
        image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255  # on latent cells: diffusers' nearest resize and our max-pool agree
        silent = IdentityCondition("ann", np.random.default_rng(1).normal(size=(1, 128)).astype(np.float32), scale=0.0)
        ours = inpaint(pipe, image, mask, silent, "a face", seed=7, steps=3, feather=0, sampler=Sampler.parse(name))
        reference = StableDiffusionInpaintPipeline(vae=sd2.vae, text_encoder=sd2.text_encoder, tokenizer=sd2.tokenizer,
                                                   unet=sd2.unet, scheduler=swapped(sd2, name), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
        # Latents given, not pixels: diffusers samples the VAE posterior where ours takes its mean (its
        # masked-image latents only feed 9-channel UNets: given, so it does not mask the latents as pixels).
        latents = pipe.encode_image(image)
        want = reference("a face", image=latents, masked_image_latents=latents, mask_image=Image.fromarray(mask),
                         strength=1.0,
                         num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                         output_type="np", **SIZE).images[0]
    finally:
        IdentityAdapter.remove(sd2.unet)
    got, inside = np.asarray(ours.images[0]).astype(int), mask > 0
    assert np.abs(got[inside] - np.round(want * 255).astype(int)[inside]).max() <= 1
    assert np.array_equal(got[~inside], image[~inside])
