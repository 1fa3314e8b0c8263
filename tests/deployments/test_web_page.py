"""The web page at /ui in a real browser (headless Chromium driven by Playwright): sign in, enroll
two people, generate each and both, see the image and its scores, cancel a long request, delete a
person; at a desktop and a phone width. Screenshots of each page go to the test's temporary folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web page needs the `ui` extra (pip install 'ray-faceid[ui]')")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (`dev` extra)")

TOKENS = {"acme": "acme-page-token-0123456789", "other": "other-page-token-0123456789"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str:
    found = os.environ.get("RAY_FACEID_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if not found:
        pytest.skip("no Chromium found (apt-get install chromium, or set RAY_FACEID_CHROMIUM): the browser test skips")
    return found


@pytest.fixture(scope="module")
def page_app(ray_cluster, tmp_path_factory, loopback_port, default_encoder_flow):
    from ray import serve

    from deployments.local import start
    from ray_faceid.config import AutoscalingConfig, ServeConfig, ServeLimits

    one = AutoscalingConfig(min_replicas=1, max_replicas=1)
    config = ServeConfig(
        flow=default_encoder_flow, registry=str(tmp_path_factory.mktemp("registry")), api_tokens=TOKENS,
        generator_gpus=1.0, generator_autoscaling=one, encoder_autoscaling=one, ingress_autoscaling=one,
        guidance=4.5,  # the deployment's own: the page starts from it
        limits=ServeLimits(max_steps=1000, max_side=256, max_images=2, max_cost=64 * 64 * 1000),
    )
    url, _ = start(config, loopback_port())
    yield url, config
    serve.shutdown()


@pytest.fixture(scope="module")
def two_people(sample_photos, tmp_path_factory) -> dict[str, list[Path]]:
    """Two people's photos: from the shared set where present, else insightface's samples."""
    from tests.conftest import SHARED_FACES

    if (SHARED_FACES / "pairs.csv").is_file():
        folders = sorted(p for p in SHARED_FACES.iterdir() if p.is_dir() and p.name not in ("group", "nonface"))
        return {f.name: sorted(f.glob("*.jpg"))[:2] for f in folders[:2]}
    folder = tmp_path_factory.mktemp("people")
    t1 = np.asarray(Image.open(sample_photos["t1.jpg"]).convert("RGB"))
    Image.fromarray(t1[230:450, 20:230]).save(folder / "left.png")
    return {"hanks": [sample_photos["Tom_Hanks_54745.png"]], "left": [folder / "left.png"]}


def generator_info() -> dict:
    """From a thread of its own: Playwright's sync API keeps an event loop in this one."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    def ask() -> dict:
        return serve.get_deployment_handle("Generator", app_name="faceid").info.remote().result()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(ask).result()


def sign_in(page, url: str, token: str, ok: bool = True) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/ui/")
    page.locator("#token input, #token textarea").first.fill(token)
    page.locator("#sign-in").click()
    if ok:
        expect(page.locator("#status")).to_contain_text("Signed in")


def pick(page, dropdown: str, option: str) -> None:
    """Type to filter the dropdown, then take the one option left."""
    from playwright.sync_api import expect

    box = page.locator(f"{dropdown} input").first
    box.click()
    box.fill(option)
    expect(page.get_by_role("option", name=option)).to_have_count(1)
    if page.locator(f"{dropdown} .token").count() or dropdown == "#picked":  # a multiselect keeps its list open
        box.press("Enter")
        page.keyboard.press("Escape")
        box.blur()  # the next click opens the list again
        expect(page.locator(f"{dropdown} .token").last).to_contain_text(option)
    else:
        page.get_by_role("option", name=option).click()
        box.blur()
        expect(box).to_have_value(re.compile(re.escape(option) + r" \(id_"))


def generate(page, names: list[str], steps: int, sampler: str | None = None) -> None:
    page.locator("#tab-generate-button, button[role=tab]:has-text('Generate')").first.click()
    for name in names:
        pick(page, "#picked", name)
    if sampler:
        box = page.locator("#sampler input").first
        box.click()
        page.get_by_role("option", name=sampler, exact=True).click()
    for field, value in (("#width", 64), ("#height", 64), ("#steps", steps), ("#seed", 3)):
        page.locator(f"{field} input").first.fill(str(value))
    page.locator("#generate").click()


def test_the_page_enrolls_generates_cancels_and_erases(page_app, two_people, tmp_path):
    page_app = page_app[0]
    from playwright.sync_api import expect

    # Bounds, not waits: two test workers share 2 cores, where analysis and denoising take tens of seconds.
    expect.set_options(timeout=120_000)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_binary(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(120_000)
        try:
            walk_through(page, browser, page_app, two_people, shots)
        except Exception:
            page.screenshot(path=shots / "failed.png", full_page=True)
            print(f"the page when it failed: {shots / 'failed.png'}")
            raise
        browser.close()
    assert len(list(shots.glob("*.png"))) >= 7


def walk_through(page, browser, page_app, two_people, shots):
    from playwright.sync_api import expect



    # Signed out, or with a wrong token: nothing of any tenant.
    sign_in(page, page_app, "not-a-token-at-all-xxxxxxxx", ok=False)
    expect(page.get_by_text("401 unauthorized").first).to_be_visible()
    expect(page.locator("#tabs")).to_be_hidden()
    page.screenshot(path=shots / "signed-out.png")

    sign_in(page, page_app, TOKENS["acme"])
    expect(page.locator("#status")).to_contain_text("Signed in: tenant acme, 0 people")
    expect(page.locator("#status")).to_contain_text("Serving tiny (untrained) with identity adapter")  # what makes the images
    for name, photos in two_people.items():
        page.locator("#photos input[type=file]").set_input_files([str(p) for p in photos])
        # As in the API, no face is analysed before the person's consent is given.
        expect(page.locator("#problems")).to_contain_text("Enter the consent reference")
        expect(page.locator("#found img")).to_have_count(0)
        page.locator("#consent input, #consent textarea").first.fill("consent-form-7")
        page.locator("#consent input, #consent textarea").first.blur()
        expect(page.locator("#problems")).to_contain_text(f"{len(photos)} of {len(photos)} photos usable")
        expect(page.locator("#found img")).to_have_count(len(photos))
        page.locator("#name input, #name textarea").first.fill(name)
        page.locator("#enroll").click()
        expect(page.locator("#enrolled")).to_contain_text(f"Enrolled {name}")
    expect(page.locator("#people")).to_contain_text(list(two_people)[1])
    page.screenshot(path=shots / "people.png", full_page=True)

    names = list(two_people)
    for people in ([names[0]], [names[1]], names):
        generate(page, people, steps=2, sampler="euler-a" if len(people) == 2 else None)
        expect(page.locator("#result img")).to_be_visible()
        # the sampler picked (else the model's own, DDIM for the tiny base) is what made the image
        expect(page.locator("#scores")).to_contain_text("Sampler: EulerAncestralDiscreteScheduler" if len(people) == 2
                                                        else "Sampler: DDIMScheduler")
        expect(page.locator("#scores")).to_contain_text("2 steps, guidance 4.5")  # the deployment's, as signed in
        for name in people:
            expect(page.locator("#scores")).to_contain_text(name)
        expect(page.locator("#scores")).to_contain_text("same person")
        page.screenshot(path=shots / f"generate-{'-'.join(people)}.png", full_page=True)
        sign_in(page, page_app, TOKENS["acme"])  # a fresh page: nobody picked

    # A long request shows its progress and stops at the next step when cancelled.
    before = generator_info()["cancelled"]
    generate(page, [names[0]], steps=900)
    expect(page.get_by_text("denoising").first).to_be_visible()
    page.screenshot(path=shots / "generating.png")
    page.locator("#cancel").click()
    deadline = time.time() + 60
    while generator_info()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.5)
    assert generator_info()["cancelled"] == before + 1, "the cancelled request kept denoising"

    # Delete one person: a confirmation, the erasure report, and they are gone from the page.
    page.locator("button[role=tab]:has-text('People')").first.click()
    pick(page, "#delete-pick", names[1])
    page.locator("#delete").click()
    expect(page.get_by_text("This cannot be undone")).to_be_visible()
    page.locator("#confirm-delete").click()
    expect(page.locator("#erasure")).to_contain_text("removed")
    expect(page.locator("#people")).not_to_contain_text(names[1])
    expect(page.locator("#people")).to_contain_text(names[0])
    page.screenshot(path=shots / "deleted.png", full_page=True)

    # Another tenant sees none of it; an oversize request is a readable message, not a trace.
    sign_in(page, page_app, TOKENS["other"])
    expect(page.locator("#status")).to_contain_text("tenant other, 0 people")
    sign_in(page, page_app, TOKENS["acme"])
    generate(page, [names[0]], steps=4000)
    expect(page.get_by_text("steps 4000 is over the limit").first).to_be_visible()
    expect(page.get_by_text("Traceback")).to_have_count(0)
    # A wrong token typed on a signed-in page empties it: nothing of the tenant before stays on screen.
    page.locator("#token input, #token textarea").first.fill("someone-elses-guess-xxxxxxxx")
    page.locator("#sign-in").click()
    expect(page.locator("#status")).to_contain_text("401 unauthorized")
    expect(page.locator("#tabs")).to_be_hidden()
    expect(page.get_by_text(names[0])).to_have_count(0)
    assert names[0] not in page.content()

    # A phone's width: the same page, nothing wider than the screen.
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    sign_in(phone, page_app, TOKENS["acme"])
    expect(phone.locator("#status")).to_contain_text("Signed in: tenant acme, 1 people")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    expect(phone.locator("#found")).to_be_hidden()  # no empty gallery on the first screen
    phone.screenshot(path=shots / "phone.png", full_page=True)
    # Every tab one tap away (none folded into a "..." menu), each opening its own controls.
    for tab, control in (("Catalog", "#show-output"), ("Inpaint", "#inpaint"), ("Generate", "#generate"),
                         ("People", "#enroll")):
        button = phone.locator("button[role=tab]", has_text=tab).first
        expect(button).to_be_visible()
        box = button.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (tab, box)
        button.click()
        expect(phone.locator(control)).to_be_visible()


def test_inpaint_and_a_render_output_through_the_page(page_app, sample_photos, tmp_path):
    """The page's inpaint and catalog actions, called as the browser calls them (Gradio's client)."""
    import httpx
    import pyarrow as pa
    from gradio_client import Client, handle_file

    from ray_faceid.data import tables
    from ray_faceid.data.render import MANIFEST, MANIFEST_SCHEMA, SUMMARY
    from ray_faceid.registry import Registry

    url, config = page_app
    token = TOKENS["other"]
    enrolled = httpx.post(f"{url}/v1/identities", headers={"Authorization": f"Bearer {token}"},
                          files=[("photos", ("hanks.png", sample_photos["Tom_Hanks_54745.png"].read_bytes()))],
                          data={"consent": "form-1", "name": "tom"}, timeout=120)
    assert enrolled.status_code == 201, enrolled.text
    photo = np.asarray(Image.open(sample_photos["Tom_Hanks_54745.png"]).convert("RGB"))
    layer = np.zeros((*photo.shape[:2], 4), np.uint8)
    h, w = photo.shape[:2]
    layer[h // 4: h // 2, w // 4: 3 * w // 4] = 255  # the painted stroke
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(layer).save(tmp_path / "layer.png")
    client = Client(f"{url}/ui/", verbose=False, headers={"Authorization": f"Bearer {token}"})  # uploads need it
    client.predict(token, api_name="/sign_in")  # as in a browser: the page's lists are the tenant's
    edited = {"background": handle_file(str(tmp_path / "photo.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": None}
    before, after, scores, provenance = client.predict(token, edited, enrolled.json()["id"], "a portrait photo", 2, 5,
                                                       3.0, "euler", api_name="/inpaint")
    result = np.asarray(Image.open(after).convert("RGB")).astype(int)
    assert result.shape == photo.shape
    outside = np.ones(photo.shape[:2], bool)
    outside[h // 4 - 16: h // 2 + 16, w // 4 - 16: 3 * w // 4 + 16] = False  # beyond the feathered edge
    assert np.abs(result[outside] - photo[outside]).max() <= 2, "pixels outside the painted mask changed"
    assert "| tom |" in scores and enrolled.json()["id"] in json.dumps(provenance)
    # the inpaint tab's sampler and guidance, as picked, made it (the tiny base's own is DDIM)
    assert provenance["scheduler"]["class"] == "EulerDiscreteScheduler" and provenance["guidance"] == 3.0

    # A render output of this tenant: its figures and its failed rows, with their errors.
    out = tmp_path / "rendered"
    out.mkdir()
    rows = [dict.fromkeys(MANIFEST_SCHEMA.names), dict.fromkeys(MANIFEST_SCHEMA.names)]
    rows[0].update(id="row-ok", status="ok")
    rows[1].update(id="row-bad", status="error", error=f"not_found: no file at {tmp_path}/photos/zed.png")
    tables.write_table(str(out / MANIFEST), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    (out / SUMMARY).write_text('{"rows": 2, "failed": 1, "similarity_mean": 0.61}')
    Registry(config.registry).record_output("other", str(out))
    client.predict(token, api_name="/sign_in")
    sheet, figures, failed = client.predict(token, 0, api_name="/catalog")
    assert sheet is None  # no `eval` run on it yet
    assert ["failed", "1"] in figures["data"] and ["similarity_mean", "0.61"] in figures["data"]
    assert failed["data"] == [["row-bad", "not_found: no file at <storage>"]]  # no server path on the page
    # Another tenant's token reaches none of it.
    try:
        client.predict(TOKENS["acme"], 0, api_name="/catalog")
        raise AssertionError("acme saw other's render output")
    except Exception as exc:  # noqa: BLE001 - gradio_client raises AppError with the page's message
        assert "pick one of your render outputs" in str(exc), exc


def test_inpaint_takes_the_painted_mask():
    """The inpaint control's value (photo + painted layer) becomes the API's image and mask."""
    from deployments.web_page import editor_image_and_mask
    from ray_faceid.errors import BadInput

    photo = np.full((64, 48, 4), 200, np.uint8)
    layer = np.zeros((64, 48, 4), np.uint8)
    layer[10:20, 5:15, 3] = 255
    image, mask = editor_image_and_mask({"background": photo, "layers": [layer], "composite": photo})
    assert image.shape == (64, 48, 3) and mask.dtype == np.uint8
    assert mask[10:20, 5:15].min() == 255 and mask.sum() == 255 * 100
    with pytest.raises(BadInput, match="mask is empty"):
        editor_image_and_mask({"background": photo, "layers": [np.zeros_like(layer)]})
    with pytest.raises(BadInput, match="upload a photo"):
        editor_image_and_mask(None)


def test_the_ingress_runs_one_replica_while_it_serves_the_page():
    """Gradio keeps a browser's uploads and queue in one replica; Serve's proxy has no affinity."""
    from deployments.app import ingress_scaling
    from ray_faceid.config import AutoscalingConfig, ServeConfig

    config = ServeConfig(api_tokens=TOKENS, ingress_autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4))
    assert (ingress_scaling(config).min_replicas, ingress_scaling(config).max_replicas) == (1, 1)
    assert ingress_scaling(config.model_copy(update={"web_page": False})).max_replicas == 4


# -- the page's trust boundary, probed over plain HTTP as an attacker holding another tenant's token --
def _call(url: str, api: str, data: list, token: str | None = None):
    """One call of a page action through Gradio's REST route; returns (status, the event stream's text)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    joined = httpx.post(f"{url}/ui/gradio_api/call/{api}", json={"data": data}, headers=headers, timeout=60)
    if joined.status_code != 200:
        return joined.status_code, joined.text
    events = httpx.get(f"{url}/ui/gradio_api/call/{api}/{joined.json()['event_id']}", headers=headers, timeout=120)
    return joined.status_code, events.text


def _enrolled(url: str, token: str, photo: Path, name: str) -> str:
    import httpx

    answer = httpx.post(f"{url}/v1/identities", headers={"Authorization": f"Bearer {token}"},
                        files=[("photos", (photo.name, photo.read_bytes()))],
                        data={"consent": f"form-{name}", "name": name}, timeout=120)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def _page_folder_files() -> set[Path]:
    import tempfile

    return {p for p in Path(tempfile.gettempdir()).glob("ray_faceid_page_*/**/*") if p.is_file()}


def test_page_actions_never_open_a_server_file_named_by_the_caller(page_app, sample_photos, tmp_path):
    """Tenant B, signed in with B's token, names A's reference crop, a server JPEG and /etc/passwd as
    file values: each is refused before the page opens or copies it; without a token too."""
    from ray_faceid.registry import Registry

    url, config = page_app
    victim = _enrolled(url, TOKENS["acme"], sample_photos["Tom_Hanks_54745.png"], "victim-a")
    crop = Path(config.registry) / "acme" / victim / "references" / "0.png"
    assert crop.is_file()
    server_jpeg = sample_photos["t1.jpg"]

    def value(path) -> dict:
        return {"path": str(path), "meta": {"_type": "gradio.FileData"}, "orig_name": "x.png"}

    before = _page_folder_files()
    b = TOKENS["other"]
    attempts = {
        "preview": [b, [value(crop)], "consent-1"],
        "enroll": [b, [value(crop)], "stolen", "consent-1", ""],
        "inpaint": [b, {"background": value(server_jpeg), "layers": [value(crop)], "composite": None},
                    victim, "a photo", 2, 1],
    }
    for api, data in attempts.items():
        status, text = _call(url, api, data, token=b)
        assert status == 403 and "not uploaded with your token" in text, (api, status, text[:300])
    for token in (None, "not-a-token-at-all-xxxxxxxx"):  # no valid token: refused before anything is read
        status, _ = _call(url, "preview", [token or "", [value("/etc/passwd")], "c"], token=token)
        assert status == 403
    assert not Registry(config.registry).named("other", "stolen")
    copied = _page_folder_files() - before
    assert not copied, f"the page copied server files: {sorted(p.name for p in copied)}"


def test_page_files_are_served_only_to_the_token_that_uploaded_or_received_them(page_app, sample_photos):
    """Uploads need a token; an uploaded photo or a page answer's file is served to that tenant
    only (never anonymously, never to another tenant), with no server path in any answer; erasing
    one of the tenant's people deletes the tenant's page files at once."""
    import httpx
    from gradio_client import Client, handle_file

    url, _ = page_app
    photo = sample_photos["Tom_Hanks_54745.png"]
    anonymous = httpx.post(f"{url}/ui/gradio_api/upload", files=[("files", (photo.name, photo.read_bytes()))])
    assert anonymous.status_code == 401

    owner = {"Authorization": f"Bearer {TOKENS['other']}"}
    uploaded = httpx.post(f"{url}/ui/gradio_api/upload", files=[("files", (photo.name, photo.read_bytes()))],
                          headers=owner)
    assert uploaded.status_code == 200, uploaded.text
    [name] = uploaded.json()
    assert name.startswith("page-files/") and "/tmp" not in uploaded.text and "ray_faceid_page_" not in uploaded.text
    file_url = f"{url}/ui/gradio_api/file={name}"
    assert httpx.get(file_url, headers=owner).content == photo.read_bytes()
    assert httpx.get(file_url).status_code == 404
    assert httpx.get(file_url, headers={"Authorization": f"Bearer {TOKENS['acme']}"}).status_code == 404
    with httpx.Client(base_url=url, headers=owner) as raw:  # paths sent as written (httpx would normalise `..`)
        for path in (f"/ui/gradio_api/file={name}/../../../../../../etc/passwd",
                     "/ui/gradio_api/file=page-files/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                     f"/ui/gradio_api/file={name.rsplit('/', 2)[0]}/%2E%2E/%2E%2E/%2E%2E/etc/passwd"):
            request = raw.build_request("GET", "/")
            request.url = request.url.copy_with(raw_path=path.encode())
            answer = raw.send(request)
            assert answer.status_code == 404 and b"root:" not in answer.content, path

    # A file value that the gate and Gradio would read differently (decoding, `..` as text): refused.
    from urllib.parse import quote

    before = _page_folder_files()
    tricks = [f"page-files/{quote('y/') * 20}/{'../' * 20}etc/passwd/{quote('../../' + name.split('/', 1)[1] + '/x')}/..",
              f"{name}/../../../../../../../../etc/passwd", f"http://127.0.0.1:1/x/gradio_api/file={name}"]
    for trick in tricks:
        status, text = _call(url, "preview", [TOKENS["other"], [{"path": trick, "meta": {"_type": "gradio.FileData"}}],
                                              "c-1"], token=TOKENS["other"])
        assert status == 403, (trick, status, text[:300])
    assert not {p for p in _page_folder_files() - before if p.name == "passwd"}

    # A page answer's files (the faces found), as Gradio's own client receives them.
    client = Client(f"{url}/ui/", verbose=False, headers=owner)
    found, note = client.predict(TOKENS["other"], [handle_file(str(photo))], "consent-2", api_name="/preview")
    assert "1 of 1 photos usable" in note and len(found) == 1  # its client fetched the face with the token
    raw = httpx.post(f"{url}/ui/gradio_api/call/preview", headers=owner,
                     json={"data": [TOKENS["other"], [{"path": name, "meta": {"_type": "gradio.FileData"}}], "c-3"]})
    events = httpx.get(f"{url}/ui/gradio_api/call/preview/{raw.json()['event_id']}", headers=owner, timeout=120).text
    assert "ray_faceid_page_" not in events and "page-files/" in events
    face_url = f"{url}/ui/gradio_api/file=" + re.search(r'"path": ?"(page-files/[^"]+)"', events).group(1)
    assert httpx.get(face_url, headers=owner).status_code == 200
    assert httpx.get(face_url, headers={"Authorization": f"Bearer {TOKENS['acme']}"}).status_code == 404

    # Erasing one of the tenant's people: every page file of the tenant is deleted from the replica's disk.
    on_disk = {p for p in _page_folder_files() if p.name == photo.name}
    assert on_disk
    person = _enrolled(url, TOKENS["other"], photo, "erased-soon")
    assert httpx.delete(f"{url}/v1/identities/{person}", headers=owner, timeout=120).status_code == 200
    assert httpx.get(file_url, headers=owner).status_code == 404
    assert httpx.get(face_url, headers=owner).status_code == 404
    assert not any(p.exists() for p in on_disk)


def test_an_erased_person_or_a_withdrawn_consent_is_refused_on_the_api_and_the_page(page_app, sample_photos, tmp_path):
    """Erased through the API, a person is refused under a new name on the API and on the page (which
    always sends a name), and the consent they withdrew is refused for anyone, until re-consent."""
    import httpx
    from gradio_client import Client, handle_file

    url, _ = page_app
    token = TOKENS["acme"]
    auth = {"Authorization": f"Bearer {token}"}
    photo = sample_photos["Tom_Hanks_54745.png"]

    def api_enroll(name: str, consent: str, reconsent: str = "", image: Path = photo):
        return httpx.post(f"{url}/v1/identities", headers=auth, files=[("photos", (image.name, image.read_bytes()))],
                          data={"consent": consent, "name": name, "reconsent": reconsent}, timeout=120)

    first = api_enroll("hanks-api", "withdrawn-form-9")
    assert first.status_code == 201, first.text
    assert httpx.delete(f"{url}/v1/identities/{first.json()['id']}", headers=auth, timeout=120).status_code == 200
    again = api_enroll("someone-new", "fresh-form-1")
    assert again.status_code == 409 and again.json()["error"] == "erased_person", again.text
    client = Client(f"{url}/ui/", verbose=False, headers=auth)
    with pytest.raises(Exception, match="erased_person"):
        client.predict(token, [handle_file(str(photo))], "page-name", "fresh-form-2", "", api_name="/enroll")
    t1 = np.asarray(Image.open(sample_photos["t1.jpg"]).convert("RGB"))
    Image.fromarray(t1[230:450, 20:230]).save(tmp_path / "other.png")
    withdrawn = api_enroll("other-person", "withdrawn-form-9", image=tmp_path / "other.png")
    assert withdrawn.status_code == 409 and withdrawn.json()["error"] == "consent_withdrawn", withdrawn.text
    back = api_enroll("hanks-back", "fresh-form-3", reconsent="fresh-form-4")
    assert back.status_code == 201, back.text


def test_the_page_and_the_api_refuse_with_the_same_message(page_app, sample_photos, tmp_path):
    """One service behind both faces: a taken name and a bad token are refused in the same words."""
    import httpx
    from gradio_client import Client, handle_file

    url, _ = page_app
    token = TOKENS["other"]
    photo = tmp_path / "right.png"  # a person of t1.jpg no other test enrolls (or erases)
    Image.fromarray(np.asarray(Image.open(sample_photos["t1.jpg"]).convert("RGB"))[230:450, 1060:1280]).save(photo)
    _enrolled(url, token, photo, "same-words")
    taken = httpx.post(f"{url}/v1/identities", headers={"Authorization": f"Bearer {token}"},
                       files=[("photos", (photo.name, photo.read_bytes()))],
                       data={"consent": "form-x", "name": "same-words"}, timeout=120)
    assert taken.status_code == 409, taken.text
    client = Client(f"{url}/ui/", verbose=False, headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(Exception) as on_page:
        client.predict(token, [handle_file(str(photo))], "same-words", "form-x", "", api_name="/enroll")
    assert f"409 name_taken: {taken.json()['message']}" in str(on_page.value)

    refused = httpx.get(f"{url}/v1/identities", headers={"Authorization": "Bearer not-a-valid-token-at-all"})
    assert refused.status_code == 401
    status = client.predict("not-a-valid-token-at-all", api_name="/sign_in")[0]
    assert refused.json()["message"] in status and "401 unauthorized" in status
