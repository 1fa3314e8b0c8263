"""Training losses of the identity adapter.

- noise_loss: the diffusion objective, optionally restricted to a mask.
- class_guided_regularization (Face2Diffusion): inside the face/person mask, MSE to the true
  noise; outside it, MSE to the stop-gradient prediction of the same frozen UNet with the identity
  replaced by the class word ("a person") and no identity tokens. Backgrounds stay text-driven.
- stratified_timesteps: one timestep per sample from equal strata, so every batch covers the
  whole noise range (lower-variance loss than uniform sampling).
"""
from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the masked elements (mask broadcast over channels)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.float().expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def noise_loss(pred: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mse(pred, noise, mask)


def class_guided_regularization(
    pred: torch.Tensor, noise: torch.Tensor, class_pred: torch.Tensor, mask: torch.Tensor, outside_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """`mask` is 1 on the face/person (B, 1, h, w); `class_pred` the frozen UNet's prediction for the
    class prompt without identity (detached here)."""
    inside = masked_mse(pred, noise, mask)
    outside = masked_mse(pred, class_pred.detach(), 1 - mask)
    return {"inside": inside, "outside": outside, "total": inside + outside_weight * outside}


def stratified_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    edges = torch.linspace(0, num_train_timesteps, batch + 1)
    u = torch.rand(batch, generator=generator)
    t = (edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp_max(num_train_timesteps - 1)
    return t[torch.randperm(batch, generator=generator)]
