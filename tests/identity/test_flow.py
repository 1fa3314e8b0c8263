import pytest
import torch

from ray_faceid.identity.flow import AttributeFlow


@pytest.fixture
def flow():
    torch.manual_seed(0)
    f = AttributeFlow(32, ("yaw", "smile"), couplings=4, hidden=64)
    with torch.no_grad():  # non-trivial couplings, not the identity map of a fresh flow
        for p in f.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return f


def test_decode_inverts_encode(flow):
    x = torch.randn(16, 32)
    z, _ = flow.encode(x)
    assert not torch.allclose(z, x, atol=1e-2)
    assert torch.allclose(flow.decode(z), x, atol=1e-4)


def test_edit_sets_the_attribute_and_keeps_the_identity(flow):
    x = torch.randn(4, 32)
    edited, moved = flow.edit(x, {"smile": 2.0})
    z0, _ = flow.encode(x)
    z1, _ = flow.encode(edited)
    assert torch.allclose(z1[:, 1], torch.full((4,), 2.0), atol=1e-4)
    assert torch.allclose(z1[:, 2:], z0[:, 2:], atol=1e-4)  # identity part untouched
    assert torch.allclose(z1[:, 0], z0[:, 0], atol=1e-4)  # other attribute untouched
    assert (moved > 0).all()
    with pytest.raises(KeyError, match="not in this flow"):
        flow.edit(x, {"beard": 1.0})


def test_training_reduces_each_flow_loss(flow):
    torch.manual_seed(1)
    people = torch.arange(8).repeat_interleave(4)
    centres = torch.randn(8, 32)
    x = centres[people] + 0.3 * torch.randn(32, 32)
    labels = torch.randn(32, 2)
    before = {k: v.item() for k, v in flow.losses(x, labels, people).items()}
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        flow.losses(x, labels, people)["total"].backward()
        opt.step()
    after = {k: v.item() for k, v in flow.losses(x, labels, people).items()}
    for key in ("nll", "attribute", "pull", "total"):
        assert after[key] < before[key], key
