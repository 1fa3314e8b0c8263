"""Identity attention at the level of one cross-attention layer."""
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ray_faceid.identity.attention import DecoupledIdentityProcessor, ParallelVisualProcessor, saa_gate
from ray_faceid.identity.routing import box_masks, query_routing, strip_boxes

HIDDEN, CROSS, HEADS, GRID = 32, 16, 4, 8


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Attention(query_dim=HIDDEN, cross_attention_dim=CROSS, heads=HEADS, dim_head=HIDDEN // HEADS).eval()


def processor(cls, attn, **kw):
    torch.manual_seed(1)
    p = cls(HIDDEN, CROSS, **kw)
    # random identity weights: a freshly initialised copy would hide bugs that mix up branches
    for lin in [m for m in p.modules() if isinstance(m, torch.nn.Linear)]:
        torch.nn.init.normal_(lin.weight, std=0.2)
    return p


def inputs(b=2, m=1, t=4, n_text=7):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, GRID * GRID, HIDDEN, generator=g)
    text = torch.randn(b, n_text, CROSS, generator=g)
    tokens = torch.randn(b, m, t, CROSS, generator=g)
    return x, text, tokens


def naive_pva(attn, p, x, text, tokens, scale=1.0):
    """Written out head by head from the method's description: one softmax over [text ; identity]."""
    b, length, _ = x.shape
    d = HIDDEN // HEADS
    q, k, v = attn.to_q(x), attn.to_k(text), attn.to_v(text)
    ids = tokens.reshape(b, -1, CROSS)
    q2, k2, v2 = p.to_q_id(x), p.to_k_id(ids), p.to_v_id(ids)
    heads = []
    for h in range(HEADS):
        sl = slice(h * d, (h + 1) * d)
        scores = torch.cat([q[..., sl] @ k[..., sl].transpose(1, 2), q2[..., sl] @ k2[..., sl].transpose(1, 2)], -1)
        scores = scores / math.sqrt(d)
        scores[..., text.shape[1]:] += math.log(scale)
        w = scores.softmax(-1)
        heads.append(w @ torch.cat([v[..., sl], v2[..., sl]], dim=1))
    return attn.to_out[0](torch.cat(heads, -1))


def stock(attn, x, text):
    return AttnProcessor2_0()(attn, x, text)


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_pva_is_one_softmax_over_text_and_identity(layer, scale):
    p = processor(ParallelVisualProcessor, layer)
    x, text, tokens = inputs()
    got = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.full((2, 1), scale))
    assert torch.allclose(got, naive_pva(layer, p, x, text, tokens, scale), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cls", [ParallelVisualProcessor, DecoupledIdentityProcessor])
def test_without_identity_the_layer_is_stock(layer, cls):
    p = processor(cls, layer)
    x, text, tokens = inputs()
    expected = stock(layer, x, text)
    assert torch.allclose(p(layer, x, text), expected, atol=1e-6)
    zero = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.zeros(2, 1))
    assert torch.allclose(zero, expected, atol=1e-5)
    with_id = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.ones(2, 1))
    assert not torch.allclose(with_id, expected, atol=1e-3)


@torch.no_grad()
def test_decoupled_adds_scaled_identity_attention(layer):
    p = processor(DecoupledIdentityProcessor, layer)
    x, text, tokens = inputs(b=1)
    base = stock(layer, x, text)
    one = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.ones(1, 1))
    half = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.full((1, 1), 0.5))
    # the identity term passes through the (linear) output projection, minus its bias
    assert torch.allclose(half - base, 0.5 * (one - base), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cls", [ParallelVisualProcessor, DecoupledIdentityProcessor])
def test_routing_keeps_each_identity_in_its_region(layer, cls):
    p = processor(cls, layer)
    x, text, tokens = inputs(b=1, m=2)
    masks = box_masks(strip_boxes(2), GRID, GRID).unsqueeze(0)  # A left, B right
    scale = torch.ones(1, 2)
    before = p(layer, x, text, identity_tokens=tokens, identity_scale=scale, region_masks=masks)
    changed = tokens.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])  # a different person A
    after = p(layer, x, text, identity_tokens=changed, identity_scale=scale, region_masks=masks)
    owner = query_routing(masks, GRID * GRID)[0]
    in_a, in_b = owner[:, 0], owner[:, 1]
    assert in_a.sum() == in_b.sum() == GRID * GRID // 2
    assert torch.allclose(after[0, in_b], before[0, in_b], atol=1e-6)
    assert (after[0, in_a] - before[0, in_a]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("cls", [ParallelVisualProcessor, DecoupledIdentityProcessor])
def test_saa_gate_leaves_ungated_queries_text_only(layer, cls):
    p = processor(cls, layer, gate=True, gate_threshold=0.3)
    x, text, tokens = inputs(b=1)
    out = p(layer, x, text, identity_tokens=tokens, identity_scale=torch.ones(1, 1))
    base = stock(layer, x, text)
    # recompute the gate the processor used
    ids = tokens.reshape(1, -1, CROSS)
    q_proj = p.to_q_id if cls is ParallelVisualProcessor else layer.to_q
    q = q_proj(x).view(1, -1, HEADS, HIDDEN // HEADS).transpose(1, 2)
    k = p.to_k_id(ids).view(1, -1, HEADS, HIDDEN // HEADS).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
    gate = saa_gate(scores, torch.ones(1, GRID * GRID, 4, dtype=torch.bool), 0.3)[0]
    off, on = gate == 0, gate > 0
    assert off.any() and on.any()
    assert torch.allclose(out[0, off], base[0, off], atol=1e-5)
    assert (out[0, on] - base[0, on]).abs().max() > 1e-4


def test_gate_is_min_max_normalised_and_thresholded():
    scores = torch.tensor([0.0, 1.0, 2.0, 10.0]).view(1, 1, 4, 1)
    gate = saa_gate(scores, torch.ones(1, 4, 1, dtype=torch.bool), 0.3)
    assert gate.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    gate = saa_gate(scores, torch.ones(1, 4, 1, dtype=torch.bool), 0.05)
    assert torch.allclose(gate, torch.tensor([[0.0, 0.1, 0.2, 1.0]]))


def test_region_masks_at_any_resolution_map_to_layer_grids():
    masks = box_masks([(0.0, 0.0, 0.25, 1.0), (0.25, 0.0, 1.0, 1.0)], 64, 48).unsqueeze(0)
    for length in (64 * 48, 32 * 24, 16 * 12, 8 * 6):
        owner = query_routing(masks, length)
        assert owner.shape == (1, length, 2)
        assert (owner.sum(-1) == 1).all()  # every query belongs to exactly one identity
        assert abs(owner[0, :, 0].float().mean().item() - 0.25) < 0.1
    with pytest.raises(ValueError, match="no downsampled grid"):
        query_routing(masks, 1000)
    with pytest.raises(ValueError, match="need 0 <= x0 < x1 <= 1"):
        box_masks([(0.5, 0.0, 0.4, 1.0)], 8, 8)
