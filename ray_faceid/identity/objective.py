"""The adapter's training objective on one cross-training batch (plain torch; Ray Train calls it).

Identity tokens from shot A (expression code of shot B, dropped to the null code with some
probability), target latents and caption from shot B, stratified timesteps, and the class-guided
denoising regularisation around B's face mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.cross_training import CrossBatch
from ray_faceid.identity.losses import class_guided_regularization, stratified_timesteps

CLASS_PROMPT = "a photo of a person"


def encode_text(base, prompts: list[str]) -> torch.Tensor:
    tok = base.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    device = next(base.text_encoder.parameters()).device
    with torch.no_grad():
        return base.text_encoder(ids.input_ids.to(device))[0]


def diffusion_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def adapter_losses(base, adapter: IdentityAdapter, batch: CrossBatch, expression_drop: float = 0.1,
                   generator: torch.Generator | None = None, outside_weight: float = 1.0) -> dict[str, torch.Tensor]:
    device = next(base.unet.parameters()).device
    pixels = batch.pixels.to(device)
    b = pixels.shape[0]
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = stratified_timesteps(b, base.scheduler.config.num_train_timesteps, generator).to(device)
    noisy = base.scheduler.add_noise(latents, noise, t)
    expressions = None if batch.expressions is None else batch.expressions.to(device)
    if adapter.options.expression_dim == 0:
        expressions = None
    tokens = adapter.tokens(batch.id_embeddings.to(device), expression=expressions, drop_prob=expression_drop)
    identity = {"identity_tokens": tokens.unsqueeze(1), "identity_scale": torch.ones(b, 1, device=device)}
    pred = base.unet(noisy, t, encoder_hidden_states=encode_text(base, batch.captions),
                     cross_attention_kwargs=identity).sample
    with torch.no_grad():
        class_pred = base.unet(noisy, t, encoder_hidden_states=encode_text(base, [CLASS_PROMPT] * b)).sample
    mask = F.interpolate(batch.face_masks.to(device), size=latents.shape[-2:], mode="nearest")
    target = diffusion_target(base.scheduler, latents, noise, t)
    return class_guided_regularization(pred, target, class_pred, mask, outside_weight)
