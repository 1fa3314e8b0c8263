"""The web page at /ui (Gradio), served by the Ingress replica itself: enroll, generate, inpaint,
erase and look at a render output from a browser. A face of the service (service.py), as the HTTP
API is: every action calls one of the service's steps, so validation, limits, tenants and errors
are the API's, message for message.

Each action presents the API token typed on the page, and a page without a valid token shows
nothing of any tenant. Files are another matter: Gradio's file values are server paths, so the
gate in front of the page (page_gate.py) decides which files a request may name and which a
browser may fetch, by the session Sign in opened. With several Ingress replicas the proxy in front
must keep a browser on one replica (Gradio's queue and the gate's sessions live in the replica).
"""
from __future__ import annotations

import functools
import html
import io
import logging
import os
import re

import numpy as np
from PIL import Image
from pydantic import ValidationError

from deployments.schemas import CONTROLS, TAKEN_UNSAID
from deployments.service import FaceService, public_message
from ray_faceid.errors import BadInput, FaceIdError

log = logging.getLogger("ray.serve")
PATH = "/ui"
# Uploads and outputs Gradio keeps on the replica's disk are deleted within this many seconds:
# they are faces (biometric data); an erasure through this replica deletes its tenant's at once.
PAGE_FILES_TTL_S = 600
LAYOUTS = ("automatic", "side by side")
# An empty gallery is hidden: on a phone the two empty ones took the whole first screen.
PAGE_CSS = "#found:not(:has(img)), #people:not(:has(img)) { display: none; }"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


def mount(app, service: FaceService) -> bool:
    """Mount the page on this replica's copy of the FastAPI app; False where it is off or Gradio is not installed."""
    if not service.config.web_page:
        return False
    if not available():
        log.info("the web page is off: install the `ui` extra (pip install 'ray-faceid[ui]') to serve it at %s", PATH)
        return False
    import tempfile

    import gradio as gr
    from starlette.routing import Mount

    from deployments.page_gate import PageFiles, PageGate

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls out of the cluster
    # The page's uploads and answers in a folder of this replica's own (mode 0700), which the gate
    # hands out per tenant; Gradio reads the folder from the environment when the page is built.
    os.environ["GRADIO_TEMP_DIR"] = os.path.realpath(tempfile.mkdtemp(prefix="ray_faceid_page_"))
    files = PageFiles(os.environ["GRADIO_TEMP_DIR"])
    limit = service.config.limits.max_upload_bytes
    # No run history: it keeps the typed token and file values in the browser and can push runs out.
    gr.mount_gradio_app(app, build(service, files), path=PATH, ssr_mode=False, footer_links=[], max_file_size=limit,
                        run_history=False, mcp_server=False, css=PAGE_CSS,
                        theme=gr.themes.Default(font=["system-ui", "sans-serif"],  # no web fonts to fetch
                                                font_mono=["ui-monospace", "monospace"]))
    mounted = next(r for r in app.router.routes if isinstance(r, Mount) and r.path == PATH)
    mounted.app = PageGate(mounted.app, files, service.tokens)
    service.after_erasure.append(files.forget_tenant)  # the page's uploads and answers may show them: gone at once
    return True


def _shown(exc: Exception):
    """The error as the page shows it: the API's message (storage paths removed), never a traceback."""
    import gradio as gr

    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, FaceIdError):
        return gr.Error(f"{exc.status} {exc.code}: {public_message(exc.message)}")
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
        return gr.Error(f"422 invalid_request: {public_message(problems)}")
    log.error("a web page action failed", exc_info=exc)
    return gr.Error(f"500 internal: an internal error ({type(exc).__name__}); it is logged on the server")


def _action(fn):
    """A page action: every error becomes a readable message on the page."""

    @functools.wraps(fn)
    async def run(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown on the page (typed) or logged (a bug)
            raise _shown(exc) from None

    return run


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _edits(text: str) -> dict[str, float] | None:
    """'smile=0.8, yaw=-20' -> {"smile": 0.8, "yaw": -20.0}."""
    edits = {}
    for item in (s.strip() for s in (text or "").split(",") if s.strip()):
        key, sep, value = item.partition("=")
        try:
            edits[key.strip()] = float(value)
        except ValueError:
            raise BadInput(f"attribute edit {item!r}: write name=value, e.g. smile=0.8, yaw=-20") from None
        if not sep:
            raise BadInput(f"attribute edit {item!r}: write name=value, e.g. smile=0.8, yaw=-20")
    return edits or None


def _whole(value, what: str) -> int:
    """A number field's value; an emptied field is a message, not a TypeError."""
    if value is None:
        raise BadInput(f"{what} is empty: enter a number")
    return int(value)


def _seed(value) -> int | None:
    return None if value is None or value < 0 else int(value)


def regions(layout: str, count: int) -> list:
    """The preset regions of `count` people, in the order they were picked."""
    if layout == "side by side" and count > 1:
        return [(k / count, 0.0, (k + 1) / count, 1.0) for k in range(count)]
    return [None] * count


def taken(defaults: dict) -> dict[str, bool]:
    """Which settings and actions the deployment takes (Generator.controls; all where it does not say)."""
    controls = defaults.get("controls") or {}
    return {name: controls.get(name, TAKEN_UNSAID[name]) for name in CONTROLS}


def control_updates(defaults: dict) -> tuple:
    """The Generate and Inpaint tabs as the deployment's base takes them, starting from its own steps and
    guidance: a FLUX deployment answers a negative prompt or a sampler with 422, schnell any guidance."""
    import gradio as gr

    takes = taken(defaults)
    guidance = gr.Slider(value=defaults["guidance"], visible=True) if takes["guidance"] else gr.Slider(visible=False)
    return (defaults["steps"], guidance, defaults["steps"], guidance,
            *(gr.update(visible=takes[name]) for name in ("negative_prompt", "expression", "edits", "sampler", "sampler",
                                                          "generate", "inpaint", "true_cfg", "identity_start")))


def scores_table(images, names: dict[str, str]) -> str:
    rows = ["| person | similarity | same person | most similar other person |", "|---|---|---|---|"]
    for image in images:
        for s in image.scores:
            similarity = "no face found" if s.similarity is None else f"{s.similarity:.3f}"
            same = {True: "yes", False: "no", None: "-"}[s.same_person]
            other = "-" if s.wrong_identity_similarity is None else f"{s.wrong_identity_similarity:.3f}"
            rows.append(f"| {names.get(s.id, s.id)} | {similarity} | {same} | {other} |")
    return "\n".join(rows)


def _literal(text: str) -> str:
    """A name or file name as literal text in the page's Markdown: no HTML of it rendered (a name
    like `<img src=...>` loaded a remote image in the browser), no Markdown of it either."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(str(text), quote=False))


class PageActions:
    """What each control does; every method takes the page's token first."""

    def __init__(self, service: FaceService, files=None):
        self.service, self.files = service, files

    def tenant(self, token: str) -> str:
        return self.service.tenant(f"Bearer {(token or '').strip()}")

    async def sign_in(self, token: str):
        """The tenant's view; with a bad token, an empty one (nothing of whoever signed in before)."""
        import gradio as gr

        from deployments.service import Unauthorized

        try:
            tenant = self.tenant(token)
        except Unauthorized as exc:
            empty = gr.Dropdown(choices=[], value=None)
            return (f"**{exc.status} {exc.code}**: {exc.message}", gr.Tabs(visible=False), [], empty,
                    gr.Dropdown(choices=[], value=[]), empty, empty, *[gr.skip()] * 15)
        defaults = await self.service.defaults()
        everyone = await self.service.people(tenant)
        outputs = [(f"{k + 1}: {name}", k) for k, name in enumerate(await self.service.render_outputs(tenant))]
        return (f"Signed in: tenant **{tenant}**, {len(everyone)} people enrolled. {defaults.get('served', '')}",
                gr.Tabs(visible=True), *(await self._people_updates(tenant, everyone)),
                gr.Dropdown(choices=outputs, value=None), defaults["width"], defaults["height"],
                *control_updates(defaults))

    async def gallery(self, tenant: str, everyone: list[dict]) -> list:
        tiles = []
        for meta in everyone:
            crops = await self.service.references(tenant, meta["id"])
            own = "own adapter" if meta.get("adapters") else "shared adapter"
            tiles.append((crops[0] if crops else None, f"{meta['name']} · {meta['id']} · {own}"))
        return [t for t in tiles if t[0] is not None]

    def _uploads(self, files) -> list[tuple[str, bytes]]:
        """The uploaded photos' bytes. The gate (page_gate.py) let through only the caller's own
        uploads; a path outside the page's folder is refused here too, unread."""
        uploads = []
        for f in files or []:
            path = f if isinstance(f, str) else f.name
            if self.files is not None and self.files.resolve(path) is None:
                raise BadInput("a photo was not uploaded from this page: upload it again")
            with open(path, "rb") as fh:
                uploads.append((os.path.basename(path), fh.read()))
        return uploads

    async def preview(self, token: str, files, consent: str):
        self.tenant(token)
        if not files:
            return [], ""
        if not (consent or "").strip():  # as the API: no face is analysed before consent is given
            return [], "Enter the consent reference: the photos are checked once it is given."
        draft = await self.service.examine_photos(self._uploads(files))
        found = [(crop, report.filename) for crop, report in zip(draft.crops, [r for r in draft.reports if r.accepted])]
        refused = [f"- **{_literal(r.filename)}**: {_literal(r.reason)}" for r in draft.reports if not r.accepted]
        note = f"{len(found)} of {len(draft.reports)} photos usable."
        return found, note + ("\n\nNot used:\n" + "\n".join(refused) if refused else "")

    async def enroll(self, token: str, files, name: str, consent: str, reconsent: str):
        tenant = self.tenant(token)
        # The page picks people by name, so it asks for one (the API allows a nameless person).
        if not (name or "").strip():
            raise BadInput("give the person a name (unique among your people)")
        uploads = self._uploads(files)
        person = await self.service.enroll(tenant, uploads, name, consent or "", reconsent=(reconsent or "").strip())
        # The form is cleared; Gradio's copies of the photos go with its cache (PAGE_FILES_TTL_S).
        return (f"Enrolled **{_literal(person.name)}** ({person.id}) from {person.faces_used} of {len(uploads)} photos.",
                None, "", "", "", [], "", *(await self._people_updates(tenant)))

    async def _people_updates(self, tenant: str, everyone: list[dict] | None = None) -> tuple:
        """The gallery and the three people pickers."""
        import gradio as gr

        everyone = await self.service.people(tenant) if everyone is None else everyone
        choices = [(f"{m['name']} ({m['id'][:11]})", m["id"]) for m in everyone]
        return (await self.gallery(tenant, everyone), gr.Dropdown(choices=choices, value=None),
                gr.Dropdown(choices=choices, value=[]), gr.Dropdown(choices=choices, value=None))

    async def ask_delete(self, token: str, identity: str | None):
        import gradio as gr

        tenant = self.tenant(token)
        if not identity:
            raise BadInput("pick the person to delete")
        person = await self.service.identity(tenant, identity)
        text = (f"Erase **{_literal(person.name)}** ({person.id}) everywhere: their photos' embeddings, crops, adapters, "
                "rendered images and training rows? This cannot be undone.")
        return gr.Row(visible=True), text

    async def delete(self, token: str, identity: str | None):
        import gradio as gr

        tenant = self.tenant(token)
        if not identity:
            raise BadInput("pick the person to delete")
        report = await self.service.erase(tenant, identity)
        return (gr.Row(visible=False), gr.JSON(value=report.model_dump(), visible=True),
                *(await self._people_updates(tenant)))

    async def generate(self, token, picked, prompt, negative, expression, edits, layout, width, height, steps, seed,
                       strength, guidance, sampler=None, progress=None, identity_start=0, true_cfg=1.0):
        from deployments.schemas import GenerateRequest

        tenant = self.tenant(token)
        # A control this deployment does not take is hidden; its last value is not sent either.
        takes = taken(await self.service.defaults())
        negative, expression, edits, sampler = (value if takes[what] else None for what, value in (
            ("negative_prompt", negative), ("expression", expression), ("edits", edits), ("sampler", sampler)))
        guidance = guidance if takes["guidance"] else None
        true_cfg = true_cfg if takes["true_cfg"] else 1.0
        identity_start = identity_start if takes["identity_start"] else 0
        picked = list(picked or [])
        if not 1 <= len(picked) <= 4:
            raise BadInput("pick one to four people")
        changes = _edits(edits)
        people = [{"id": p, "region": box, "expression": (expression or "").strip() or None, "scale": strength,
                   "edits": changes} for p, box in zip(picked, regions(layout, len(picked)))]
        body = GenerateRequest(prompt=prompt, negative_prompt=negative or "", identities=people, seed=_seed(seed),
                               steps=_whole(steps, "steps"), width=_whole(width, "width"),
                               height=_whole(height, "height"), guidance=guidance, scheduler=sampler or None,
                               identity_start=_whole(identity_start or 0, "identity start"), true_cfg=true_cfg)
        result = await self.service.generate(tenant, body, self._reporter(progress))
        return await self._shown_result(tenant, result)

    async def inpaint(self, token, edited, person, prompt, steps, seed, guidance=None, sampler=None, progress=None,
                      feather=4.0):
        import base64

        from deployments.schemas import InpaintRequest

        tenant = self.tenant(token)
        takes = taken(await self.service.defaults())
        guidance, sampler = (guidance if takes["guidance"] else None), (sampler if takes["sampler"] else None)
        if not person:
            raise BadInput("pick the person to paint in")
        image, mask = editor_image_and_mask(edited)
        body = InpaintRequest(identity={"id": person}, image=base64.b64encode(_png(image)).decode(),
                              mask=base64.b64encode(_png(mask)).decode(), prompt=prompt,
                              steps=_whole(steps, "steps"), seed=_seed(seed), guidance=guidance,
                              scheduler=sampler or None, feather=4.0 if feather is None else feather)
        result = await self.service.inpaint(tenant, body, self._reporter(progress))
        shown = await self._shown_result(tenant, result)
        return (image, *shown)

    @staticmethod
    def _reporter(progress):
        if progress is None:
            return lambda step, total: None
        return lambda step, total: progress((step, total), desc="denoising", unit="steps")

    async def _shown_result(self, tenant: str, result):
        import base64

        from ray_faceid.face.decode import decode_image

        names = {m["id"]: m["name"] for m in await self.service.people(tenant)}
        first = result.images[0]
        table = scores_table(result.images, names)
        if first.provenance.get("untrained_base"):  # as the CLI says it: noise is expected here
            table = "_An untrained smoke-test base made this image: it is noise-like._\n\n" + table
        sampler = (first.provenance.get("scheduler") or {}).get("class")
        if sampler:
            guidance = first.provenance.get("guidance")  # None: a model that takes none (FLUX.1 schnell)
            table += (f"\n\nSampler: {sampler}, {first.provenance['steps']} steps, "
                      + ("no guidance" if guidance is None else f"guidance {guidance:g}"))
        return decode_image(base64.b64decode(first.png_base64)), table, first.provenance

    async def catalog(self, token: str, which):
        shown = await self.service.render_output(self.tenant(token), which)
        image = np.asarray(Image.open(io.BytesIO(shown.sheet_png)).convert("RGB")) if shown.sheet_png else None
        return (image, [[k, v] for k, v in shown.figures.items()],
                [list(row) for row in shown.failed] or [["-", "no failed rows"]])


def editor_image_and_mask(edited) -> tuple[np.ndarray, np.ndarray]:
    """An ImageMask value -> (RGB photo, mask: white where the user painted)."""
    if not edited or edited.get("background") is None:
        raise BadInput("upload a photo, then paint over the region to repaint")
    background = np.asarray(edited["background"])
    image = background[..., :3].astype(np.uint8)
    painted = np.zeros(image.shape[:2], bool)
    for layer in edited.get("layers") or []:
        layer = np.asarray(layer)
        painted |= (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[-1] == 4 else (layer.max(axis=-1) > 0)
    if not painted.any():
        raise BadInput("paint over the region to repaint (the mask is empty)")
    return image, (painted * 255).astype(np.uint8)


# The Sign-in button first presents the token to the gate (page_gate.py), which answers with the
# session cookie that uploads and files need; then the page's own sign-in runs.
SIGN_IN_JS = """async (token) => {
  const here = window.location.pathname.endsWith("/") ? window.location.pathname : window.location.pathname + "/";
  await fetch(here + "session", {method: "POST", credentials: "same-origin",
                                  headers: {"Content-Type": "application/json"}, body: JSON.stringify({token})});
  return [token];
}"""


def build(service: FaceService, files=None):
    import gradio as gr

    actions = PageActions(service, files)
    act = {name: _action(getattr(actions, name)) for name in
           ("sign_in", "preview", "enroll", "ask_delete", "delete", "catalog")}

    async def generate(token, picked, prompt, negative, expression, edits, layout, width, height, steps, seed,
                       strength, guidance, sampler, identity_start, true_cfg, progress=gr.Progress()):
        return await _action(actions.generate)(token, picked, prompt, negative, expression, edits, layout, width,
                                               height, steps, seed, strength, guidance, sampler, progress,
                                               identity_start=identity_start, true_cfg=true_cfg)

    async def inpaint(token, edited, person, prompt, steps, seed, guidance, sampler, feather, progress=gr.Progress()):
        return await _action(actions.inpaint)(token, edited, person, prompt, steps, seed, guidance, sampler, progress,
                                              feather=feather)

    def sampler_list(elem_id: str):
        # The model's own (or the deployment's) unless picked; few-step models: lcm, tcd, guidance 0-1.
        return gr.Dropdown([("the model's own", ""), *((n, n) for n in service.sampler_names)], value="",
                           label="Sampler", elem_id=elem_id)

    with gr.Blocks(title="ray_faceid", delete_cache=(60, PAGE_FILES_TTL_S)) as page:
        gr.Markdown("## ray_faceid: people, identity-preserving generation, inpainting")
        with gr.Row(equal_height=True):
            token = gr.Textbox(label="API token", type="password", placeholder="the token `ray-faceid serve` printed",
                               scale=4, elem_id="token")
            sign_in = gr.Button("Sign in", variant="primary", scale=1, elem_id="sign-in")
        status = gr.Markdown(elem_id="status")
        # On a phone every tab stays one tap away: the tab bar wraps instead of folding tabs into a menu.
        with gr.Tabs(visible=False, elem_id="tabs", overflow_behavior="wrap") as tabs:
            with gr.Tab("People", elem_id="tab-people"):
                with gr.Row():
                    with gr.Column():
                        photos = gr.File(label="Photos of one person, alone in each", file_count="multiple",
                                         file_types=["image"], elem_id="photos")
                        name = gr.Textbox(label="Name", elem_id="name")
                        consent = gr.Textbox(label="Consent reference", placeholder="e.g. form-2026-0042",
                                             elem_id="consent")
                        reconsent = gr.Textbox(label="New consent (only for a person erased before)",
                                               placeholder="the consent they gave again", elem_id="reconsent")
                        enroll = gr.Button("Enroll", variant="primary", elem_id="enroll")
                    with gr.Column():
                        found = gr.Gallery(label="Faces found", columns=4, height=180, elem_id="found")
                        problems = gr.Markdown(elem_id="problems")
                        enrolled = gr.Markdown(elem_id="enrolled")
                gallery = gr.Gallery(label="Your people", columns=4, height="auto", elem_id="people")
                with gr.Row(equal_height=True):
                    to_delete = gr.Dropdown(label="Person", elem_id="delete-pick", scale=3)
                    ask = gr.Button("Delete…", variant="stop", scale=1, elem_id="delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm = gr.Button("Erase everywhere", variant="stop", elem_id="confirm-delete")
                    keep = gr.Button("Keep", elem_id="keep")
                erasure = gr.JSON(label="Erasure report", visible=False, elem_id="erasure")
            with gr.Tab("Generate", elem_id="tab-generate") as generate_tab:
                picked = gr.Dropdown(label="People (one to four, by name)", multiselect=True, max_choices=4,
                                     elem_id="picked")
                prompt = gr.Textbox(label="Prompt", value="a portrait photo", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    expression = gr.Textbox(label="Expression", placeholder="smile, turn left", elem_id="expression")
                    edits = gr.Textbox(label="Attribute edits", placeholder="smile=0.8, yaw=-20", elem_id="edits")
                    layout = gr.Radio(list(LAYOUTS), value=LAYOUTS[0], label="Where each person goes")
                with gr.Row():
                    width = gr.Number(label="Width", value=512, step=8, precision=0, elem_id="width")
                    height = gr.Number(label="Height", value=512, step=8, precision=0, elem_id="height")
                    steps = gr.Number(label="Steps", value=30, precision=0, minimum=1, elem_id="steps")
                    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="seed")
                    strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Identity strength")
                    identity_start = gr.Number(label="Identity from step (later: more of the prompt)", value=0,
                                               precision=0, minimum=0, elem_id="identity-start")
                    guidance = gr.Slider(0, 30, value=5.0, step=0.1, label="Guidance", elem_id="guidance")
                    sampler = sampler_list("sampler")
                    true_cfg = gr.Slider(1, 10, value=1.0, step=0.1, visible=False, elem_id="true-cfg",
                                         label="True CFG, away from the negative prompt (FLUX; over 1: twice the work)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", elem_id="cancel")
                result = gr.Image(label="Image", format="png", interactive=False, elem_id="result")
                scores = gr.Markdown(elem_id="scores")
                with gr.Accordion("Provenance", open=False):
                    provenance = gr.JSON(elem_id="provenance")
            with gr.Tab("Inpaint", elem_id="tab-inpaint") as inpaint_tab:
                edited = gr.ImageMask(label="Photo: paint over the region to repaint", type="numpy",
                                      elem_id="inpaint-photo")
                with gr.Row():
                    person = gr.Dropdown(label="Person", elem_id="inpaint-person")
                    inpaint_prompt = gr.Textbox(label="Prompt", value="a portrait photo")
                    inpaint_steps = gr.Number(label="Steps", value=30, precision=0, minimum=1)
                    inpaint_seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
                    inpaint_guidance = gr.Slider(0, 30, value=5.0, step=0.1, label="Guidance",
                                                 elem_id="inpaint-guidance")
                    inpaint_sampler = sampler_list("inpaint-sampler")
                    feather = gr.Number(label="Soft edge inside the mask (px; 0: hard)", value=4, minimum=0,
                                        maximum=64, elem_id="inpaint-feather")
                paint = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                with gr.Row():
                    before = gr.Image(label="Before", interactive=False)
                    after = gr.Image(label="After", format="png", interactive=False, elem_id="inpaint-result")
                inpaint_scores = gr.Markdown()
                with gr.Accordion("Provenance", open=False):
                    inpaint_provenance = gr.JSON()
            with gr.Tab("Catalog", elem_id="tab-catalog"):
                with gr.Row(equal_height=True):
                    output = gr.Dropdown(label="Render output", elem_id="output", scale=3)
                    show = gr.Button("Show", scale=1, elem_id="show-output")
                sheet = gr.Image(label="Contact sheet (references beside outputs)", interactive=False)
                figures = gr.Dataframe(headers=["figure", "value"], label="Evaluation", interactive=False)
                failed = gr.Dataframe(headers=["row", "error"], label="Failed rows", interactive=False)

        people_outputs = [gallery, to_delete, picked, person]
        signed_in = [status, tabs, *people_outputs, output, width, height, steps, guidance, inpaint_steps,
                     inpaint_guidance, negative, expression, edits, sampler, inpaint_sampler, generate_tab, inpaint_tab,
                     true_cfg, identity_start]
        sign_in.click(act["sign_in"], [token], signed_in, js=SIGN_IN_JS)
        token.submit(act["sign_in"], [token], signed_in, js=SIGN_IN_JS)
        photos.change(act["preview"], [token, photos, consent], [found, problems])
        consent.blur(act["preview"], [token, photos, consent], [found, problems])
        enroll.click(act["enroll"], [token, photos, name, consent, reconsent],
                     [enrolled, photos, name, consent, reconsent, found, problems, *people_outputs])
        ask.click(act["ask_delete"], [token, to_delete], [confirm_row, confirm_text])
        keep.click(lambda: gr.Row(visible=False), None, [confirm_row])
        confirm.click(act["delete"], [token, to_delete], [confirm_row, erasure, *people_outputs])
        running = go.click(generate, [token, picked, prompt, negative, expression, edits, layout, width, height, steps,
                                      seed, strength, guidance, sampler, identity_start, true_cfg],
                               [result, scores, provenance])
        cancel.click(None, None, None, cancels=[running])
        paint.click(inpaint, [token, edited, person, inpaint_prompt, inpaint_steps, inpaint_seed, inpaint_guidance,
                              inpaint_sampler, feather],
                    [before, after, inpaint_scores, inpaint_provenance])
        show.click(act["catalog"], [token, output], [sheet, figures, failed])
    # Concurrency is bounded by the Generator's queue (a full one answers "busy"), not by the page.
    page.queue(default_concurrency_limit=None)
    return page
