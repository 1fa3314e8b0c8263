"""Inpainting's paste-back works in the mask's box only and gives what the whole-image blend gives."""
import numpy as np
from PIL import Image

from ray_faceid.pipelines.inpaint import binary_mask, feathered, paste_back


def whole_image_blend(image, region, generated, feather):
    full = np.asarray(generated.resize(region.shape[::-1], Image.Resampling.LANCZOS), dtype=np.float32)
    alpha = feathered(region, feather)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + full * alpha
    return np.where(region[..., None], np.clip(out.round(), 0, 255), image).astype(np.uint8)


def test_paste_back_matches_the_whole_image_blend_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    mask = np.zeros((300, 420, 3), np.uint8)
    mask[90:200, 150:260] = 255
    region = binary_mask(mask, (300, 420))
    generated = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = paste_back(image, region, generated, feather=4.0)
    assert np.array_equal(out[~region], image[~region])
    assert np.abs(out.astype(int) - whole_image_blend(image, region, generated, 4.0).astype(int)).max() <= 2
    assert np.abs(out[region].astype(int) - image[region].astype(int)).mean() > 20  # the region did change
