"""The torch engine: the UNet in eager mode, or through torch.compile."""
from __future__ import annotations

import torch

from ray_faceid.engines.base import UNetCall


class TorchUNetEngine:
    backend = "torch"

    def __init__(self, unet, compile: bool = False):
        self.call = UNetCall(unet).eval()
        if compile:
            self.call = torch.compile(self.call, dynamic=False)
            self.backend = "torch.compile"

    @torch.no_grad()
    def __call__(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks):
        return self.call(sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks)
