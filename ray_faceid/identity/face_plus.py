"""IP-Adapter-FaceID-Plus / PlusV2 token mapper: an ArcFace embedding gives the identity tokens, and
a perceiver resampler refines them by attending over the CLIP image encoder's features of the face
(its penultimate hidden states). PlusV2 keeps the embedding's tokens as a shortcut:
tokens = id_tokens + shortcut_scale * resampled.

Module names follow the authors' checkpoint keys (`proj.*`, `norm.*`, `perceiver_resampler.*`), so
their `image_proj` state dict loads as it is; the maths is written from their description
(Ye et al., IP-Adapter; the resampler of Flamingo: queries attend over the image features and
themselves, then a feed-forward, each with a residual).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.identity.tokens import unit

HEAD_WIDTH = 64  # the authors' attention head width (their heads = inner width // 64)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads = max(1, inner // HEAD_WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, inner: int, feature_dim: int, output_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(feature_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, inner), feed_forward(dim)])
                                     for _ in range(depth)])

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePlusMapper(nn.Module):
    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int, hidden: int, feature_dim: int,
                 depth: int, inner: int, shortcut_scale: float | None = None):
        super().__init__()
        self.embed_dim, self.cross_attention_dim, self.num_tokens = embed_dim, cross_attention_dim, num_tokens
        self.feature_dim = feature_dim
        self.shortcut_scale = shortcut_scale
        """PlusV2: the weight of the resampled tokens over the embedding's own; None (Plus): no shortcut."""
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(cross_attention_dim, depth, inner, feature_dim,
                                                          cross_attention_dim)

    def forward(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings and (B, S, H) image features of the same faces -> (B, N, C) tokens. The
        embedding is taken unit-length, as the authors' pipeline gives it (insightface's normed_embedding)."""
        x = self.norm(self.proj(unit(embedding)).view(-1, self.num_tokens, self.cross_attention_dim))
        out = self.perceiver_resampler(x, features.to(x.dtype))
        return out if self.shortcut_scale is None else x + self.shortcut_scale * out


def attach_image_encoder(adapter, folder: str | None, device, option: str) -> None:
    """FaceID-Plus / PlusV2 read each face through a CLIP image encoder as well: load it from `folder`
    onto the adapter. `option` names where the user gives it (--image-encoder, image_encoder in a
    config); a folder for another adapter, or none for FaceID-Plus, is refused in one line."""
    from ray_faceid.errors import BadInput
    from ray_faceid.face.clip_image import NEEDED, ClipImageEncoder

    if adapter is None or adapter.options.mapper != "face_plus":
        if folder:
            raise BadInput(f"{option} is for IP-Adapter-FaceID-Plus / PlusV2 files; this adapter reads embeddings only")
        return
    variant = adapter.published["variant"]
    if not folder:
        raise BadInput(f"{variant} reads the face through a CLIP image encoder too: give {option} FOLDER "
                       f"(models/image_encoder of h94/IP-Adapter: {NEEDED})")
    encoder = ClipImageEncoder(folder, device)
    if encoder.feature_dim != adapter.mapper.feature_dim:
        raise BadInput(f"{option} {folder} gives {encoder.feature_dim}-d features; {variant} reads "
                       f"{adapter.mapper.feature_dim}-d (CLIP-ViT-H-14's): give the encoder it was made with")
    adapter.image_encoder = encoder
