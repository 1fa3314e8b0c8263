"""A 9-channel inpainting UNet gets the conditioning diffusers' inpainting pipeline prepares for the
same image and mask (it used to get VAE(image) * (1 - mask), off the checkpoints' training input)."""
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.pipelines.generate import IdentityPipeline
from ray_faceid.pipelines.inpaint import inpainting_conditioning
from ray_faceid.pipelines.models import build_tiny


def test_nine_channel_conditioning_matches_stable_diffusion_inpaint_preparation(spec128):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.image_processor import VaeImageProcessor

    base = build_tiny(inpainting=True)
    pipe = IdentityPipeline(base, IdentityAdapter.for_unet(base.unet, spec128))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mask = np.zeros((32, 48), np.uint8)
    mask[6:26, 10:30] = 255
    mask[6:26, 30:34] = 100  # a soft edge: below 0.5, kept as image
    mask_channel, masked_latents = inpainting_conditioning(pipe, image, mask / 255.0)

    f = base.vae_scale_factor
    init = VaeImageProcessor(vae_scale_factor=f).preprocess(Image.fromarray(image))
    mask_condition = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True).preprocess(Image.fromarray(mask))
    scaling = base.vae.config.scaling_factor
    reference = SimpleNamespace(  # the pipeline's own method, with its VAE posterior's mode
        vae=base.vae, vae_scale_factor=f,
        _encode_vae_image=lambda pixels, generator: base.vae.encode(pixels).latent_dist.mode() * scaling)
    with torch.no_grad():
        expected_mask, expected_latents = StableDiffusionInpaintPipeline.prepare_mask_latents(
            reference, mask_condition, init * (mask_condition < 0.5), 1, 32, 48, torch.float32, "cpu", None, False)
    assert torch.equal(mask_channel, expected_mask)
    assert torch.allclose(masked_latents, expected_latents, atol=1e-5)
    # and not the old input: the image's latents with the latent mask applied
    old = pipe.encode_image(image) * (1 - expected_mask)
    assert (old - masked_latents).abs().max() > 1e-2
