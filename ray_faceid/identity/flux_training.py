"""Our identity adapter on FLUX, trained on cross-training pairs (`ray-faceid train --model FLUX`).

It is the FLUX IP-Adapter's architecture (identity/flux_adapter.py: a projection of an embedding to
identity tokens, which the image queries of every dual-stream block attend to through that block's
`to_k_ip` / `to_v_ip`), read from the face stack's identity embedding (the encoder the ingest used,
unit length, as on the UNet families) instead of a CLIP image embedding. It is saved in the layout
XLabs publishes, with what made it in the file's metadata (encoder, base weights hash, steps), so
every FLUX path loads it as it loads a published file and knows to read people through the face stack.

The objective is FLUX's own, flow matching: the target shot's latents x0 (packed 2x2 patches), noise
e, a logit-normal time t, x_t = (1 - t) x0 + t e, and the transformer's velocity asked to be e - x0
with the source shot's identity tokens, inside the target's face; outside it, the frozen
transformer's own prediction for the class prompt (the class-guided regularisation of the UNet
families, identity/losses.py). Each block's `to_v_ip` starts at zero: the untrained adapter leaves
FLUX's image as it is.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.cross_training import CrossBatch
from ray_faceid.identity.flux_adapter import TOKENS, FluxIdentityAdapter
from ray_faceid.identity.losses import class_guided_regularization

KIND = "ray_faceid FLUX identity adapter"
ADAPTER_FILE = "flux_identity.safetensors"
METADATA_KEY = "ray_faceid"
CLASS_PROMPT = "a photo of a person"


def new_flux_adapter(transformer, spec: EncoderSpec, seed: int, tokens: int = TOKENS) -> FluxIdentityAdapter:
    """A seeded adapter for `transformer` reading `spec`'s embeddings; its values start at zero."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    adapter = FluxIdentityAdapter(spec.dim, config.joint_attention_dim,
                                  config.num_attention_heads * config.attention_head_dim,
                                  len(transformer.transformer_blocks), tokens)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.startswith("to_v_ip."):
                p.zero_()
            elif name.endswith("weight") and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    adapter.encoder_spec = spec
    return adapter


def flux_latents(base, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents of [-1, 1] pixels, shifted and scaled as FLUX's VAE space is."""
    vae = base.vae
    with torch.no_grad():
        mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return (mean.float() - vae.config.shift_factor) * vae.config.scaling_factor


class FluxAdapterObjective(nn.Module):
    """The adapter's flow-matching loss as a module (forward(batch, generator) -> loss terms), so DDP
    can wrap it; the frozen base is held outside the module tree."""

    def __init__(self, base, adapter: FluxIdentityAdapter, outside_weight: float = 1.0):
        super().__init__()
        self.adapter, self._base, self.outside_weight = adapter, (base,), outside_weight

    def forward(self, batch: CrossBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        from ray_faceid.pipelines.flux_sampling import encode_prompts, pack, patch_positions, unpack

        base = self._base[0]
        transformer = base.transformer
        device = next(transformer.parameters()).device
        x0 = flux_latents(base, batch.pixels)
        b, _, h, w = x0.shape
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.sigmoid(torch.randn(b, generator=generator)).to(device)  # logit-normal, as FLUX trainers draw it
        noisy = pack((1 - t.view(b, 1, 1, 1)) * x0 + t.view(b, 1, 1, 1) * noise)
        target = noise - x0
        dtype = transformer.dtype
        guidance = None
        if base.guidance_embedded:
            guidance = torch.full([b], base.default_guidance, device=device, dtype=torch.float32)

        def velocity(prompts: list[str], identity: dict | None) -> torch.Tensor:
            states, pooled = encode_prompts(base, prompts, base.text_encoder.device, device)
            packed = transformer(hidden_states=noisy.to(dtype), timestep=t.to(dtype), guidance=guidance,
                                 pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
                                 txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=dtype),
                                 img_ids=patch_positions(h, w).to(device, dtype), joint_attention_kwargs=identity,
                                 return_dict=False)[0]
            return unpack(packed.float(), h, w)

        tokens = self.adapter.tokens(batch.id_embeddings.to(device))
        identity = {"identity_tokens": tokens.unsqueeze(1), "identity_scale": torch.ones(b, 1, device=device),
                    "patch_owner": None}
        pred = velocity(list(batch.captions), identity)
        with torch.no_grad():
            class_pred = velocity([CLASS_PROMPT] * b, None)
        mask = F.interpolate(batch.face_masks.to(device), size=(h, w), mode="nearest")
        return class_guided_regularization(pred, target, class_pred, mask, self.outside_weight)


def save_flux_adapter(out: str, adapter: FluxIdentityAdapter, base_hash: str, trained_steps: int) -> str:
    """`out`/flux_identity.safetensors: XLabs' key layout, and what made it in the metadata."""
    from safetensors.torch import save

    from ray_faceid import storage

    state = {"ip_adapter_proj_model.proj.weight": adapter.proj.weight, "ip_adapter_proj_model.proj.bias": adapter.proj.bias,
             "ip_adapter_proj_model.norm.weight": adapter.norm.weight, "ip_adapter_proj_model.norm.bias": adapter.norm.bias}
    for i, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        for part, layer in (("k", k), ("v", v)):
            for field in ("weight", "bias"):
                state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj.{field}"] = getattr(layer, field)
    made = {"kind": KIND, "encoder": adapter.encoder_spec.model_dump(), "base_model_hash": base_hash,
            "trained_steps": trained_steps, "tokens": adapter.tokens_per_person}
    data = save({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                metadata={METADATA_KEY: json.dumps(made, sort_keys=True)})
    uri = storage.join(out, ADAPTER_FILE)
    storage.write_bytes(uri, data)
    return uri


def made_by_training(metadata: dict | None, uri: str = "the adapter") -> dict | None:
    """What `save_flux_adapter` recorded, from a safetensors file's metadata, checked; None for a
    published file (no such record). A record of ours that is damaged is refused in one line."""
    from ray_faceid.errors import UnsupportedModel

    try:
        made = json.loads((metadata or {}).get(METADATA_KEY) or "null")
    except (ValueError, AttributeError, TypeError):  # no record, or metadata of another shape: not ours
        made = None
    if not (isinstance(made, dict) and made.get("kind") == KIND):
        return None
    try:
        spec = EncoderSpec(**made["encoder"])
        tokens, steps = int(made["tokens"]), int(made["trained_steps"])
        if tokens < 1 or steps < 0 or not isinstance(made["base_model_hash"], str):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UnsupportedModel(f"{uri}: its record of what made it (encoder, base, tokens, steps) is damaged: train "
                               "it again") from None
    return {**made, "encoder_spec": spec, "tokens": tokens, "trained_steps": steps}


def base_refusal(made: dict | None, base) -> str | None:
    """Why an adapter `ray-faceid train` made must not run on `base` (trained on other base weights), or None."""
    if made and made["base_model_hash"] != base.model_hash():
        return (f"this FLUX identity adapter was trained on base weights {made['base_model_hash']}; {base.model_id} is "
                f"{base.model_hash()}: train or use one made for this base")
    return None
