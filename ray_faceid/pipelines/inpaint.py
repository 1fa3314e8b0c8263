"""Identity inpainting: image + mask + identity + prompt -> image.

Generation runs at the nearest size the model accepts; the result is composited back onto the
original at its own resolution through a mask feathered inwards only, so every pixel outside
the mask is returned unchanged, byte for byte.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt

from ray_faceid.errors import BadInput
from ray_faceid.pipelines.generate import (
    GenerationItem,
    GenerationResult,
    IdentityCondition,
    IdentityPipeline,
    with_identity_start,
)
from ray_faceid.pipelines.provenance import png_with_provenance


def binary_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Any mask image (L, RGB, RGBA; white = repaint) -> bool (H, W) matching the image."""
    if mask.shape[:2] != shape:
        raise BadInput(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image is {shape[1]}x{shape[0]}: they must match")
    if mask.ndim == 3:  # mean over the colour channels > 127, in integers (no float copy of a large mask)
        channels = mask[..., :3]
        binary = channels.astype(np.uint16).sum(axis=-1) > 127 * channels.shape[-1]
    else:
        binary = mask > 127
    if not binary.any():
        raise BadInput("mask is empty: paint the region to repaint in white")
    return binary


def feathered(mask: np.ndarray, radius: float) -> np.ndarray:
    """Float mask in [0, 1]: exactly 0 outside the mask, 1 from `radius` pixels inside its edge on,
    rising smoothly over those `radius` pixels (by each pixel's distance to the nearest outside one)."""
    if radius <= 0 or mask.all():  # all of it: no edge to blend (and no outside pixel to measure from)
        return mask.astype(np.float32)
    depth = distance_transform_edt(mask)  # 1 on the mask's edge pixels, 0 outside
    ramp = np.clip((depth - 0.5) / radius, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep: no visible kink at either end


def paste_back(image: np.ndarray, region: np.ndarray, generated: Image.Image, feather: float) -> np.ndarray:
    """`image` with the masked region taken from `generated` (any size; resized onto the image),
    blended over a feathered edge. Computed in the mask's bounding box only, so a large photo costs its
    uint8 copy, not float copies of every pixel."""
    height, width = region.shape
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    margin = 2  # outside pixels around the box: the feather measures from them
    y0, y1 = max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)
    x0, x1 = max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)
    sx, sy = generated.width / width, generated.height / height
    patch = np.asarray(generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS,
                                        box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)), dtype=np.float32)
    inside, original = region[y0:y1, x0:x1], image[y0:y1, x0:x1]
    alpha = feathered(inside, feather)[..., None]
    blended = original.astype(np.float32) * (1 - alpha) + patch * alpha
    out = image.copy()
    out[y0:y1, x0:x1] = np.where(inside[..., None], np.clip(blended.round(), 0, 255), original).astype(np.uint8)
    return out


def working_size(width: int, height: int, step: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return (max(step, round(width * scale / step) * step), max(step, round(height * scale / step) * step))


@torch.no_grad()
def inpainting_conditioning(pipe: IdentityPipeline, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What a 9-channel inpainting UNet was trained to read, prepared as diffusers'
    StableDiffusionInpaintPipeline does: the mask binarised at 0.5 and resized to the latents
    (nearest), and the latents of the image with the masked pixels set to 0 in [-1, 1] (masked in
    pixel space, then encoded). The posterior's mode is used, not a sample: the same request gives
    the same image. `image` (H, W, 3) uint8 and `mask` (H, W) in [0, 1] at the working size."""
    vae, f = pipe.base.vae, pipe.base.vae_scale_factor
    binary = torch.from_numpy((np.asarray(mask) >= 0.5).astype(np.float32))[None, None].to(pipe.device)
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0).to(pipe.device) / 127.5 - 1
    masked = pixels * (binary < 0.5)
    latents = vae.encode(masked.to(vae.dtype)).latent_dist.mode().float() * vae.config.scaling_factor
    return F.interpolate(binary, size=(binary.shape[2] // f, binary.shape[3] // f)), latents


def inpaint(pipe: IdentityPipeline, image: np.ndarray, mask: np.ndarray, identity: IdentityCondition | None, prompt: str,
            negative_prompt: str = "", seed: int = 0, steps: int | None = None, guidance: float | None = None,
            feather: float = 4.0, max_side: int | None = None, sampler=None, identity_start: int = 0) -> GenerationResult:
    """Steps, guidance and scheduler default to the base's own (`sampler`: another, schedulers.py); the image is
    repainted at up to `max_side` pixels (default: the base's native size) and pasted back at its own size.
    `identity` None: the prompt alone repaints the mask."""
    height, width = image.shape[:2]
    steps, max_side = steps or pipe.base.default_steps, max_side or max(pipe.base.native_size)
    guidance = pipe.base.default_guidance if guidance is None else guidance
    region = binary_mask(mask, (height, width))
    people = [] if identity is None else [identity]
    if people and pipe.adapter is not None and pipe.adapter.kind.identitynet and identity.pose is None:
        # InstantID: IdentityNet reads where the face goes; without a pose, a frontal face filling the mask.
        from ray_faceid.identity.instantid import box_points

        ys, xs = np.nonzero(region)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        people = [dataclasses.replace(identity, pose=box_points(box, width, height))]
    base = pipe.base
    step = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)  # clean latent pyramid
    gen_w, gen_h = working_size(width, height, step, max_side)
    resized = np.asarray(Image.fromarray(image).resize((gen_w, gen_h), Image.Resampling.LANCZOS))
    small_mask = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize((gen_w, gen_h)), dtype=np.float32) / 255
    mask_t = torch.from_numpy(small_mask)[None, None].to(pipe.device)
    f = base.vae_scale_factor
    # Max-pool so a latent cell touched by the mask is repainted whole.
    mask_latent = F.max_pool2d(mask_t, f, f)
    image_latents = pipe.encode_image(resized)
    conditioning = inpainting_conditioning(pipe, resized, small_mask) if base.inpainting else None
    item = GenerationItem(prompt, people, negative_prompt, seed, identity_start)
    latents = pipe._denoise([item], steps, guidance, gen_w, gen_h, inpaint=(image_latents, mask_latent, conditioning),
                            callback=pipe.on_step, sampler=sampler)
    result_image = Image.fromarray(paste_back(image, region, pipe.decode(latents), feather))
    record = pipe.provenance("inpaint", prompt, negative_prompt, people, seed, steps, guidance, width, height,
                             sampler)
    record = dict(with_identity_start(record, item), feather=feather)
    return GenerationResult([result_image], [png_with_provenance(result_image, record)], [record], [seed])
