"""Prompt encoding and the UNet's text conditioning, per base family (families.py).

SD 1.x / 2.x: the text encoder's last hidden states. SDXL, as diffusers' StableDiffusionXLPipeline
does it: both encoders' penultimate hidden states concatenated, the pooled (projected) embedding of
the second, and added time ids (original size, crop top-left, target size); an empty negative
prompt is all zeros when the model says `force_zeros_for_empty_prompt`. Training and generation
both go through here, so an image is conditioned the way its adapter was trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_faceid.engines.base import time_ids


@dataclass
class TextConditioning:
    hidden: torch.Tensor
    """(B, L, D) what cross-attention reads."""
    pooled: torch.Tensor | None = None
    """(B, P) SDXL's pooled embedding (None for SD 1.x / 2.x)."""

    def to(self, dtype: torch.dtype) -> "TextConditioning":
        return TextConditioning(self.hidden.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


def _ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(base, prompts: list[str], zero_empty: bool = False) -> TextConditioning:
    """The conditioning of each prompt; with `zero_empty`, empty prompts (negative prompts nobody
    gave) are zeros where the family does that (SDXL's force_zeros_for_empty_prompt)."""
    device = next(base.text_encoder.parameters()).device
    if base.family != "sdxl":
        return TextConditioning(base.text_encoder(_ids(base.tokenizer, prompts, device))[0])
    hidden = []
    for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        out = encoder(_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    cond = TextConditioning(torch.cat(hidden, dim=-1), out[0])  # pooled: the second encoder's projection
    if zero_empty and base.zero_empty_prompt:
        empty = torch.tensor([not p for p in prompts], device=device)
        cond.hidden = cond.hidden.masked_fill(empty[:, None, None], 0.0)
        cond.pooled = cond.pooled.masked_fill(empty[:, None], 0.0)
    return cond


def unet_conditioning(base, text: TextConditioning, width: int, height: int) -> dict:
    """Keyword arguments of a UNet call for this text at this image size (pixels)."""
    kwargs = {"encoder_hidden_states": text.hidden}
    if base.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled,
                                       "time_ids": time_ids(text.hidden.shape[0], width, height, text.hidden.dtype,
                                                            text.hidden.device)}
    return kwargs
