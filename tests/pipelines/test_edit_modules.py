"""The IMR and the attribute flow at generation time: loading and refusal, edits reaching the
tokens, bad edits refused with the valid list, provenance (tiny components, CPU, seconds)."""
import numpy as np
import pytest
import torch

from ray_faceid.errors import AdapterMismatch, BadEdit, BadInput, EncoderMismatch
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.identity.expression import EXPRESSION_KEYS
from ray_faceid.identity.flow import AttributeFlow, save_flow
from ray_faceid.identity.imr import IdentityMotionReconfigurator, save_imr
from ray_faceid.pipelines.edit_modules import load_edit_modules
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.provenance import read_provenance

SIZE = dict(width=64, height=64, steps=2)


def shaken(module, seed):
    """A module away from its identity-map initialisation, as a trained one is."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def ann(**kwargs):
    return IdentityCondition("ann", np.random.default_rng(1).normal(size=(2, 128)) * 0.1, **kwargs)


@pytest.fixture(scope="module", params=["decoupled", "pva"])
def adapter(request, tiny_base, spec128):
    torch.manual_seed(0)
    yield IdentityAdapter.for_unet(tiny_base.unet, spec128, AdapterOptions(method=request.param, expression_dim=5))
    IdentityAdapter.remove(tiny_base.unet)


@pytest.fixture(scope="module")
def saved(adapter, spec128, tmp_path_factory):
    """A flow and an IMR saved for this adapter, and ones saved for another encoder / adapter."""
    root = tmp_path_factory.mktemp("modules")
    flow = shaken(AttributeFlow(128, EXPRESSION_KEYS, couplings=2, hidden=32), 1)
    imr = shaken(IdentityMotionReconfigurator(token_dim=adapter.mapper.cross_attention_dim), 2)
    save_flow(str(root / "flow"), flow, spec128.key())
    save_flow(str(root / "flow_arcface"), flow, "arcface_onnx/512/x")
    save_imr(str(root / "imr"), imr, adapter.content_hash(), spec128.key())
    save_imr(str(root / "imr_other"), imr, "sha256:another", spec128.key())
    return root


def test_modules_made_for_another_adapter_or_encoder_are_refused(adapter, saved):
    imr, flow = load_edit_modules(adapter, str(saved / "imr"), str(saved / "flow"))
    assert imr.weights_hash.startswith("sha256:") and flow.weights_hash.startswith("sha256:")
    with pytest.raises(AdapterMismatch, match="train the IMR for this adapter") as refused:
        load_edit_modules(adapter, str(saved / "imr_other"), None)
    assert refused.value.status == 409
    with pytest.raises(EncoderMismatch, match="arcface_onnx/512/x"):
        load_edit_modules(adapter, None, str(saved / "flow_arcface"))
    with pytest.raises(BadInput, match="--adapter"):
        load_edit_modules(None, None, str(saved / "flow"))


def test_edits_reach_the_tokens_and_no_edits_leaves_them_as_before(tiny_base, adapter, saved):
    _, flow = load_edit_modules(adapter, None, str(saved / "flow"))
    plain = IdentityPipeline(tiny_base, adapter).identity_tokens([ann()])
    with_flow = IdentityPipeline(tiny_base, adapter, flow=flow)
    assert with_flow.identity_tokens([ann()]).numpy().tobytes() == plain.numpy().tobytes()
    smiling = with_flow.identity_tokens([ann(edits={"smile": 0.9})])
    serious = with_flow.identity_tokens([ann(edits={"smile": 0.1})])
    assert (smiling - serious).abs().max() > 1e-4
    assert (smiling - plain).abs().max() > 1e-4


def test_the_imr_moves_the_tokens_only_for_an_expression(tiny_base, adapter, saved):
    imr, _ = load_edit_modules(adapter, str(saved / "imr"), None)
    without = IdentityPipeline(tiny_base, adapter)
    with_imr = IdentityPipeline(tiny_base, adapter, imr)
    assert torch.equal(with_imr.identity_tokens([ann()]), without.identity_tokens([ann()]))
    turned = {"yaw": -30.0, "pitch": 10.0, "smile": 0.5}  # pose as numbers, in the same code
    moved = with_imr.identity_tokens([ann(expression=turned)])
    assert (moved - without.identity_tokens([ann(expression=turned)])).abs().max() > 1e-4


def test_bad_edits_are_refused_with_the_valid_list(tiny_base, adapter, saved):
    _, flow = load_edit_modules(adapter, None, str(saved / "flow"))
    pipe = IdentityPipeline(tiny_base, adapter, flow=flow)
    with pytest.raises(BadEdit, match=r"'beard' is not an attribute.*smile 0\.\.1.*yaw -90\.\.90 degrees"):
        pipe.generate("x", [ann(edits={"beard": 1.0})], **SIZE)
    with pytest.raises(BadEdit, match=r"yaw=120.0 is out of range.*pitch -60\.\.60"):
        pipe.generate("x", [ann(edits={"yaw": 120.0})], **SIZE)
    with pytest.raises(BadInput, match="need an attribute flow"):
        IdentityPipeline(tiny_base, adapter).generate("x", [ann(edits={"smile": 0.5})], **SIZE)


def test_provenance_records_the_edit_and_the_modules(tiny_base, adapter, saved):
    imr, flow = load_edit_modules(adapter, str(saved / "imr"), str(saved / "flow"))
    pipe = IdentityPipeline(tiny_base, adapter, imr, flow=flow)
    edited = read_provenance(pipe.generate("x", [ann(edits={"smile": 0.8, "yaw": -20.0})], **SIZE).png[0])
    assert edited["flow"] == flow.weights_hash and edited["imr"] == imr.weights_hash
    person = edited["identities"][0]
    assert person["edits"] == {"smile": 0.8, "yaw": -20.0} and person["edit_moved"] > 0
    plain = read_provenance(pipe.generate("x", [ann()], **SIZE).png[0])
    assert "edits" not in plain["identities"][0]
