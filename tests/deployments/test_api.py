"""The HTTP API end to end: enroll / get / list / generate / multi-ID / inpaint / delete, auth and
tenant isolation, bad input, batching and multiplexing (tiny components, fake GPU, loopback)."""
import base64
import io
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

TOKENS = {"acme": "acme-token-0123456789abcdef", "other": "other-token-0123456789abcdef"}


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory, loopback_port, default_encoder_flow):
    from ray import serve

    from deployments.local import start
    from ray_faceid.config import AutoscalingConfig, ServeConfig, ServeLimits

    one = AutoscalingConfig(min_replicas=1, max_replicas=1)
    config = ServeConfig(
        flow=default_encoder_flow,
        registry=str(tmp_path_factory.mktemp("registry")), api_tokens=TOKENS, generator_gpus=1.0,
        generator_batch_size=4, batch_wait_timeout_s=0.3, identities_per_replica=2,
        generator_autoscaling=one, encoder_autoscaling=one, ingress_autoscaling=one,
        limits=ServeLimits(max_steps=20, max_side=256, max_images=2, max_reseeds=1, max_body_bytes=4 * 2**20,
                           max_upload_bytes=2 * 2**20, max_cost=96 * 96 * 20, generator_max_queued=8, retry_after_s=7,
                           small_request_cost=64 * 64 * 10, max_decode_side=1024),  # 1024: faster detection
    )
    url, _ = start(config, loopback_port())
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, config
    serve.shutdown()


def bearer(tenant: str = "acme") -> dict:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


GEN = {"prompt": "a portrait photo", "steps": 2, "width": 64, "height": 64, "seed": 1}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(sample_photos):
    t1 = np.asarray(Image.open(sample_photos["t1.jpg"]).convert("RGB"))
    return {
        "hanks": sample_photos["Tom_Hanks_54745.png"].read_bytes(),
        "group": sample_photos["t1.jpg"].read_bytes(),
        # two of the six people in t1.jpg, cropped alone (boxes from the face stack, with margin)
        "left": png(t1[230:450, 20:230]),
        "middle": png(t1[250:460, 400:610]),
        "blank": png(np.full((200, 200, 3), 255, np.uint8)),
    }


def enroll(client, *names_and_bytes, tenant="acme", consent=None, name=None, **form):
    """Enroll; `name` defaults to a fresh one (names are unique per tenant), the consent reference
    too, and a fresh re-consent comes along: these tests enroll the same few faces again after
    erasing them (an erasure withdraws a consent and refuses the face until a re-consent)."""
    import uuid

    files = [("photos", (n, data, "image/png")) for n, data in names_and_bytes]
    fresh = uuid.uuid4().hex[:8]
    data = {"consent": consent or f"consent-form-{fresh}", "name": name or f"someone-{fresh}",
            "reconsent": f"reconsent-{fresh}", **form}
    return client.post("/v1/identities", files=files, data=data, headers=bearer(tenant))


@pytest.fixture(scope="module")
def people(api, photos):
    client, _ = api
    ids = {}
    for name in ("hanks", "left", "middle"):
        r = enroll(client, (f"{name}.png", photos[name]), name=name)
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    return ids


def metric(client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_auth_is_required(api):
    client, _ = api
    assert client.get("/v1/identities").status_code == 401
    r = client.get("/v1/identities", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})
    assert r.status_code == 401 and "bearer token" in r.json()["message"]


def test_enroll_reports_each_photo(api, photos):
    client, _ = api
    r = enroll(client, ("hanks.png", photos["hanks"]), ("group.jpg", photos["group"]), ("blank.png", photos["blank"]))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("id_") and len(body["id"]) > 20 and body["faces_used"] == 1
    reasons = {p["filename"]: p["reason"] for p in body["photos"]}
    assert reasons["hanks.png"] is None
    assert reasons["group.jpg"].startswith("6 faces")
    assert reasons["blank.png"] == "no face found"
    r = enroll(client, ("blank.png", photos["blank"]))
    assert r.status_code == 422 and "no usable photo" in r.json()["message"]
    r = client.post("/v1/identities", files=[("photos", ("a.png", photos["hanks"], "image/png"))],
                    data={"consent": "  "}, headers=bearer())
    assert r.status_code == 422 and "consent is required" in r.json()["message"]
    r = enroll(client, ("broken.jpg", b"\xff\xd8 not really"))
    assert r.status_code == 422 and "broken.jpg" in r.json()["message"]


def test_identities_are_private_to_their_tenant(api, people):
    client, _ = api
    ident = people["hanks"]
    assert client.get(f"/v1/identities/{ident}", headers=bearer()).json()["name"] == "hanks"
    assert "embedding" not in client.get(f"/v1/identities/{ident}", headers=bearer()).text
    assert client.get(f"/v1/identities/{ident}", headers=bearer("other")).status_code == 404
    assert client.get("/v1/identities", headers=bearer("other")).json()["identities"] == []
    assert ident in [i["id"] for i in client.get("/v1/identities", headers=bearer()).json()["identities"]]
    r = client.post("/v1/generate", json={**GEN, "identities": [{"id": ident}]}, headers=bearer("other"))
    assert r.status_code == 404


def test_generate_returns_a_scored_image_with_provenance(api, people):
    client, _ = api
    r = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"], "expression": "smile"}]},
                    headers=bearer())
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).size == (64, 64)
    score = image["scores"][0]
    assert score["id"] == people["hanks"]
    # A score describes a face exactly when one was found (an untrained smoke model may draw none).
    assert (score["similarity"] is not None) == score["face_found"] == (score["same_person"] is not None)
    assert image["provenance"]["ai_generated"] is True and image["provenance"]["seed"] == 1
    again = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"], "expression": "smile"}]},
                        headers=bearer()).json()
    assert again["images"][0]["png_base64"] == image["png_base64"]  # deterministic


def test_people_are_found_by_name_and_names_are_unique(api, people, photos):
    client, _ = api
    again = enroll(client, ("hanks.png", photos["hanks"]), name="hanks")
    assert again.status_code == 409 and again.json()["error"] == "name_taken" and "name_exists=rename" in again.text
    renamed = enroll(client, ("hanks.png", photos["hanks"]), name="hanks", name_exists="rename")
    assert renamed.status_code == 201 and renamed.json()["name"] == "hanks-2"
    assert client.get("/v1/identities/hanks", headers=bearer()).json()["id"] == people["hanks"]
    by_name = client.post("/v1/generate", json={**GEN, "identities": [{"name": "hanks"}]}, headers=bearer())
    assert by_name.status_code == 200, by_name.text
    by_id = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"]}]}, headers=bearer())
    assert by_name.json()["images"][0]["png_base64"] == by_id.json()["images"][0]["png_base64"]
    unknown = client.post("/v1/generate", json={**GEN, "identities": [{"name": "hankss"}]}, headers=bearer())
    assert unknown.status_code == 404 and "did you mean hanks" in unknown.text
    other = client.post("/v1/generate", json={**GEN, "identities": [{"name": "hanks"}]}, headers=bearer("other"))
    assert other.status_code == 404  # names are per tenant too
    both = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"], "name": "hanks"}]},
                       headers=bearer())
    assert both.status_code == 422 and "one of them" in both.text
    assert client.delete(f"/v1/identities/{renamed.json()['id']}", headers=bearer()).status_code == 200


def test_names_are_bounded_and_the_identity_list_is_paginated(api, people, photos):
    client, _ = api
    for bad, message in (("ann\nbob", "control characters"), ("x" * 101, "at most 100 characters")):
        r = enroll(client, ("hanks.png", photos["hanks"]), name=bad)
        assert r.status_code == 422 and message in r.text
    seen, after = [], None
    while True:
        page = client.get("/v1/identities", params={"limit": 2, **({"after": after} if after else {})},
                          headers=bearer()).json()
        assert len(page["identities"]) <= 2
        seen += [i["id"] for i in page["identities"]]
        after = page["next"]
        if after is None:
            break
    everyone = [i["id"] for i in client.get("/v1/identities", headers=bearer()).json()["identities"]]
    assert seen == everyone and len(everyone) >= 3 and set(people.values()) <= set(everyone)


def test_steps_and_size_default_to_the_models_own(api, people):
    client, _ = api
    r = client.post("/v1/generate", json={"prompt": "a portrait", "identities": [{"id": people["hanks"]}]},
                    headers=bearer())
    assert r.status_code == 200, r.text
    record = r.json()["images"][0]["provenance"]
    assert record["size"] == [32, 32] and record["steps"] == 4  # the tiny base's; 512 and 30 for SD 1.x


def test_attribute_edits_change_the_image_and_are_recorded(api, people):
    client, _ = api
    plain = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"]}]}, headers=bearer())
    edited = client.post("/v1/generate", json={**GEN, "identities": [{"id": people["hanks"],
                                                                     "edits": {"smile": 0.9, "yaw": -20}}]},
                         headers=bearer())
    assert plain.status_code == edited.status_code == 200, edited.text
    record = edited.json()["images"][0]["provenance"]
    assert record["flow"].startswith("sha256:") and record["identities"][0]["edits"] == {"smile": 0.9, "yaw": -20.0}
    assert record["identities"][0]["edit_moved"] > 0
    assert edited.json()["images"][0]["png_base64"] != plain.json()["images"][0]["png_base64"]


def test_multi_identity_generate_and_reseeding(api, people):
    client, _ = api
    body = {**GEN, "width": 128, "identities": [{"id": people["left"], "region": [0, 0, 0.5, 1]},
                                                {"id": people["middle"], "region": [0.5, 0, 1, 1]}],
            "min_identity_score": 0.99}
    r = client.post("/v1/generate", json=body, headers=bearer())
    assert r.status_code == 200, r.text
    out = r.json()
    assert [s["id"] for s in out["images"][0]["scores"]] == [people["left"], people["middle"]]
    assert out["attempts"] == 2  # an untrained model never reaches 0.99: bounded by max_reseeds=1


@pytest.mark.parametrize("change, message", [
    ({"steps": 500}, "over the limit of 20"),
    ({"width": 100}, "multiples of 8"),
    ({"num_images": 9}, "num_images 9 is over the limit"),
    ({"identities": []}, "at least 1"),
    ({"identities": [{"id": "ID", "region": [0.8, 0, 0.2, 1]}]}, "0 <= x0 < x1 <= 1"),
    ({"identities": [{"id": "id_doesnotexist0123456789"}]}, "not found"),
    ({"identities": [{"id": "ID", "edits": {"beard": 1}}]}, "valid: smile 0..1, mouth_open 0..1"),
    ({"identities": [{"id": "ID", "edits": {"yaw": -120}}]}, "yaw=-120.0 is out of range; valid:"),
    ({"identities": [{"id": "ID", "expression": {"yaw": 400}}]}, "yaw=400.0: must be a number in -90..90"),
    ({"identities": [{"id": "ID", "expression": "smile=nan"}]}, "not a finite number"),
    ({"identities": [{"id": "ID", "expression": "smile, " * 40}]}, "at most 200 characters"),
    ({"scheduler": "nope"}, "no scheduler 'nope'; use one of ddim, pndm, euler"),
    ({"scheduler": "euler", "scheduler_config": {"colour": "red"}}, "EulerDiscreteScheduler has no setting colour"),
    # From the security probe: each was a 500, or memory as large as the value asked (the model's own tables).
    ({"scheduler": "ddim", "scheduler_config": {"num_train_timesteps": 30000000}}, "num_train_timesteps is the model's own"),
    ({"scheduler": "ddim", "scheduler_config": {"num_train_timesteps": -5}}, "num_train_timesteps is the model's own"),
    ({"scheduler": "ddim", "scheduler_config": {"steps_offset": 100000}}, "steps_offset=100000 is not a setting"),
    ({"scheduler_config": {"steps_offset": 5}}, "steps_offset is 0 or 1"),  # the base's own scheduler too
    ({"negative_prompt": "blurry", "true_cfg": 2}, "true_cfg: for FLUX bases"),
    ({"true_cfg": 0.5}, "greater than or equal to 1"),
])
def test_bad_generate_requests_get_4xx_with_a_message(api, people, change, message):
    client, _ = api
    body = {**GEN, "identities": [{"id": people["hanks"]}], **change}
    body["identities"] = [dict(i, id=people["hanks"]) if i.get("id") == "ID" else i for i in body["identities"]]
    r = client.post("/v1/generate", json=body, headers=bearer())
    assert 400 <= r.status_code < 500
    assert message in r.text


@pytest.mark.parametrize("field, literal", [("guidance", "NaN"), ("guidance", "Infinity"), ("guidance", "1e309"),
                                            ("scale", "NaN")])
def test_non_finite_numbers_are_a_422_with_the_usual_error_body(api, people, field, literal):
    """Python's JSON reader takes NaN, Infinity and 1e309 (inf); they used to reach a 500 (the 422 body
    echoed a value JSON cannot hold)."""
    client, _ = api
    identity = {"id": people["hanks"], "scale": "__SCALE__"} if field == "scale" else {"id": people["hanks"]}
    body = {**GEN, "identities": [identity], **({"guidance": "__GUIDANCE__"} if field == "guidance" else {})}
    raw = json.dumps(body).replace('"__SCALE__"', literal).replace('"__GUIDANCE__"', literal)
    r = client.post("/v1/generate", content=raw, headers={**bearer(), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["error"] == "invalid_request" and field in error["message"] and "finite" in error["message"]


def test_inpaint_keeps_pixels_outside_the_mask(api, people, photos):
    client, _ = api
    image = np.asarray(Image.open(io.BytesIO(photos["hanks"])).convert("RGB"))
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[30:90, 20:90] = 255
    body = {"identity": {"id": people["hanks"]}, "image": base64.b64encode(png(image)).decode(),
            "mask": base64.b64encode(png(mask)).decode(), "prompt": "a face", "steps": 2, "seed": 3}
    r = client.post("/v1/inpaint", json=body, headers=bearer())
    assert r.status_code == 200, r.text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png_base64"]))).convert("RGB"))
    assert np.array_equal(out[mask == 0], image[mask == 0])
    bad = client.post("/v1/inpaint", json={**body, "mask": "%%%"}, headers=bearer())
    assert bad.status_code == 422 and "base64" in bad.json()["message"]


def test_requests_are_batched(api, people):
    client, _ = api
    before = metric(client, "faceid_batch_size_count", 'deployment="generator"')
    before_single = metric(client, "faceid_batch_size_bucket", 'deployment="generator",le="1.0"')
    body = {**GEN, "identities": [{"id": people["hanks"]}]}
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda s: client.post("/v1/generate", json={**body, "seed": s}, headers=bearer()).status_code,
                              range(6)))
    assert codes == [200] * 6
    batches = metric(client, "faceid_batch_size_count", 'deployment="generator"') - before
    singles = metric(client, "faceid_batch_size_bucket", 'deployment="generator",le="1.0"') - before_single
    assert batches == 6 and singles < 6  # at least one request ran in a batch of several


def test_a_request_samples_with_its_own_scheduler_whatever_it_runs_beside(api, people):
    """A scheduler per request: requests of other schedulers sent at the same time are denoised apart
    (one UNet batch would step them all with one sampler), each image the same as when sent alone."""
    client, _ = api
    body = {**GEN, "identities": [{"id": people["hanks"]}], "steps": 3}

    def image(extra: dict) -> dict:
        r = client.post("/v1/generate", json={**body, **extra}, headers=bearer())
        assert r.status_code == 200, r.text
        return r.json()["images"][0]

    alone = image({"scheduler": "euler-a"})
    assert alone["provenance"]["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(image, [{"scheduler": "euler-a"}, {}, {"scheduler": "dpm++2m-karras"}, {}]))
    assert together[0]["png_base64"] == alone["png_base64"]
    assert together[1]["provenance"]["scheduler"]["name"] == "the base's own"
    assert together[2]["provenance"]["scheduler"] == {"class": "DPMSolverMultistepScheduler", "name": "dpm++2m-karras",
                                                      "config": {"use_karras_sigmas": True}}
    assert together[1]["png_base64"] == together[3]["png_base64"] != alone["png_base64"]


def test_identity_cache_evicts_beyond_its_size(api, people):
    client, _ = api

    def misses():
        return metric(client, "faceid_identity_cache_total", 'result="miss"')

    def gen(name):
        r = client.post("/v1/generate", json={**GEN, "identities": [{"id": people[name]}]}, headers=bearer())
        assert r.status_code == 200

    gen("hanks")
    start = misses()
    gen("hanks")
    assert misses() == start  # cached
    gen("left")
    gen("middle")  # the replica holds 2: hanks is evicted
    gen("hanks")
    assert misses() - start >= 3


def test_delete_erases_the_identity(api, photos):
    client, config = api
    ident = enroll(client, ("hanks.png", photos["hanks"])).json()["id"]
    assert client.post("/v1/generate", json={**GEN, "identities": [{"id": ident}]}, headers=bearer()).status_code == 200
    assert client.delete(f"/v1/identities/{ident}", headers=bearer("other")).status_code == 404
    erased = client.delete(f"/v1/identities/{ident}", headers=bearer())
    assert erased.status_code == 200 and erased.json()["removed"][0]["where"] == ident
    assert client.get(f"/v1/identities/{ident}", headers=bearer()).json()["error"] == "erased"
    r = client.post("/v1/generate", json={**GEN, "identities": [{"id": ident}]}, headers=bearer())
    assert r.status_code == 410
    assert replica("Generator").forget_erased.remote().result() >= 1  # the replica's cached copy is dropped
    from ray_faceid.registry import Registry

    assert Registry(config.registry).files("acme", ident) == []


def test_an_enrollment_waiting_on_a_held_lock_does_not_delay_other_requests(api, people, photos):
    """Registry calls run off the ingress's event loop: while one enrollment waits for a name another
    writer holds, unrelated reads still answer. On a blocked loop each read would wait for the
    holder to let go (20 s); a busy machine's own slowness (a few 100 ms) is not the defect."""
    import threading

    from ray_faceid.registry import Registry

    client, config = api
    url = f"/v1/identities/{people['hanks']}"

    def latencies(n: int = 5) -> list[float]:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            assert client.get(url, headers=bearer()).status_code == 200
            out.append(time.perf_counter() - started)
            time.sleep(0.1)
        return out

    before = latencies()
    release, held = threading.Event(), threading.Event()

    def hold():
        with Registry(config.registry).name_lock("acme", "held-name"):
            held.set()
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    with httpx.Client(base_url=str(client.base_url), timeout=60) as other:
        waiting = ThreadPoolExecutor(1).submit(enroll, other, ("hanks.png", photos["hanks"]), name="held-name")
        time.sleep(2.0)  # the enrollment has analysed its photo and waits for the lock
        during = latencies()
        assert not waiting.done()
        release.set()
        assert waiting.result(60).status_code == 201
    holder.join(10)
    assert max(during) < 2.0 + 2 * max(before), (before, during)


def test_health_metrics_and_docs(api):
    client, _ = api
    assert client.get("/healthz").json()["status"] == "ok"
    assert re.search(r'faceid_requests_total\{route="/v1/generate",status="200"\} [1-9]', client.get("/metrics").text)
    assert client.get("/docs").status_code == 200
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]


def test_a_new_per_identity_adapter_is_served_without_a_restart(api, people):
    import torch

    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.identity.personalization import delta_bytes
    from ray_faceid.pipelines.models import build_tiny
    from ray_faceid.registry import Registry

    client, config = api
    body = {**GEN, "identities": [{"id": people["middle"]}]}
    before = client.post("/v1/generate", json=body, headers=bearer()).json()["images"][0]
    assert before["provenance"]["identities"][0]["personal_adapter"] is None
    registry = Registry(config.registry)
    spec = EncoderSpec(**registry.get("acme", people["middle"])["encoder"])
    assert before["provenance"]["identities"][0]["embeddings_encoder"] == spec.key()  # what made the tokens
    layout = IdentityAdapter.for_unet(build_tiny().unet, spec).processors.state_dict()
    delta = {k: torch.full(v.shape, 0.02).half() for k, v in layout.items()}
    entry = registry.add_adapter("acme", people["middle"], delta_bytes(delta),
                                 {"kind": "personal", "base_adapter": before["provenance"]["adapter"], "settings": "test"})
    after = client.post("/v1/generate", json=body, headers=bearer()).json()["images"][0]
    assert after["provenance"]["identities"][0]["personal_adapter"] == entry["version"]
    assert after["png_base64"] != before["png_base64"]


# -- bounded work, backpressure, one error body ---------------------------------------------------
def replica(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, "faceid")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (a decompression bomb's header) with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_bodies_over_the_limit_are_refused_before_they_are_read(api):
    import socket

    client, config = api
    limit = config.limits.max_body_bytes
    handle = replica("Ingress")
    before = handle.memory.remote(reset_peak=True).result()
    # Declared: answered from the headers alone (the 60 MB are never sent).
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"POST /v1/identities HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKENS['acme']}\r\n"
                     f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {60 * 2**20}\r\n\r\n".encode())
        answer = b""
        while b"body_too_large" not in answer and (part := sock.recv(65536)):
            answer += part
    answer = answer.decode(errors="replace")
    assert answer.split()[1] == "413" and "body_too_large" in answer and str(limit) in answer
    # Streamed without a length: cut off once the limit has arrived.
    def chunks():
        for _ in range(60):
            yield b"\0" * 2**20

    try:
        r = client.post("/v1/generate", content=chunks(), headers={**bearer(), "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    except httpx.TransportError:  # the server closed the connection while the client still sent
        pass
    after = handle.memory.remote().result()
    assert after["peak_rss_mb"] - before["rss_mb"] < 100, (before, after)
    assert metric(client, "faceid_requests_total", 'route="refused",status="413"') >= 1


def face_jpeg(photo: bytes, side: int) -> bytes:
    """`photo` blown up to side x side: a face the first detector finds at once, so what is measured
    is the decode, not the slower detectors a photo without a face goes through."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def test_a_decompression_bomb_and_huge_photos_keep_the_encoder_small(api, people, photos):
    client, config = api
    handle = replica("FaceEncoder")
    before = handle.memory.remote(reset_peak=True).result()
    r = enroll(client, ("bomb.png", png_header(20000, 20000)))
    assert r.status_code == 422 and "pixels" in r.json()["message"]
    inpaint = {"identity": {"id": people["hanks"]}, "image": base64.b64encode(png_header(20000, 20000)).decode(),
               "mask": base64.b64encode(png_header(20000, 20000)).decode(), "prompt": "a face", "steps": 2}
    r = client.post("/v1/inpaint", json=inpaint, headers=bearer())
    assert r.status_code == 422 and "pixels" in r.json()["message"]
    after = handle.memory.remote().result()
    assert after["peak_rss_mb"] - before["rss_mb"] < 100, (before, after)

    def peak_over_concurrent(side: int, count: int = 2) -> float:
        photo = face_jpeg(photos["hanks"], side)
        start = handle.memory.remote(reset_peak=True).result()["rss_mb"]
        with ThreadPoolExecutor(count) as pool:
            codes = list(pool.map(lambda k: enroll(client, (f"p{k}.jpg", photo)).status_code, range(count)))
        assert codes == [201] * count  # the face enrolled: nothing went wrong
        return handle.memory.remote().result()["peak_rss_mb"] - start

    # Photos are decoded at most max_decode_side wide: 6300 x 6300 uploads cost what max_decode_side^2 ones do.
    side = config.limits.max_decode_side
    small, large = peak_over_concurrent(side), peak_over_concurrent(6300)
    print(f"FaceEncoder peak RSS growth, 2 concurrent enrollments: {side}^2 {small:.0f} MB, 6300^2 {large:.0f} MB")
    assert large - small < 100, (small, large)


def test_work_per_request_is_bounded(api, people):
    client, config = api
    body = {**GEN, "width": 128, "height": 128, "steps": 20, "identities": [{"id": people["hanks"]}]}
    r = client.post("/v1/generate", json=body, headers=bearer())
    assert r.status_code == 422 and "pixel-steps" in r.json()["message"] and str(config.limits.max_cost) in r.text


def test_a_full_queue_answers_503_with_retry_after(api, people):
    client, config = api
    body = {**GEN, "steps": 4, "identities": [{"id": people["hanks"]}]}  # long enough for 32 to arrive at once
    with ThreadPoolExecutor(32) as pool:  # 8 running (2 batches of 4), 8 queued, the rest turned away
        answers = list(pool.map(lambda s: client.post("/v1/generate", json={**body, "seed": s}, headers=bearer()),
                                range(32)))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 503} and codes.count(200) >= 8, codes
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "7" and busy.json()["error"] == "busy"


def test_a_small_request_is_not_stuck_behind_a_large_one(api, people):
    client, _ = api
    generator = replica("Generator")
    lent = generator.info.remote().result()["lent_to_small_requests"]
    large = {**GEN, "width": 96, "height": 96, "steps": 20, "identities": [{"id": people["hanks"]}]}
    small = {**GEN, "identities": [{"id": people["left"]}]}
    done = {}

    def post(name: str, body: dict) -> int:
        status = client.post("/v1/generate", json=body, headers=bearer()).status_code
        done[name] = time.perf_counter()
        return status

    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, "large", large)
        time.sleep(1.5)  # the large request is denoising by now
        little = pool.submit(post, "small", small)
        assert big.result() == little.result() == 200
    assert done["small"] < done["large"]  # it ran inside the large one's denoise, between two steps
    assert generator.info.remote().result()["lent_to_small_requests"] > lent


def test_a_client_that_disconnects_stops_its_denoising(api, people):
    client, _ = api
    generator = replica("Generator")
    before = generator.info.remote().result()["cancelled"]
    body = {**GEN, "width": 96, "height": 96, "steps": 20, "identities": [{"id": people["hanks"]}]}
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json=body, headers=bearer(), timeout=1.0)
    deadline = time.time() + 30
    while generator.info.remote().result()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert generator.info.remote().result()["cancelled"] == before + 1


def test_errors_have_one_shape_no_storage_paths_and_every_5xx_is_counted(api, photos):
    client, config = api
    ident = enroll(client, ("hanks.png", photos["hanks"])).json()["id"]
    folder = Path(config.registry) / "acme" / ident
    (folder / "embeddings.npz").unlink()  # the store lost a file
    r = client.post("/v1/generate", json={**GEN, "identities": [{"id": ident}]}, headers=bearer())
    assert set(r.json()) == {"error", "message", "request_id"} and r.headers["x-request-id"] == r.json()["request_id"]
    assert config.registry not in r.text and "<storage>" in r.json()["message"]
    (folder / "meta.json").write_text("{}")  # a record the code does not expect: an unhandled exception
    before = metric(client, "faceid_requests_total", 'status="500"')
    r = client.get(f"/v1/identities/{ident}", headers=bearer())
    assert r.status_code == 500 and r.json()["error"] == "internal" and r.json()["request_id"]
    assert metric(client, "faceid_requests_total", 'status="500"') == before + 1
    (folder / "meta.json").write_text("{not json")  # a damaged record: the store's fault, and said so
    r = client.get(f"/v1/identities/{ident}", headers=bearer())
    assert r.status_code == 502 and r.json()["error"] == "storage_error" and config.registry not in r.text
    assert client.get("/v1/identities", headers=bearer()).status_code == 200  # the others are still listed
    shutil.rmtree(folder)  # the other tests share this registry
    for answer in (client.get("/v1/nowhere"), client.get("/v1/identities"),
                   client.post("/v1/generate", json={"prompt": 1}, headers=bearer())):
        assert answer.status_code in (401, 404, 422) and set(answer.json()) == {"error", "message", "request_id"}


def test_the_openapi_schema_lists_every_status_an_operation_returns(api):
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]
    documented = {(path, method): set(op["responses"]) for path, ops in paths.items() for method, op in ops.items()}
    assert {"401", "404", "409", "410", "413", "422", "503"} <= documented[("/v1/generate", "post")]
    assert {"201", "400", "401", "409", "413", "422"} <= documented[("/v1/identities", "post")]
    assert {"200", "404", "410"} <= documented[("/v1/identities/{identity}", "delete")]
    error = paths["/v1/generate"]["post"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/ErrorBody")


def test_schemathesis_finds_no_undocumented_status_and_no_server_error(api):
    """Schema-driven fuzzing of every operation (bounded): each answer's status is one the OpenAPI
    schema lists for that operation, and none is a 5xx."""
    import subprocess
    import sys

    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    client, config = api
    # Someone enrolled from the command line: the registry holds their photos' server paths.
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import Registry

    Registry(config.registry).create("acme", "from-the-cli", "consent-1", np.ones((1, 128), np.float32),
                                     np.ones(1, np.float32), FaceAnalyzer().spec, [np.zeros((8, 8, 3), np.uint8)],
                                     [{"index": 0, "filename": "/srv/photos/ann/0001.jpg", "accepted": True}])
    listed = client.get("/v1/identities", params={"limit": 1000}, headers=bearer()).text
    assert "0001.jpg" in listed  # (schemathesis may erase them: it follows the list's ids to DELETE)
    har = Path(config.registry).parent / "answers.har"
    result = subprocess.run(
        [str(st), "run", f"{client.base_url}/openapi.json", "--checks", "status_code_conformance,not_a_server_error",
         "-H", f"Authorization: Bearer {TOKENS['acme']}", "--max-examples", "10", "--workers", "1",
         "--request-timeout", "120", "--generation-deterministic", "--no-color", "--report", "har",
         "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # No answer holds an absolute server path or a storage URI.
    answers = [e["response"]["content"].get("text") or "" for e in json.loads(har.read_text())["log"]["entries"]]
    leaks = [a[:300] for a in [*answers, listed]
             if re.search(r'(?<![\w.])/(srv|tmp|home|root|work|var|usr|opt|mnt)/|\b(s3|gs|file|memory)://', a)
             or config.registry in a]
    assert answers and not leaks, leaks


def test_redeploying_on_the_same_port_replaces_the_app(api):
    """A process that started Serve may deploy again on its port (config changes, benchmarks); only a
    port held by something else is refused."""
    from deployments.local import start

    client, config = api
    url, _ = start(config, client.base_url.port)
    assert url == str(client.base_url).rstrip("/")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
