"""Identity tokens: face embeddings -> tokens of the UNet's cross-attention width.

- IdProjector (IP-Adapter-FaceID style): one embedding (optionally with an expression code,
  Face2Diffusion's expression guidance) -> N tokens through an MLP and a LayerNorm.
- MultiRefMapper (PVA): any number of reference embeddings -> K tokens: the references are
  projected to a width W, K learnable query tokens are appended, a small transformer encoder
  mixes them, and the K query outputs are kept.
- fuse_embeddings: the quality-weighted mean of several references, for single-embedding mappers.

Embeddings are L2-normalised on the way in, so the modules work alike for dlib's 128-d and
ArcFace's 512-d encoders (whose raw norms differ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fuse_embeddings(embeddings: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
    """(..., R, D) references -> (..., D): mean of unit embeddings weighted by quality (>= 0)."""
    unit = F.normalize(embeddings, dim=-1)
    if quality is None:
        return unit.mean(dim=-2)
    w = quality.clamp_min(1e-6)
    return (unit * w.unsqueeze(-1)).sum(dim=-2) / w.sum(dim=-1, keepdim=True)


def unit(embedding: torch.Tensor) -> torch.Tensor:
    """L2-normalised in fp32: in fp16 the norm's floor (1e-12) is 0, and a zero embedding (the
    unconditional rows') gave 0/0."""
    return F.normalize(embedding.float(), dim=-1).to(embedding.dtype)


class IdProjector(nn.Module):
    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, expression_dim: int = 0,
                 hidden: int | None = None):
        super().__init__()
        self.embed_dim, self.cross_attention_dim = embed_dim, cross_attention_dim
        self.num_tokens, self.expression_dim = num_tokens, expression_dim
        hidden = hidden or 2 * max(embed_dim, cross_attention_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim + expression_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_attention_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        # Face2Diffusion: the code used when no expression is asked for, so the reference's own
        # expression does not stick to every output.
        self.null_expression = nn.Parameter(torch.zeros(expression_dim)) if expression_dim else None

    def expression_codes(
        self, batch: int, expression: torch.Tensor | None, drop_prob: float = 0.0
    ) -> torch.Tensor | None:
        """(batch, E): the requested codes, the null code where none was asked for, and in training
        the null code in place of a real one with probability `drop_prob`."""
        if not self.expression_dim:
            return None
        null = self.null_expression.unsqueeze(0).expand(batch, -1)
        if expression is None:
            return null
        if drop_prob > 0 and self.training:
            keep = torch.rand(batch, 1, device=expression.device) >= drop_prob
            return torch.where(keep, expression, null)
        return expression

    def forward(
        self, embedding: torch.Tensor, expression: torch.Tensor | None = None, drop_prob: float = 0.0
    ) -> torch.Tensor:
        """(B, D) [+ (B, E)] -> (B, N, C)."""
        x = unit(embedding)
        codes = self.expression_codes(x.shape[0], expression, drop_prob)
        if codes is not None:
            x = torch.cat([x, codes.to(x.dtype)], dim=-1)
        tokens = self.mlp(x).view(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MultiRefMapper(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        cross_attention_dim: int,
        num_tokens: int = 10,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        self.embed_dim, self.cross_attention_dim, self.num_tokens = embed_dim, cross_attention_dim, num_tokens
        self.inp = nn.Linear(embed_dim, width)
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * width**-0.5)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, references: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, D) references (`present` (B, R) bool marks real ones when R is padded) -> (B, K, C)."""
        b = references.shape[0]
        refs = self.inp(F.normalize(references, dim=-1))
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([refs, queries], dim=1)
        padding = None
        if present is not None:
            padding = torch.cat([~present.bool(), torch.zeros(b, self.num_tokens, dtype=torch.bool, device=x.device)], 1)
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.norm(self.out(x[:, -self.num_tokens :]))
