"""The adapter's training objective on one cross-training batch (plain torch; Ray Train calls it).

Identity tokens from shot A (expression code of shot B, dropped to the null code with some
probability), target latents and caption from shot B, stratified timesteps, and the class-guided
denoising regularisation around B's face mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.context import identity_kwargs
from ray_faceid.identity.cross_training import CrossBatch
from ray_faceid.identity.imr import imr_losses
from ray_faceid.identity.losses import class_guided_regularization, stratified_timesteps

CLASS_PROMPT = "a photo of a person"


def text_inputs(base, prompts: list[str], pixels: torch.Tensor) -> dict:
    """The UNet's text conditioning of these captions for crops of `pixels`' size (SDXL's time ids
    from each crop's own size, uncropped, as SDXL training does)."""
    from ray_faceid.pipelines.text_conditioning import encode_prompts, unet_conditioning

    height, width = pixels.shape[-2:]
    return unet_conditioning(base, encode_prompts(base, prompts), width, height)


def training_noise(base):
    """The forward process the base was trained with (DDPM over its betas and prediction type),
    whatever scheduler its folder samples with: a sampler's own add_noise may be another (Euler's
    is x + sigma e), and some have no get_velocity."""
    from diffusers import DDPMScheduler

    cached = getattr(base, "_training_noise", None)
    if cached is None:
        cached = base._training_noise = DDPMScheduler.from_config(base.scheduler.config)
    return cached


def diffusion_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _noising(base, batch: CrossBatch, generator: torch.Generator | None):
    """Target latents, the noise, stratified timesteps and the noisy latents of the batch's target shots."""
    device = next(base.unet.parameters()).device
    with torch.no_grad():
        latents = base.vae.encode(batch.pixels.to(device)).latent_dist.mean * base.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    forward = training_noise(base)
    t = stratified_timesteps(latents.shape[0], forward.config.num_train_timesteps, generator).to(device)
    return latents, noise, t, forward.add_noise(latents, noise, t)


def adapter_losses(base, adapter: IdentityAdapter, batch: CrossBatch, expression_drop: float = 0.1,
                   generator: torch.Generator | None = None, outside_weight: float = 1.0) -> dict[str, torch.Tensor]:
    device = next(base.unet.parameters()).device
    latents, noise, t, noisy = _noising(base, batch, generator)
    b = latents.shape[0]
    expressions = None if batch.expressions is None else batch.expressions.to(device)
    if adapter.options.expression_dim == 0:
        expressions = None
    if batch.photo_embeddings is not None:  # FaceID-Portrait: each photo its own tokens, concatenated
        photos = batch.photo_embeddings.to(device)
        each = adapter.tokens(photos.flatten(0, 1))
        tokens = each.reshape(b, -1, each.shape[-1])
    else:
        features = None if batch.image_features is None else batch.image_features.to(device)
        tokens = adapter.tokens(batch.id_embeddings.to(device), expression=expressions, drop_prob=expression_drop,
                                image_features=features)
    identity = identity_kwargs(tokens.unsqueeze(1), torch.ones(b, 1, device=device))
    text = text_inputs(base, batch.captions, batch.pixels)
    if adapter.kind.identitynet:  # InstantID: IdentityNet's residuals from the tokens and the target's keypoints
        text.update(identitynet_residuals(adapter, batch, noisy, t, tokens, text.get("added_cond_kwargs")))
    pred = base.unet(noisy, t, **text, cross_attention_kwargs=identity).sample
    with torch.no_grad():
        class_pred = base.unet(noisy, t, **text_inputs(base, [CLASS_PROMPT] * b, batch.pixels)).sample
    mask = F.interpolate(batch.face_masks.to(device), size=latents.shape[-2:], mode="nearest")
    target = diffusion_target(training_noise(base), latents, noise, t)
    return class_guided_regularization(pred, target, class_pred, mask, outside_weight)


def identitynet_residuals(adapter: IdentityAdapter, batch: CrossBatch, noisy, t, tokens, added) -> dict:
    """The UNet's extra inputs from InstantID's IdentityNet for these rows, as the pipeline adds them."""
    import numpy as np

    from ray_faceid.identity.instantid import keypoint_image

    if adapter.identitynet is None or batch.keypoints is None:
        raise BadInput("InstantID's training steps need its IdentityNet and each target's keypoints: give "
                       "--identitynet FOLDER")
    height, width = batch.pixels.shape[-2:]
    images = np.stack([np.asarray(keypoint_image(p.numpy(), width, height), np.float32) / 255 for p in batch.keypoints])
    image = torch.from_numpy(images).permute(0, 3, 1, 2).to(noisy.device)
    down, mid = adapter.identitynet.residuals(noisy, t, tokens.detach(), image, added)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class AdapterObjective(nn.Module):
    """The adapter's loss as a module (forward(batch, generator) -> loss terms), so DDP can wrap it;
    the frozen base is held outside the module tree (it is neither synchronised nor trained)."""

    def __init__(self, base, adapter: IdentityAdapter, expression_drop: float = 0.1, outside_weight: float = 1.0):
        super().__init__()
        self.adapter, self._base = adapter, (base,)
        self.expression_drop, self.outside_weight = expression_drop, outside_weight

    def forward(self, batch: CrossBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        drop = self.expression_drop if self.training else 0.0
        return adapter_losses(self._base[0], self.adapter, batch, drop, generator, self.outside_weight)


class ImrObjective(nn.Module):
    """IMR loss: source-shot tokens + the target shot's expression code -> the target shot's tokens,
    and the same noise prediction on the target shot; base and adapter frozen."""

    def __init__(self, base, adapter: IdentityAdapter, imr):
        super().__init__()
        self.imr, self._frozen = imr, (base, adapter)

    def forward(self, batch: CrossBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        base, adapter = self._frozen
        device = next(base.unet.parameters()).device
        if batch.expressions is None or batch.target_embeddings is None:
            raise BadInput("IMR training needs the target shots' expression codes and embeddings (re-run `ray-faceid pairs`)")
        _, _, t, noisy = _noising(base, batch, generator)
        text = text_inputs(base, batch.captions, batch.pixels)
        with torch.no_grad():
            source = adapter.tokens(batch.id_embeddings.to(device))
            target = adapter.tokens(batch.target_embeddings.to(device))
        ones = torch.ones(noisy.shape[0], 1, device=device)

        def predict_noise(tokens):
            kwargs = identity_kwargs(tokens.unsqueeze(1), ones)
            return base.unet(noisy, t, **text, cross_attention_kwargs=kwargs).sample

        return imr_losses(self.imr, source, batch.expressions.to(device), target, predict_noise)


class FlowObjective(nn.Module):
    """Attribute-flow loss on a batch of (embeddings, attribute labels, person ids)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        device = next(self.flow.parameters()).device
        embeddings, labels, people = (x.to(device) for x in batch)
        return self.flow.losses(embeddings, labels, people)
