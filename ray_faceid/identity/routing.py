"""Multi-identity routing: which identity each spatial query may take.

Each identity comes with a region (a box in image fractions, or a mask); by default M identities
get M equal vertical strips. Inside identity i's region the keys of every other identity are
masked out, so no face can take another person's identity. Masks are given at any resolution and
resized to each attention layer's grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]


def strip_boxes(count: int) -> list[Box]:
    """`count` equal vertical strips covering the image, left to right."""
    return [(i / count, 0.0, (i + 1) / count, 1.0) for i in range(count)]


def box_masks(boxes: list[Box], height: int, width: int) -> torch.Tensor:
    """(M, H, W) float masks, 1 inside each box (x0, y0, x1, y1 as fractions of the image)."""
    masks = torch.zeros(len(boxes), height, width)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"region {i} = {(x0, y0, x1, y1)}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        masks[i, round(y0 * height) : max(round(y1 * height), round(y0 * height) + 1),
              round(x0 * width) : max(round(x1 * width), round(x0 * width) + 1)] = 1.0
    return masks


def layer_grid(height: int, width: int, length: int) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with `length` queries in a UNet whose latent is height x width
    (each downsampling halves the size, rounding up)."""
    h, w = height, width
    for _ in range(8):
        if h * w == length:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"no downsampled grid of {height}x{width} has {length} positions")


def query_routing(region_masks: torch.Tensor, length: int) -> torch.Tensor:
    """(B, M, H, W) masks -> (B, L, M) bool: identity m may be taken by query l.

    Each query belongs to the identity covering most of its cell (if at least half of it), so
    regions never overlap at the layer's resolution and a cell on a border goes to one side."""
    b, m, height, width = region_masks.shape
    # Plain ints: an exported graph is built for one latent size, so the grids are constants.
    h, w = layer_grid(int(height), int(width), int(length))
    # Area: each cell's value is the share of it the region covers.
    mode = "area" if h <= height and w <= width else "nearest"
    resized = F.interpolate(region_masks.float(), size=(h, w), mode=mode)
    flat = resized.flatten(2).transpose(1, 2)  # B, L, M
    best = flat.argmax(dim=-1, keepdim=True)
    owner = torch.arange(m, device=flat.device).view(1, 1, m) == best  # one-hot of the best (exports to ONNX)
    return owner & (flat >= 0.5)
