"""Identity-motion reconfigurator (DynamicID IMR).

Maps the identity tokens of a source shot and a target motion condition (an expression / pose
code, see expression.py, from words or from landmark geometry) to the tokens of the same person
in that motion. A small transformer reads [identity tokens ; motion token] and predicts a
residual on the identity tokens, so an all-zero residual is the identity map (who it is stays).

Trained on cross-shot pairs of one person with two losses: MSE to the encoder tokens of the
target shot, and MSE between the UNet's noise predictions with predicted vs true tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ray_faceid.identity.expression import EXPRESSION_DIM


class IdentityMotionReconfigurator(nn.Module):
    def __init__(self, token_dim: int, motion_dim: int = EXPRESSION_DIM, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.token_dim, self.motion_dim = token_dim, motion_dim
        self.arch = {"token_dim": token_dim, "motion_dim": motion_dim, "width": width, "layers": layers, "heads": heads}
        self.inp = nn.Linear(token_dim, width)
        self.motion = nn.Sequential(nn.Linear(motion_dim, width), nn.GELU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, token_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """(B, T, C) source tokens, (B, motion_dim) or (motion_dim,) target motion -> (B, T, C)."""
        if motion.ndim == 1:
            motion = motion.unsqueeze(0).expand(tokens.shape[0], -1)
        x = torch.cat([self.inp(tokens), self.motion(motion.to(tokens.dtype)).unsqueeze(1)], dim=1)
        delta = self.out(self.encoder(x)[:, : tokens.shape[1]])
        return tokens + delta


def imr_losses(
    imr: IdentityMotionReconfigurator,
    source_tokens: torch.Tensor,
    target_motion: torch.Tensor,
    target_tokens: torch.Tensor,
    predict_noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """`predict_noise(tokens)` runs the frozen UNet (with the adapter) on the target shot's noisy
    latents with the given identity tokens; the true-token prediction is the stop-gradient target."""
    predicted = imr(source_tokens, target_motion)
    losses = {"token": ((predicted - target_tokens.detach()) ** 2).mean()}
    if predict_noise is not None:
        with torch.no_grad():
            reference = predict_noise(target_tokens.detach())
        losses["noise"] = ((predict_noise(predicted) - reference) ** 2).mean()
    losses["total"] = losses["token"] + noise_weight * losses.get("noise", torch.zeros(()))
    return losses


def save_imr(uri: str, imr: IdentityMotionReconfigurator, adapter_hash: str, encoder: str,
             extra: dict | None = None) -> None:
    from ray_faceid.identity.module_files import save_module

    save_module(uri, imr, {"kind": "imr", **imr.arch, "adapter": adapter_hash, "encoder": encoder, **(extra or {})})


def load_imr(uri: str, adapter_hash: str | None = None, encoder: str | None = None) -> IdentityMotionReconfigurator:
    """Load a trained IMR; with `adapter_hash` / `encoder` (an EncoderSpec key), refuse one trained on
    another adapter's tokens or on other embeddings."""
    from ray_faceid.errors import AdapterMismatch, EncoderMismatch
    from ray_faceid.identity.module_files import load_module_files

    config, state, weights_hash = load_module_files(uri, "imr")
    if encoder is not None and config.get("encoder", encoder) != encoder:
        raise EncoderMismatch(f"the IMR at {uri} was trained on {config['encoder']} embeddings, not {encoder}")
    if adapter_hash is not None and config["adapter"] != adapter_hash:
        raise AdapterMismatch(f"the IMR at {uri} was trained on the tokens of adapter {config['adapter']}, "
                              f"this adapter is {adapter_hash}: train the IMR for this adapter "
                              "(ray-faceid train --method imr --adapter URI)")
    imr = IdentityMotionReconfigurator(**{k: config[k] for k in ("token_dim", "motion_dim", "width", "layers", "heads")})
    imr.load_state_dict(state)
    imr.weights_hash = weights_hash
    return imr.eval()
