"""The torch engine: the UNet in eager mode (torch.compile lives in compiled_engine.py)."""
from __future__ import annotations

import torch

from ray_faceid.engines.base import UNetCall


class TorchUNetEngine:
    backend = "torch"

    def __init__(self, unet):
        self.call = UNetCall(unet).eval()

    @torch.no_grad()
    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks):
        return self.call(sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks)
