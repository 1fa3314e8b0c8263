"""The UNetEngine protocol: one denoising call with identity as runtime inputs.

Identity tokens, per-identity scales and region masks are inputs of every engine, so switching
person (or strength, or layout) never rebuilds an engine. Identity weights that live inside the
UNet's layers (the processors' projections, which per-identity adapters change) are refitted:
ONNX Runtime takes them as graph inputs, TensorRT refits the plan; neither rebuilds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ray_faceid.identity.context import identity_kwargs
from ray_faceid.identity.personal_bank import PersonalRows

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # precision -> model dtype


def device_tag(device: torch.device | str | None = None) -> str:
    """GPU name and compute capability (or cpu): plans and tuned kernels only run where they were built."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


class UNetEngine(Protocol):
    backend: str

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text_tokens: torch.Tensor,
                 identity_tokens: torch.Tensor, identity_scale: torch.Tensor,
                 region_masks: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents, () or (B,) timestep, (B, L, D) text, (B, M, T, D) identity tokens,
        (B, M) scales (0 = no identity), (B, M, h, w) region masks -> (B, 4, h, w) prediction."""
        ...


def time_ids(rows: int, width: int, height: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning of an image made at its own size (pixels), uncropped: (rows, 6)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.expand(rows, 6)


@dataclass(frozen=True)
class EngineShape:
    """What one engine is built for: the batch range, the latent size and the identity layout."""

    batch: tuple[int, int, int]  # min, opt, max (rows, CFG rows included)
    latent: tuple[int, int]  # h, w
    identities: int  # M
    tokens: int  # T per identity
    text_length: int
    channels: int  # UNet in_channels (9 for inpainting bases)
    cross_dim: int
    pooled_dim: int = 0  # SDXL's pooled text embedding width (its added conditioning); 0 for SD 1.x / 2.x
    vae_factor: int = 8  # pixels per latent: the image size SDXL's time ids give
    control: bool = False  # InstantID: the keypoint image its IdentityNet reads is an input too

    @property
    def input_names(self) -> list[str]:
        return INPUT_NAMES + (ADDED_INPUT_NAMES if self.pooled_dim else []) + (["control_image"] if self.control else [])

    def example(self, batch: int | None = None, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
        """Inputs of the right shapes (seeded), for export, warm-up and parity checks."""
        b = batch or self.batch[1]
        h, w = self.latent
        g = torch.Generator().manual_seed(0)
        added = {} if not self.pooled_dim else {
            "text_embeds": torch.randn(b, self.pooled_dim, generator=g).to(device, dtype),
            "time_ids": time_ids(b, w * self.vae_factor, h * self.vae_factor, dtype, device),
        }
        control = {} if not self.control else {
            "control_image": torch.zeros(b, 3, h * self.vae_factor, w * self.vae_factor).to(device)}
        return added | control | {
            "sample": torch.randn(b, self.channels, h, w, generator=g).to(device, dtype),
            "timestep": torch.tensor(500.0).to(device),
            "text_tokens": torch.randn(b, self.text_length, self.cross_dim, generator=g).to(device, dtype),
            "identity_tokens": torch.randn(b, self.identities, self.tokens, self.cross_dim, generator=g).to(device, dtype),
            "identity_scale": torch.ones(b, self.identities).to(device, dtype),
            "region_masks": torch.ones(b, self.identities, h, w).to(device, dtype),
        }


INPUT_NAMES = ["sample", "timestep", "text_tokens", "identity_tokens", "identity_scale", "region_masks"]
ADDED_INPUT_NAMES = ["text_embeds", "time_ids"]  # SDXL's added conditioning, after the common inputs


class UNetCall(torch.nn.Module):
    """The UNet (identity processors installed) as a function of the engine inputs: what is
    exported to ONNX and what the torch engines run. With a PersonalBank, `personal_rows` (one
    bank slot per row) gives each row its own adapter weights. With InstantID's IdentityNet
    (identity/instantid.py), `control_image` (rows, 3, H, W: each row's keypoint image) makes its
    residuals inside the same call, from the first identity's tokens: the person stays an input."""

    def __init__(self, unet, bank=None, identitynet=None):
        super().__init__()
        self.unet, self.bank, self.identitynet = unet, bank, identitynet
        if identitynet is not None:  # registered: ONNX export keeps its weights' names, eval() reaches it
            self.identitynet_model = identitynet.model

    def forward(self, sample, timestep, text_tokens, identity_tokens, identity_scale, region_masks, text_embeds=None,
                time_ids=None, control_image=None, personal_rows=None):
        # The inputs in EngineShape.input_names' order (ONNX export passes them by position).
        personal = None if personal_rows is None or self.bank is None else PersonalRows(self.bank, personal_rows)
        # routing once per call, not per layer
        kwargs = identity_kwargs(identity_tokens, identity_scale, region_masks, personal)
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        control = {}
        if control_image is not None:
            if self.identitynet is None:
                raise ValueError("a keypoint image was given to a UNet call without InstantID's IdentityNet")
            down, mid = self.identitynet.residuals(sample, timestep, identity_tokens[:, 0], control_image, added)
            control = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(sample, timestep, encoder_hidden_states=text_tokens, added_cond_kwargs=added,
                         cross_attention_kwargs=kwargs, **control).sample
