"""The page shows the controls its deployment's base takes: on FLUX.1 no sampler, expression or edits
(a FLUX deployment answers each with 422) and a negative prompt with true CFG, on schnell no
guidance, on Fill only the Inpaint tab, true CFG on FLUX alone; the identity's start step everywhere;
and a hidden control's last value is never sent."""
from __future__ import annotations

import asyncio

import pytest

gr = pytest.importorskip("gradio", reason="the web page needs the `ui` extra (pip install 'ray-faceid[ui]')")

UNET = {"steps": 30, "guidance": 5.0, "width": 512, "height": 512, "served": ""}
SCHNELL = {"steps": 4, "guidance": None, "width": 1024, "height": 1024, "served": "",
           "controls": {"negative_prompt": False, "sampler": False, "guidance": False, "expression": False,
                        "edits": False, "generate": True, "inpaint": False, "true_cfg": False}}
DEV = {"steps": 28, "guidance": 3.5, "width": 1024, "height": 1024, "served": "",
       "controls": {"negative_prompt": True, "sampler": False, "guidance": True, "expression": False,
                    "edits": False, "generate": True, "inpaint": False, "true_cfg": True}}


class Sent(Exception):
    """Raised by the fake service with the request the page built."""


class FakeService:
    """The service's steps the page calls before a request leaves it."""

    def __init__(self, defaults: dict):
        self._defaults = defaults

    def tenant(self, authorization: str) -> str:
        return "acme"

    async def defaults(self) -> dict:
        return self._defaults

    async def generate(self, tenant, body, on_progress=None):
        raise Sent(body)

    inpaint = generate


def _visible(update) -> bool:
    return update.get("visible") if isinstance(update, dict) else update.visible


def test_a_schnell_deployment_hides_what_it_refuses():
    from deployments.web_page import control_updates

    steps, guidance, inpaint_steps, inpaint_guidance, *shown = control_updates(SCHNELL)
    assert (steps, inpaint_steps) == (4, 4)
    assert not guidance.visible and not inpaint_guidance.visible
    negative, expression, edits, sampler, inpaint_sampler, generate_tab, inpaint_tab, true_cfg, _ = map(_visible, shown)
    assert not any((negative, expression, edits, sampler, inpaint_sampler, inpaint_tab, true_cfg)) and generate_tab
    # A UNet deployment (which says nothing of controls) shows them all, from its own guidance, but
    # true CFG (FLUX's: a UNet guides with guidance).
    steps, guidance, _, _, *shown = control_updates(UNET)
    assert guidance.value == 5.0 and guidance.visible and [_visible(s) for s in shown] == [True] * 7 + [False, True]
    *_, true_cfg, _ = control_updates(DEV)
    assert _visible(true_cfg)


def test_what_real_deployments_say_they_take():
    """From the Generators' own controls: FLUX dev and schnell take a negative prompt with true CFG,
    not beside the step cache (every such request would be a 422); InstantID takes no identity start."""
    from types import SimpleNamespace

    from deployments.flux_generator import FluxServeGenerator
    from deployments.generator import Generator
    from deployments.web_page import control_updates

    def flux(step_cache: float, inpainting: bool = False) -> dict:
        base = SimpleNamespace(inpainting=inpainting, guidance_embedded=False)
        return FluxServeGenerator.controls(SimpleNamespace(pipeline=SimpleNamespace(base=base, step_cache=step_cache)))

    def shown(controls: dict) -> dict:
        *_, negative, _, _, _, _, _, _, true_cfg, start = control_updates({**SCHNELL, "controls": controls})
        return {"negative_prompt": _visible(negative), "true_cfg": _visible(true_cfg), "identity_start": _visible(start)}

    assert shown(flux(0.0)) == {"negative_prompt": True, "true_cfg": True, "identity_start": True}
    assert shown(flux(0.1)) == {"negative_prompt": False, "true_cfg": False, "identity_start": True}
    assert shown(flux(0.0, inpainting=True))["true_cfg"] is False
    instantid = SimpleNamespace(adapter=SimpleNamespace(kind=SimpleNamespace(identitynet=True)))
    faceid = SimpleNamespace(adapter=SimpleNamespace(kind=SimpleNamespace(identitynet=False)))
    assert Generator.controls(SimpleNamespace(pipeline=instantid))["identity_start"] is False
    assert Generator.controls(SimpleNamespace(pipeline=faceid))["identity_start"] is True


@pytest.mark.parametrize("defaults", [SCHNELL, UNET], ids=["schnell", "unet"])
def test_a_hidden_control_value_is_not_sent(defaults):
    from deployments.web_page import PageActions

    actions = PageActions(FakeService(defaults))
    with pytest.raises(Sent) as sent:
        asyncio.run(actions.generate("token", ["id-1"], "a portrait", "blurry", "smile", "smile=0.5", "automatic",
                                     64, 64, 2, 1, 1.0, 7.5, "euler"))
    body = sent.value.args[0]
    person = body.identities[0]
    taken = defaults is UNET
    assert (body.negative_prompt == "blurry") is taken and (body.scheduler == "euler") is taken
    assert (body.guidance == 7.5) is taken and (person.expression == "smile") is taken
    assert (person.edits == {"smile": 0.5}) is taken
    if not taken:
        assert body.guidance is None and body.scheduler is None and person.edits is None


@pytest.mark.parametrize("defaults", [DEV, UNET], ids=["flux-dev", "unet"])
def test_the_identity_start_is_sent_and_true_cfg_only_where_the_base_takes_it(defaults):
    from deployments.web_page import PageActions

    actions = PageActions(FakeService(defaults))
    with pytest.raises(Sent) as sent:
        asyncio.run(actions.generate("token", ["id-1"], "a portrait", "blurry", "", "", "automatic", 64, 64, 4, 1,
                                     1.0, 3.5, "", identity_start=2, true_cfg=2.5))
    body = sent.value.args[0]
    assert body.identity_start == 2 and body.negative_prompt == "blurry"
    assert body.true_cfg == (2.5 if defaults is DEV else 1.0)


def test_inpaint_sends_its_soft_edge():
    import numpy as np

    from deployments.web_page import PageActions

    photo, layer = np.full((64, 48, 4), 200, np.uint8), np.zeros((64, 48, 4), np.uint8)
    layer[10:20, 5:15, 3] = 255
    with pytest.raises(Sent) as sent:
        asyncio.run(PageActions(FakeService(UNET)).inpaint("token", {"background": photo, "layers": [layer]}, "id-1",
                                                           "a portrait", 2, 1, feather=9))
    assert sent.value.args[0].feather == 9.0


def test_a_name_is_shown_as_text_not_as_markup():
    """From the security probe: a person named `<img src=x onerror=...>` became an image element in the
    page's delete confirmation (a remote image loaded by the browser)."""
    from types import SimpleNamespace

    from deployments.web_page import PageActions

    class Named(FakeService):
        async def identity(self, tenant, identity):
            return SimpleNamespace(name="<img src=https://x.example/b.png onerror=alert(1)> **bold**", id=identity)

    _, text = asyncio.run(PageActions(Named(UNET)).ask_delete("token", "id-1"))
    assert "<img" not in text and "&lt;img src=https://x.example/b.png" in text and r"\*\*bold\*\*" in text
