"""The denoising loop of IdentityPipeline (generate.py): classifier-free guidance over the
unconditional rows (identity scale 0) and the conditional ones (each identity's tokens, scale and
region), the request's own scheduler, seeded noise drawn on the CPU per image. The UNet calls it
makes go through unet_runtime.py (eager torch or an engine)."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import numpy as np
import torch

from ray_faceid.errors import BadInput
from ray_faceid.pipelines.schedulers import Sampler
from ray_faceid.pipelines.text_conditioning import TextConditioning

if TYPE_CHECKING:
    from ray_faceid.pipelines.generate import GenerationItem


class DenoisingLoop:
    """Mixed into IdentityPipeline: it provides base, adapter, device and the conditioning steps."""

    @torch.no_grad()
    def _denoise(self, items: list["GenerationItem"], steps, guidance, width, height, inpaint=None, callback=None,
                 sampler: Sampler | None = None):
        """Latents of every item, all denoised together: one UNet call per step for the whole batch.
        `callback`: the request's own step callback, read from `on_step` once when the request
        started (its caller's), never again: another job may run on this pipeline inside it (a
        large job pausing for small ones, deployments/turns.py) and set its own. `sampler`: the
        request's scheduler (default: the base's own)."""
        from ray_faceid.identity.context import identity_kwargs
        from ray_faceid.pipelines.generate import check_identity_start, identity_active

        # A scheduler of its own per denoise (schedulers keep state between steps), and each row's
        # own adapter as an input of every UNet call: nothing a job inside the pause changes is read here.
        sampler = sampler or Sampler()
        base, sched = self.base, sampler.build(self.base.scheduler)
        own = [self.personal_of(it) if self.adapter is not None else None for it in items]
        row_personal = [None] * len(items) + own  # CFG: unconditional rows first
        self._check_size(width, height)
        most = sched.config.num_train_timesteps
        if not 1 <= steps <= most:
            raise BadInput(f"steps must be between 1 and {most} (the base model's scheduler has {most} timesteps), "
                           f"got {steps}")
        f = base.vae_scale_factor
        h, w = height // f, width // f
        negative = self.encode_prompt([it.negative_prompt or "" for it in items], zero_empty=True)
        text = TextConditioning.cat([negative, self.encode_prompt([it.prompt for it in items])])
        kwargs = self._identity_kwargs(items, h, w)
        check_identity_start(items, steps)
        if kwargs and self.adapter.kind.identitynet and any(it.identity_start for it in items):
            raise BadInput("identity_start: InstantID's IdentityNet draws the face at every step; a later start is not "
                           "built for it (leave --identity-start out)")
        # Guidance at most 1 (few-step models) takes the prompt's prediction alone, as diffusers does: the
        # unconditional rows are not run at all (half the UNet's work per step).
        copies = 2 if guidance > 1 else 1
        if copies == 1:
            (text, kwargs), row_personal = conditional_rows(text, kwargs, len(items)), own
        control = self._identitynet_inputs(items, kwargs, width, height, copies)
        # One generator per image, on the CPU: its initial noise, then (stochastic schedulers: ancestral,
        # SDE, LCM, TCD) each step's noise, drawn in diffusers' order: an image is the same alone or batched.
        generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
        noise = torch.cat([torch.randn((1, 4, h, w), generator=g) for g in generators]).to(self.device)
        step_kwargs = sampler.step_settings(sched)
        if "generator" in inspect.signature(sched.step).parameters:
            step_kwargs["generator"] = generators
        with sampler.refusing_bad_settings(type(sched)):
            sched.set_timesteps(steps, device=self.device)
        latents = noise * sched.init_noise_sigma
        if inpaint is not None:
            # (image latents, latent-size mask for blending, 9-channel conditioning: see inpaint.py)
            image_latents, mask_l, conditioning = inpaint
        if callback is not None:
            callback(0, len(sched.timesteps))  # the clock starts here, not after the first step
        for step, t in enumerate(sched.timesteps, 1):
            model_in = sched.scale_model_input(torch.cat([latents] * copies), t)
            if inpaint is not None and base.inpainting:
                mask_c, masked_c = conditioning
                model_in = torch.cat([model_in, torch.cat([mask_c] * copies), torch.cat([masked_c] * copies)], dim=1)
            # In denoising steps: a second-order scheduler (Heun) calls the UNet about twice a step.
            done = (step - 1) * steps / len(sched.timesteps)
            active = identity_active([it.identity_start for it in items] * copies, done, self.device) if kwargs else None
            now = kwargs if active is None else identity_kwargs(  # rows whose identity has not started: strength 0
                kwargs["identity_tokens"], kwargs["identity_scale"] * active[:, None], kwargs["region_masks"])
            guided = self._unet(model_in, t, text, now, h, w, row_personal, control)
            if copies == 2:
                uncond, cond = guided.chunk(2)
                guided = uncond + guidance * (cond - uncond)
            latents = sched.step(guided, t, latents, **step_kwargs).prev_sample
            if inpaint is not None and not base.inpainting:
                # Blended latent diffusion: outside the mask, the input noised to the next scheduled
                # timestep (any spacing: trailing schedules never reach 0), clean after the last.
                after = sched.timesteps[step : step + 1]
                known = sched.add_noise(image_latents, noise, after) if len(after) else image_latents
                latents = mask_l * latents + (1 - mask_l) * known
            if callback is not None:
                callback(step, len(sched.timesteps))
        return latents

    def _identitynet_inputs(self, items: list["GenerationItem"], kwargs: dict, width: int, height: int, copies: int = 2):
        """InstantID: (tokens, keypoint images) IdentityNet reads for the rows `kwargs` holds (with
        guidance, 2B: the unconditional rows the zero embedding's tokens, as in the attention); None for
        other adapters."""
        if not kwargs or not self.adapter.kind.identitynet:
            return None
        if self.adapter.identitynet is None:
            raise BadInput("InstantID needs its IdentityNet: give --identitynet FOLDER (ControlNetModel/ of "
                           "InstantX/InstantID)")
        from ray_faceid.identity.instantid import frontal_points, keypoint_image

        images = []
        for it in items:
            pose = it.identities[0].pose
            points = frontal_points(width, height) if pose is None else np.asarray(pose) * [width, height]
            images.append(np.asarray(keypoint_image(points, width, height), np.float32) / 255)
        image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        return kwargs["identity_tokens"][:, 0], torch.cat([image] * copies)

    def _unet(self, sample, t, text, kwargs, h, w, row_personal, control=None):
        """One UNet call in the UNet's dtype (fp16 / bf16 on GPU); the prediction comes back in fp32,
        where the scheduler keeps the latents. `control`: InstantID's IdentityNet inputs."""
        sample, text = sample.to(self.base.unet.dtype), text.to(self.base.unet.dtype)
        return self._unet_call(sample, t, text, kwargs, h, w, row_personal, control).float()


def conditional_rows(text: TextConditioning, kwargs: dict, count: int) -> tuple[TextConditioning, dict]:
    """The conditional half (the last `count` rows) of the text and identity inputs built for guidance."""
    from ray_faceid.identity.context import identity_kwargs

    pooled = None if text.pooled is None else text.pooled[count:]
    if kwargs:
        region = kwargs["region_masks"]
        kwargs = identity_kwargs(kwargs["identity_tokens"][count:], kwargs["identity_scale"][count:],
                                 None if region is None else region[count:])
    return TextConditioning(text.hidden[count:], pooled), kwargs
