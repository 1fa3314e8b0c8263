"""IdentityContext: the per-call identity routing every cross-attention layer shares.

Which keys each query may use, how strongly it takes identity and the additive attention biases
depend only on the identity scales, the region masks and the layer's resolution, never on the
layer's weights. So they are computed once per resolution per call (once per denoise when the
pipeline reuses the context across steps) instead of in every layer at every step, and with no
host synchronisation: no boolean indexing, no `.item()`, no data-dependent shapes.

Without region masks (one identity acting everywhere, the common case) every tensor has a query
axis of size 1 that broadcasts, no mask is built at all, and the decoupled identity term runs as a
plain `scaled_dot_product_attention` call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_faceid.identity.routing import query_routing


@dataclass(frozen=True)
class LayerRouting:
    """Routing at one resolution; Lq is the layer's query count, or 1 when nothing is routed."""

    keys: torch.Tensor
    """(B, Lq, M*T) float: 1 where the query may use the identity key (SAA gating sums over these)."""
    weight: torch.Tensor
    """(B, Lq) scale of the identity term per query; 0 where a query takes no identity."""
    visible_bias: torch.Tensor | None
    """(B, 1, Lq, M*T) additive bias of the decoupled identity softmax, or None when every key is visible."""
    joint_bias: torch.Tensor
    """(B, 1, Lq, M*T) additive bias of the PVA identity logits: log(scale) where usable, a very
    negative number elsewhere (scale 0 or another person's keys)."""


class IdentityContext:
    def __init__(self, identity_scale: torch.Tensor, region_masks: torch.Tensor | None, tokens_per_id: int):
        """(B, M) scales, (B, M, h, w) region masks or None, T tokens per identity."""
        self.scale, self.region_masks, self.tokens_per_id = identity_scale, region_masks, tokens_per_id
        self._layers: dict[int, LayerRouting] = {}

    def at(self, length: int) -> LayerRouting:
        """The routing of a layer with `length` queries (computed on first use, then shared)."""
        key = int(length) if self.region_masks is not None else 1
        if key not in self._layers:
            self._layers[key] = self._routing(key)
        return self._layers[key]

    def _routing(self, length: int) -> LayerRouting:
        scale = self.scale
        b, m = scale.shape
        if self.region_masks is None:
            owner = torch.ones(b, 1, m, dtype=torch.bool, device=scale.device)
        else:
            owner = query_routing(self.region_masks, length)  # B, L, M
        per_query = (owner.to(scale.dtype) * scale.unsqueeze(1)).sum(-1)  # B, Lq
        active = owner.any(-1) & (per_query > 0)
        # Each identity's ownership repeated over its T tokens (expand + reshape: no host sync).
        keys = owner.unsqueeze(-1).expand(*owner.shape, self.tokens_per_id).reshape(b, owner.shape[1], -1)
        very_negative = torch.finfo(scale.dtype).min
        if self.region_masks is None:
            visible_bias = None
        else:
            # Queries outside every region may see all keys (no all-masked row); their weight is 0.
            visible = keys | ~owner.any(-1, keepdim=True)
            visible_bias = torch.zeros_like(keys, dtype=scale.dtype).masked_fill(~visible, very_negative).unsqueeze(1)
        usable = keys & active.unsqueeze(-1)
        log_scale = torch.log(per_query.clamp_min(1e-12)).unsqueeze(-1).expand(keys.shape)
        joint_bias = log_scale.masked_fill(~usable, very_negative).unsqueeze(1)
        return LayerRouting(keys.to(scale.dtype), per_query * active, visible_bias, joint_bias)


def identity_kwargs(identity_tokens: torch.Tensor | None, identity_scale: torch.Tensor | None,
                    region_masks: torch.Tensor | None = None, personal=None) -> dict:
    """cross_attention_kwargs of one UNet call (or one whole denoise) with a shared context;
    `personal` (PersonalRows) gives rows their own adapter weights."""
    if identity_tokens is None:
        return {}
    context = IdentityContext(identity_scale, region_masks, identity_tokens.shape[2])
    return {"identity_tokens": identity_tokens, "identity_scale": identity_scale, "region_masks": region_masks,
            "identity_context": context, "personal": personal}
