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


def test_feather_blends_exactly_its_width_inside_the_edge():
    """`--feather 8` on a 40 px hole: fully repainted from 8 px inside the edge on, and each step
    inwards repaints more (before, the hole was eroded by 8 and blurred by 8: its centre only 74%)."""
    region = np.zeros((80, 80), bool)
    region[20:60, 20:60] = True
    alpha = feathered(region, 8.0)
    assert alpha[~region].max() == 0.0
    assert np.all(alpha[28:52, 28:52] == 1.0)  # 8 px and more inside: the generated pixels alone
    ramp = alpha[40, 20:29]  # the middle row, from the edge inwards
    assert 0 < ramp[0] < 0.2 and np.all(np.diff(ramp) > 0)
    assert np.array_equal(feathered(region, 0.0), region.astype(np.float32))  # 0: a hard edge
    thin = np.zeros((80, 80), bool)
    thin[10:70, 38:42] = True  # a 4 px stroke under feather 8 still repaints something
    assert feathered(thin, 8.0)[40, 38:42].max() > 0.05
    # A mask over the whole photo has no edge to blend: all of it repainted (the distance had no
    # outside pixel to measure from, and left the photo's own pixels in a corner).
    assert feathered(np.ones((32, 40), bool), 4.0).min() == 1.0
