import pytest
import torch

from ray_faceid.errors import BaseModelMismatch, EncoderMismatch, NotFound
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.identity.attention import DecoupledIdentityProcessor, ParallelVisualProcessor, SelfAttnProcessor
from ray_faceid.identity.tokens import IdProjector, MultiRefMapper, fuse_embeddings


@pytest.mark.parametrize("method", ["decoupled", "pva"])
def test_install_freezes_the_base_and_trains_only_the_adapter(tiny_base, spec128, method):
    unet = tiny_base.unet
    adapter = IdentityAdapter.for_unet(unet, spec128, AdapterOptions(method=method))
    adapter.install(unet)
    try:
        cls = DecoupledIdentityProcessor if method == "decoupled" else ParallelVisualProcessor
        procs = unet.attn_processors
        cross = [n for n in procs if "attn2" in n]
        assert cross and all(isinstance(procs[n], cls) for n in cross)
        assert all(isinstance(procs[n], SelfAttnProcessor) for n in procs if "attn1" in n)
        adapter_ids = {id(p) for p in adapter.parameters()}
        trainable = {id(p) for p in unet.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in unet.parameters()} & adapter_ids  # processors live in the UNet now
        base_params = [p for p in unet.parameters() if id(p) not in adapter_ids]
        assert base_params and not any(p.requires_grad for p in base_params)
        assert all(p.requires_grad for p in adapter.parameters())
        # identity projections start as copies of the layer's own
        name = cross[0]
        attn = dict(unet.named_modules())[name.rsplit(".", 1)[0]]
        assert torch.equal(procs[name].to_k_id.weight, attn.to_k.weight)
    finally:
        IdentityAdapter.remove(unet)
    assert not any(isinstance(p, (DecoupledIdentityProcessor, ParallelVisualProcessor)) for p in unet.attn_processors.values())


def test_save_load_roundtrip_is_bit_exact(tiny_base, spec128, tmp_path):
    adapter = IdentityAdapter.for_unet(tiny_base.unet, spec128, AdapterOptions(method="pva", gate=True, expression_dim=5))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    adapter.save(str(tmp_path / "ad"))
    loaded = IdentityAdapter.load(str(tmp_path / "ad"), tiny_base.unet, spec128)
    assert loaded.options == adapter.options
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.content_hash() == adapter.content_hash()
    # memory:// works the same (fsspec)
    adapter.save("memory://adapters/x")
    assert IdentityAdapter.load("memory://adapters/x").content_hash() == adapter.content_hash()


def test_mismatched_encoder_or_base_is_refused(tiny_base, spec128, tmp_path):
    IdentityAdapter.for_unet(tiny_base.unet, spec128).save(str(tmp_path / "ad"))
    arcface = EncoderSpec(name="arcface_onnx", dim=512, version="v1", license="-", metric="cosine", threshold=0.68)
    with pytest.raises(EncoderMismatch, match=r"128-d.*512-d"):
        IdentityAdapter.load(str(tmp_path / "ad"), encoder_spec=arcface)
    from ray_faceid.pipelines.models import build_tiny

    same_architecture_other_weights = build_tiny(seed=1).unet
    with pytest.raises(BaseModelMismatch, match="trained for the base UNet with weights hash"):
        IdentityAdapter.load(str(tmp_path / "ad"), unet=same_architecture_other_weights)
    with pytest.raises(NotFound, match="no identity adapter"):
        IdentityAdapter.load(str(tmp_path / "nothing"))


@pytest.mark.parametrize("dim", [128, 512])
def test_token_mappers_work_for_any_encoder_dimension(dim):
    proj = IdProjector(dim, 32, num_tokens=4, expression_dim=5)
    assert proj(torch.randn(3, dim)).shape == (3, 4, 32)
    mapper = MultiRefMapper(dim, 32, num_tokens=10)
    assert mapper(torch.randn(2, 1, dim)).shape == (2, 10, 32)
    assert mapper(torch.randn(2, 7, dim)).shape == (2, 10, 32)


def test_multiref_ignores_padded_references():
    torch.manual_seed(0)
    mapper = MultiRefMapper(16, 8, num_tokens=3).eval()
    refs = torch.randn(1, 2, 16)
    padded = torch.cat([refs, torch.randn(1, 3, 16) * 100], dim=1)
    present = torch.tensor([[True, True, False, False, False]])
    assert torch.allclose(mapper(refs), mapper(padded, present), atol=1e-5)


def test_expression_guidance_uses_the_null_code_unless_asked():
    torch.manual_seed(0)
    proj = IdProjector(16, 8, num_tokens=2, expression_dim=5).eval()
    with torch.no_grad():
        proj.null_expression.copy_(torch.randn(5))
    emb = torch.randn(1, 16)
    assert torch.allclose(proj(emb), proj(emb, proj.null_expression.unsqueeze(0)))
    assert not torch.allclose(proj(emb), proj(emb, torch.ones(1, 5)))
    proj.train()
    torch.manual_seed(1)
    codes = proj.expression_codes(1000, torch.ones(1000, 5), drop_prob=0.3)
    dropped = (codes == proj.null_expression).all(-1).float().mean().item()
    assert 0.25 < dropped < 0.35


def test_fusion_weights_references_by_quality():
    refs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(fuse_embeddings(refs, torch.tensor([1.0, 0.0])), torch.tensor([1.0, 0.0]), atol=1e-5)
    assert torch.allclose(fuse_embeddings(refs), torch.tensor([0.5, 0.5]))


def test_a_pipeline_built_on_an_installed_adapter_leaves_it_trainable(spec128, monkeypatch):
    """Installing again (every IdentityPipeline does) froze the processors already in the UNet, and
    the next per-identity adaptation in that process failed with 'does not require grad'."""
    from ray_faceid.identity.personalization import adapt_identity
    from ray_faceid.pipelines.generate import IdentityPipeline
    from ray_faceid.pipelines.models import build_tiny

    base = build_tiny()
    adapter = IdentityAdapter.for_unet(base.unet, spec128)
    adapter.install(base.unet)
    IdentityPipeline(base, adapter)
    assert all(p.requires_grad for p in adapter.processors.parameters())
    adapter.processors.requires_grad_(False)  # whatever a caller left: adaptation trains the processors

    def fake_losses(*args, **kwargs):  # the optimiser's part, not the diffusion loss
        return {"total": sum((p ** 2).sum() for p in adapter.processors.parameters())}

    monkeypatch.setattr("ray_faceid.identity.personalization.adapter_losses", fake_losses)
    delta, metrics = adapt_identity(base, adapter, lambda step: None, None, steps=2, lr=1e-2)
    assert metrics["loss_end"] < metrics["loss_start"] and any(d.abs().sum() > 0 for d in delta.values())
    assert not any(p.requires_grad for p in adapter.processors.parameters())  # the caller's flags come back
