"""Identity attention processors for diffusers cross-attention layers.

Installed with `unet.set_attn_processor`; self-attention layers get `SelfAttnProcessor`, the
stock maths that only accepts (and ignores) the identity arguments. Per call the UNet receives,
through `cross_attention_kwargs`:

- identity_tokens (B, M, T, C): T tokens for each of M identities;
- identity_scale (B, M): strength per row and identity; 0 disables identity (the unconditional
  classifier-free-guidance rows), so changing person or strength needs no rebuild;
- region_masks (B, M, H, W) or None: where each identity may act (see routing.py);
- personal (PersonalRows) or None: each row's own adapter weights, added to the shared ones in the
  identity projections (personal_bank.py); the processors' own weights are never changed per person.

Two methods:

- DecoupledIdentityProcessor (IP-Adapter-FaceID / DynamicID): new to_k_id, to_v_id (initialised
  from to_k, to_v); out = text attention + scale x gate x softmax(Q K_id^T) V_id.
- ParallelVisualProcessor (PVA): new Q', K', V' (copies of to_q, to_k, to_v); scores of Q against
  text keys and of Q' against identity keys go through ONE softmax over [text ; identity],
  applied to [V ; V'_id], then the shared to_out. The scale enters as log(scale) on the identity
  logits, so scale 0 is exactly the stock layer.

Both support SAA gating (DynamicID): per query, the scaled identity scores summed over heads and
tokens, min-max normalised over the queries, zeroed below a threshold; only gated queries (faces)
take identity. There is no data-dependent Python control flow in forward, so they export to ONNX
and compile without a graph break.

The routing (which keys each query may use, its scale, the attention biases) depends only on the
scales, the masks and the layer's resolution: it lives in an `IdentityContext` (context.py) that
the caller builds once per call or per denoise and passes as `identity_context`; every layer of a
resolution shares it. A processor called without one builds its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ray_faceid.identity.context import IdentityContext, LayerRouting
from ray_faceid.identity.personal_bank import PersonalRows


class SelfAttnProcessor(AttnProcessor2_0):
    """Stock attention; names the identity arguments only so diffusers passes them silently."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 identity_tokens=None, identity_scale=None, region_masks=None, identity_context=None, personal=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def saa_gate(scores: torch.Tensor, allowed: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, heads, L, K) scaled identity scores, (B, L or 1, K) allowed keys -> (B, L) gate in [0, 1]."""
    summed = (scores.sum(dim=1) * allowed).sum(dim=-1)
    low = summed.amin(dim=-1, keepdim=True)
    high = summed.amax(dim=-1, keepdim=True)
    norm = (summed - low) / (high - low).clamp_min(1e-6)
    return torch.where(norm >= threshold, norm, torch.zeros_like(norm))


class _IdentityProcessor(nn.Module):
    def __init__(self, hidden_size: int, cross_attention_dim: int, gate: bool = False, gate_threshold: float = 0.3):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.gate, self.gate_threshold = gate, gate_threshold
        self.bank_key = ""  # this processor's name in the adapter: where a PersonalBank keeps its deltas
        # Identity keys and values, initialised from the layer's own to_k / to_v.
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def init_from(self, attn: Attention) -> None:
        with torch.no_grad():
            self.to_k_id.weight.copy_(attn.to_k.weight)
            self.to_v_id.weight.copy_(attn.to_v.weight)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 identity_tokens=None, identity_scale=None, region_masks=None,
                 identity_context: IdentityContext | None = None, personal: PersonalRows | None = None):
        residual, shape4, x, context = self._prologue(attn, hidden_states, encoder_hidden_states, temb)
        q = self._heads(attn.to_q(x), attn.heads)
        k = self._heads(attn.to_k(context), attn.heads)
        v = self._heads(attn.to_v(context), attn.heads)
        if identity_tokens is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if identity_context is None:
                identity_context = IdentityContext(identity_scale, region_masks, identity_tokens.shape[2])
            route = identity_context.at(q.shape[2])
            out = self.attend(attn, x, q, k, v, identity_tokens, route, personal)
        b, heads, length, d = out.shape
        out = out.transpose(1, 2).reshape(b, length, heads * d).to(q.dtype)
        return self._epilogue(attn, out, residual, shape4)

    def attend(self, attn, x, q, k, v, identity_tokens, route: LayerRouting, personal=None) -> torch.Tensor:
        """(B, heads, L, d) attention output of one layer with identity; each method defines it."""
        raise NotImplementedError

    def _project(self, name: str, x: torch.Tensor, personal: PersonalRows | None) -> torch.Tensor:
        """One of the identity projections (to_k_id, ...), with each row's own delta where given."""
        linear = getattr(self, name)
        if personal is None:
            return linear(x)
        return personal.project(linear, f"{self.bank_key}.{name}.weight", x)

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, inner = x.shape
        return x.view(b, n, heads, inner // heads).transpose(1, 2)

    def _identity_keys(self, attn: Attention, tokens: torch.Tensor, personal: PersonalRows | None):
        b, m, t, c = tokens.shape
        flat = tokens.reshape(b, m * t, c)
        return (self._heads(self._project("to_k_id", flat, personal), attn.heads),
                self._heads(self._project("to_v_id", flat, personal), attn.heads))

    @staticmethod
    def _prologue(attn: Attention, hidden_states, encoder_hidden_states, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return residual, shape4, hidden_states, encoder_hidden_states

    @staticmethod
    def _epilogue(attn: Attention, out, residual, shape4):
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DecoupledIdentityProcessor(_IdentityProcessor):
    def attend(self, attn, x, q, k, v, identity_tokens, route, personal=None):
        out = F.scaled_dot_product_attention(q, k, v)
        return out + self.identity_term(attn, q, identity_tokens, route, personal)

    def identity_term(self, attn, q, tokens, route: LayerRouting, personal=None):
        k_id, v_id = self._identity_keys(attn, tokens, personal)
        bias = None if route.visible_bias is None else route.visible_bias.to(q.dtype)
        weight = route.weight
        if self.gate:  # the gate needs the raw scores: written out
            scores = q @ k_id.transpose(-1, -2) / math.sqrt(q.shape[-1])
            logits = scores if bias is None else scores + bias
            id_out = logits.softmax(dim=-1) @ v_id
            weight = weight * saa_gate(scores, route.keys, self.gate_threshold)
        else:
            id_out = F.scaled_dot_product_attention(q, k_id, v_id, attn_mask=bias)
        return weight[:, None, :, None].to(q.dtype) * id_out


class ParallelVisualProcessor(_IdentityProcessor):
    def __init__(self, hidden_size: int, cross_attention_dim: int, gate: bool = False, gate_threshold: float = 0.3):
        super().__init__(hidden_size, cross_attention_dim, gate, gate_threshold)
        self.to_q_id = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_from(self, attn: Attention) -> None:
        super().init_from(attn)
        with torch.no_grad():
            self.to_q_id.weight.copy_(attn.to_q.weight)

    def attend(self, attn, x, q, k, v, identity_tokens, route, personal=None):
        q_id = self._heads(self._project("to_q_id", x, personal), attn.heads)
        k_id, v_id = self._identity_keys(attn, identity_tokens, personal)
        if not self.gate:
            return self.joint_sdpa(q, k, v, q_id, k_id, v_id, route)
        return self.gated_joint(q, k, v, q_id, k_id, v_id, route)

    @staticmethod
    def joint_sdpa(q, k, v, q_id, k_id, v_id, route):
        """One softmax over [text ; identity] as ONE attention call: queries [q, q_id] against keys
        [k, 0] and [0, k_id] give exactly q.k for text keys and q_id.k_id for identity keys."""
        d = q.shape[-1]
        queries = torch.cat([q, q_id], dim=-1)
        keys = torch.cat([F.pad(k, (0, d)), F.pad(k_id, (d, 0))], dim=2)
        values = torch.cat([v, v_id], dim=2)
        # No bias on text keys: pad the identity bias on the left with zeros.
        bias = F.pad(route.joint_bias.to(q.dtype), (k.shape[2], 0))
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=1 / math.sqrt(d))

    def gated_joint(self, q, k, v, q_id, k_id, v_id, route):
        d = q.shape[-1]
        text_logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        id_scores = q_id @ k_id.transpose(-1, -2) / math.sqrt(d)
        n_text = k.shape[2]
        weights = torch.cat([text_logits, id_scores + route.joint_bias.to(q.dtype)], dim=-1).softmax(dim=-1)
        w_text, w_id = weights[..., :n_text], weights[..., n_text:]
        text_part = w_text @ v
        joint = text_part + w_id @ v_id
        # The gate blends per query between text-only attention (the joint text weights
        # renormalised) and the joint attention: gate 0 is exactly the stock layer.
        text_only = text_part / w_text.sum(-1, keepdim=True).clamp_min(1e-12)
        g = saa_gate(id_scores, route.keys, self.gate_threshold)[:, None, :, None]
        return g * joint + (1 - g) * text_only


PROCESSORS = {"decoupled": DecoupledIdentityProcessor, "pva": ParallelVisualProcessor}
