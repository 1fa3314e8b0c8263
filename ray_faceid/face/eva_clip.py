"""EVA02-CLIP's vision tower (Sun et al., EVA-CLIP: improved training techniques for CLIP at scale),
the image encoder PuLID-FLUX reads a face with (EVA02-CLIP-L-14-336: QuanSun/EVA-CLIP's
`EVA02_CLIP_L_336_psz14_s6B.pt`), written from its published architecture and loaded strictly
under its published names (`visual.*` of the CLIP checkpoint; the text tower is not read).

A pre-norm transformer over 14 px patches and a class token: each attention with q and v biases, 2-D
rotary positions on the patch tokens (interpolated from a 16 x 16 grid to the image's) and a norm
before its output projection; each MLP a SwiGLU with a norm before its last layer. PuLID reads the
class token's projected embedding and the hidden states entering blocks 4, 8, 12, 16 and 20.

Checked against EVA-CLIP's own code (as PuLID ships it) on a toy configuration:
tests/face/test_pulid_encoders.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ray_faceid.errors import UnsupportedModel

HEAD_WIDTH = 64  # EVA02-CLIP's attention heads are 64 wide (one head below that: toy widths)
HIDDEN_AT = (4, 8, 12, 16, 20)  # the blocks whose input PuLID's IDFormer reads
ROPE_GRID = 16  # the patch grid the rotary frequencies were trained at (224 / 14)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's, as PuLID's
EPS = 1e-6


@dataclass(frozen=True)
class EvaConfig:
    width: int
    depth: int
    patch: int
    image_size: int
    mlp_hidden: int
    embed_dim: int

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_WIDTH)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each pair (a, b) of the last dimension turned to (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), grid*grid x head_dim: the first half of each head turns with the patch's row,
    the second with its column, at frequencies 10000^(-2i/(head_dim/2)), positions scaled to a
    ROPE_GRID grid; each frequency fills a pair of dimensions."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    positions = torch.arange(grid) / grid * ROPE_GRID
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # grid x half
    table = torch.cat([angles[:, None, :].expand(grid, grid, half), angles[None, :, :].expand(grid, grid, half)], -1)
    table = table.reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))

        def turned(t):  # the class token keeps its place; the patches turn by their position
            patches = t[:, :, 1:]
            return torch.cat([t[:, :, :1], patches * cos + _rotate_pairs(patches) * sin], dim=2).to(v.dtype)

        out = F.scaled_dot_product_attention(turned(q), turned(k), v, scale=q.shape[-1] ** -0.5)
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, -1)))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=EPS), nn.LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)


class EvaVisionTower(nn.Module):
    """(B, 3, S, S) images, normalised with MEAN and STD -> (the class token's embedding (B, embed_dim),
    the hidden states entering the blocks of HIDDEN_AT (each B x 1 + patches x width))."""

    def __init__(self, config: EvaConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.width, config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2 + 1, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.mlp_hidden) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=EPS)
        self.head = nn.Linear(config.width, config.embed_dim)
        cos, sin = rope_tables(config.width // config.heads, config.grid)
        self.register_buffer("rope_cos", cos, persistent=False)  # computed, as EVA-CLIP's loader drops its copies
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"EVA-CLIP takes {size}x{size} images, not {tuple(images.shape[-2:])}")
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in HIDDEN_AT:
                hidden.append(x)
            x = block(x, cos, sin)
        return self.head(self.norm(x)[:, 0]), hidden


def config_of(state: dict[str, torch.Tensor]) -> EvaConfig:
    """The tower's shape from its weights (width, depth, patch, image size, MLP and embedding widths)."""
    try:
        conv = state["patch_embed.proj.weight"]
        tokens = state["pos_embed"].shape[1] - 1
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        return EvaConfig(width=conv.shape[0], depth=depth, patch=conv.shape[-1],
                         image_size=math.isqrt(tokens) * conv.shape[-1], mlp_hidden=state["blocks.0.mlp.w1.weight"].shape[0],
                         embed_dim=state["head.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as exc:
        raise UnsupportedModel(f"not an EVA02-CLIP vision tower: {exc} is missing (give EVA-CLIP's checkpoint, "
                               "e.g. EVA02_CLIP_L_336_psz14_s6B.pt)") from None


def load_eva_clip(uri: str, meta: bool = False) -> EvaVisionTower:
    """The vision tower of an EVA02-CLIP checkpoint (.pt, as EVA-CLIP publishes it, or .safetensors of
    the same names), loaded strictly: every `visual.*` weight has its place and every place its weight
    (the rotary tables it also stores are computed here). `meta`: built on the meta device from the
    file's names and shapes alone, a check of its layout that reads no weights."""
    from ray_faceid.weight_files import read_tensors

    state = read_tensors(uri, "EVA02-CLIP checkpoint", meta=meta)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")} or state
    visual = {k: v for k, v in visual.items() if "freqs_cos" not in k and "freqs_sin" not in k}
    with torch.device("meta" if meta else "cpu"):
        tower = EvaVisionTower(config_of(visual))
    try:
        tower.load_state_dict(visual, strict=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{uri} is not EVA02-CLIP's vision tower in its published names: "
                               f"{str(exc).splitlines()[1][:300]}") from None
    return tower.eval()
