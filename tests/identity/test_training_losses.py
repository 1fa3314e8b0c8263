"""A few optimiser steps of each training loss on tiny components reduce that loss: the losses
reach the parameters they are meant to train, and only those."""
import numpy as np
import pytest
import torch

from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.identity.cross_training import Shot, assemble_cross_batch
from ray_faceid.identity.imr import IdentityMotionReconfigurator, imr_losses
from ray_faceid.identity.losses import stratified_timesteps
from ray_faceid.identity.objective import adapter_losses


def shots(n_people=2, per_person=2, size=32):
    rng = np.random.default_rng(0)
    out = []
    for p in range(n_people):
        centre = rng.normal(size=128)
        for s in range(per_person):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            lms = np.array([[10, 12], [22, 12], [16, 18], [12, 24], [20, 24]], float)
            out.append(Shot(f"p{p}s{s}", f"p{p}", centre + 0.1 * rng.normal(size=128), img, lms,
                            caption=f"a photo of person {p}, smiling" if s else f"a photo of person {p}",
                            expression=[float(s), 0.0, 0.8, 0.0, 0.0]))
    return out


def cross_pairs(all_shots):
    return [(a, b) for a in all_shots for b in all_shots if a.person == b.person and a.face_id != b.face_id]


def test_cross_batches_refuse_bad_pairs():
    s = shots()
    batch = assemble_cross_batch(cross_pairs(s))
    assert batch.id_embeddings.shape == (4, 128) and batch.pixels.shape == (4, 3, 32, 32)
    assert batch.face_masks.sum() > 0 and batch.face_masks.sum() < batch.face_masks.numel()
    assert batch.captions[0] == s[1].caption  # caption of the target B, identity of A
    with pytest.raises(BadInput, match="crosses people"):
        assemble_cross_batch([(s[0], s[2])])
    with pytest.raises(BadInput, match="both identity and target"):
        assemble_cross_batch([(s[0], s[0])])


@pytest.mark.parametrize("method", ["decoupled", "pva"])
def test_adapter_objective_decreases(tiny_base, spec128, method):
    adapter = IdentityAdapter.for_unet(tiny_base.unet, spec128, AdapterOptions(method=method, expression_dim=5))
    adapter.install(tiny_base.unet)
    try:
        batch = assemble_cross_batch(cross_pairs(shots()))
        # Every UNet parameter is given to the optimiser: only the freeze keeps the base unchanged.
        opt = torch.optim.Adam(tiny_base.unet.parameters(), lr=2e-3)
        base_before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items() if "processor" not in k}

        def loss():
            g = torch.Generator().manual_seed(0)  # the same noise and timesteps each time
            return adapter_losses(tiny_base, adapter, batch, expression_drop=0.0, generator=g)

        first = loss()
        assert set(first) == {"inside", "outside", "total"}
        for _ in range(8):
            opt.zero_grad()
            loss()["total"].backward()
            opt.step()
        assert loss()["total"].item() < first["total"].item()
        after = {k: v for k, v in tiny_base.unet.state_dict().items() if "processor" not in k}
        assert all(torch.equal(base_before[k], after[k]) for k in base_before)  # base frozen
    finally:
        IdentityAdapter.remove(tiny_base.unet)


def test_imr_losses_decrease(tiny_base, spec128):
    torch.manual_seed(0)
    adapter = IdentityAdapter.for_unet(tiny_base.unet, spec128)
    adapter.install(tiny_base.unet)
    adapter.requires_grad_(False)  # IMR training: base and adapter frozen
    try:
        imr = IdentityMotionReconfigurator(token_dim=32)
        source = torch.randn(4, 4, 32)
        motion = torch.randn(4, 5)
        target = source + 0.5 * torch.tanh(motion[:, :1, None]).expand(-1, 4, 32)
        latents = torch.randn(4, 4, 8, 8)
        text = torch.randn(4, 32, 32)
        t = torch.full((4,), 500)

        def predict(tokens):
            kw = {"identity_tokens": tokens.unsqueeze(1), "identity_scale": torch.ones(4, 1)}
            return tiny_base.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kw).sample

        assert torch.allclose(imr(source, motion), source)  # starts as the identity map
        first = imr_losses(imr, source, motion, target, predict)
        opt = torch.optim.Adam(imr.parameters(), lr=3e-3)
        for _ in range(15):
            opt.zero_grad()
            imr_losses(imr, source, motion, target, predict)["total"].backward()
            opt.step()
        last = imr_losses(imr, source, motion, target, predict)
        assert last["token"] < first["token"] and last["noise"] < first["noise"]
        assert all(p.grad is None for p in adapter.parameters())
    finally:
        IdentityAdapter.remove(tiny_base.unet)


def test_stratified_timesteps_cover_every_stratum():
    t = stratified_timesteps(10, 1000, torch.Generator().manual_seed(0))
    assert sorted((t // 100).tolist()) == list(range(10))
