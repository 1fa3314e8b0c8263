"""The Generator on a FLUX base (deployments/flux_generator.py), through its batch runner (plain async
code, no Serve needed) from a config resolve_config accepted: each request's image equals
FluxGenerator's on the enrolled person's reference crops read through the CLIP image encoder; what
FLUX does not take yet fails that request alone; an erased person leaves the replica's memory."""
import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.identity.test_face_plus import image_encoder_folder  # noqa: F401 - a fixture: a tiny CLIP, 16-d embeds
from tests.pipelines.test_flux_identity import xlabs_state_dict

TOKENS = {"acme": "acme-token-0123456789abcdef", "other": "other-token-0123456789abcdef"}


def request(identities: list[dict], seed: int, **extra) -> dict:
    return {"kind": "generate", "tenant": "acme", "identities": identities, "prompt": "a portrait",
            "negative_prompt": "", "seed": seed, "num_images": 1, "steps": 2, "guidance": 3.5, "width": 32,
            "height": 32, "cancelled": threading.Event(), **extra}


def test_a_flux_deployment_serves_enrolled_people_requests_batched_together(tmp_path, image_encoder_folder,  # noqa: F811
                                                                           sample_photos, monkeypatch):
    from deployments.app import resolve_config
    from deployments.flux_generator import FluxServeGenerator
    from ray_faceid.config import ServeConfig
    from ray_faceid.erasure import erase_identity
    from ray_faceid.errors import BadInput
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.face.clip_image import ClipImageEncoder
    from ray_faceid.pipelines.flux import build_tiny_flux, save_flux
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.pipelines.models import build_tiny
    from ray_faceid.registry import Registry

    base = build_tiny_flux()
    save_flux(base, tmp_path / "flux")
    save_file(xlabs_state_dict(base.transformer), tmp_path / "ip_adapter.safetensors")
    registry = Registry(str(tmp_path / "registry"))
    analyzer = FaceAnalyzer()
    people, tenant_of = {}, {"ann": "acme", "bob": "other"}  # two tenants' people
    for name, photo in (("ann", "Tom_Hanks_54745.png"), ("bob", "t1.jpg")):
        face = analyzer.analyze(analyzer.load(sample_photos[photo]))[0]
        crop = np.asarray(Image.open(sample_photos[photo]).convert("RGB").resize((256, 256)))
        people[name] = registry.create(tenant_of[name], name, f"form-{name}", face.embedding[None],
                                       np.ones(1, np.float32), analyzer.spec, [crop], [])["id"]
    config = ServeConfig(model=str(tmp_path / "flux"), adapter=str(tmp_path / "ip_adapter.safetensors"),
                         image_encoder=str(image_encoder_folder), registry=registry.store, api_tokens=TOKENS)
    from tests.identity.test_published_adapters import faceid_state_dict, save

    faceid = save(faceid_state_dict(build_tiny().unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    for change, says in (({"imr": "x", "backend": "tensorrt"}, "imr, backend: not built for FLUX yet"),
                         ({"image_encoder": None}, "set both adapter and image_encoder"),
                         ({"adapter": faceid}, "adapter: .* not the XLabs FLUX IP-Adapter layout"),
                         ({"adapter": str(tmp_path / "missing.safetensors")}, "adapter: ")):
        with pytest.raises(BadInput, match=says):
            resolve_config(config.model_copy(update=change))
    from deployments.app import model_family
    from ray_faceid import storage

    assert model_family("file://" + str(tmp_path / "flux")) == "flux"  # Serve builds the FLUX Generator for it
    storage.write_bytes("memory://models/flux/model_index.json", (tmp_path / "flux" / "model_index.json").read_bytes())
    assert model_family("memory://models/flux") == "flux" and model_family("memory://models/none") is None
    # Compiled (the suite's Dynamo backend): the native size warmed before the replica is ready.
    from torch._dynamo.utils import counters

    compiled = config.model_copy(update={"backend": "torch.compile", "generator_batch_size": 2,
                                         "limits": config.limits.model_copy(update={"max_images": 1})})
    generator = FluxServeGenerator(resolve_config(compiled).model_dump_json())
    assert generator.info()["warm_up"]["buckets"] == 2 and generator.info()["backend"] == "torch.compile"
    graphs = counters["stats"]["unique_graphs"]  # batch buckets 1 and 2 at the native size, compiled
    held = {}  # Serve's multiplexing LRU (it needs a replica context): what keeps loaded people alive

    async def load_identity(key):
        held[key] = held.get(key) or await generator._load_identity(key)
        return held[key]

    generator.load_identity = load_identity
    assert "FLUX IP-Adapter" in generator.defaults()["served"] and generator.info()["family"] == "flux"
    # What the page shows of it: dev takes guidance and a negative prompt with true CFG, not a sampler or inpainting.
    assert generator.defaults()["controls"] == {"negative_prompt": True, "sampler": False, "guidance": True,
                                                "expression": False, "edits": False, "generate": True, "inpaint": False,
                                                "true_cfg": True, "identity_start": True}
    batches, generate_items = [], generator.pipeline.generate_items

    def counted(items, *args, **kwargs):
        batches.append(len(items))
        return generate_items(items, *args, **kwargs)

    generator.pipeline.generate_items = counted
    answers = asyncio.run(generator._generate_group([
        request([{"id": people["ann"]}], 3), request([{"id": people["bob"]}], 4, tenant="other"),
        request([{"id": people["ann"], "expression": "smile"}], 5), request([], 6, scheduler="euler")]))
    assert batches == [2]  # acme's and other's requests in one transformer batch; the refused ones in none
    assert counters["stats"]["unique_graphs"] == graphs  # a warmed bucket: nothing compiled at request time
    encoder = ClipImageEncoder(str(image_encoder_folder))
    for answer, name, seed in zip(answers, ("ann", "bob"), (3, 4)):
        assert "error" not in answer, answer
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
        crops = encoder.image_embeds(registry.references(tenant_of[name], people[name]))
        want = generator.pipeline.generate("a portrait", [IdentityCondition(name, crops)], seed=seed, steps=2,
                                           width=32, height=32).images[0]
        assert np.abs(image - np.asarray(want).astype(int)).max() <= 1, name
        assert [p["id"] for p in answer["provenance"][0]["identities"]] == [people[name]]  # theirs alone
    assert answers[2]["status"] == 422 and "expression not built for FLUX yet" in answers[2]["message"]
    # A negative prompt through true CFG: the image the generator makes with them, compiled, nothing new
    # compiled (the negative pass is another call of the same graphs); without true_cfg, its own 422.
    away, ignored = asyncio.run(generator._generate_group([
        request([{"id": people["ann"]}], 3, negative_prompt="blurry", true_cfg=2.0),
        request([{"id": people["ann"]}], 3, negative_prompt="blurry")]))
    crops = ClipImageEncoder(str(image_encoder_folder)).image_embeds(registry.references("acme", people["ann"]))
    want = generator.pipeline.generate("a portrait", [IdentityCondition("ann", crops)], seed=3, steps=2, width=32,
                                       height=32, negative_prompt="blurry", true_cfg=2.0).images[0]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(away["png"][0])))).astype(int)
    assert np.abs(image - np.asarray(want).astype(int)).max() <= 1 and away["provenance"][0]["true_cfg"] == 2.0
    assert ignored["status"] == 422 and "give true_cfg S over 1" in ignored["message"]
    assert counters["stats"]["unique_graphs"] == graphs
    # backend onnxruntime: the replica exports (or loads) the transformer's graph of its size before it is
    # ready; a request's image is the compiled replica's.
    on_onnx = FluxServeGenerator(resolve_config(config.model_copy(update={"backend": "onnxruntime"})).model_dump_json())
    assert on_onnx.info()["backend"] == "onnxruntime" and on_onnx.info()["warm_up"]["graphs"] == 1
    on_onnx.load_identity = load_identity
    (onnx_answer,) = asyncio.run(on_onnx._generate_group([request([{"id": people["ann"]}], 3)]))
    assert np.abs(np.asarray(Image.open(io.BytesIO(base64.b64decode(onnx_answer["png"][0])))).astype(int)
                  - np.asarray(Image.open(io.BytesIO(base64.b64decode(answers[0]["png"][0])))).astype(int)).max() <= 1
    assert answers[3]["status"] == 422 and "scheduler: not built for FLUX yet" in answers[3]["message"]
    # flux_transformer_weights fp8_matmul: the replica multiplies in float8; nearly the image, and it says so.
    narrow = FluxServeGenerator(resolve_config(config.model_copy(update={"flux_transformer_weights": "fp8_matmul"}))
                                .model_dump_json())
    narrow.load_identity = load_identity
    (narrow_answer,) = asyncio.run(narrow._generate_group([request([{"id": people["ann"]}], 3)]))
    assert narrow_answer["provenance"][0]["transformer_weights"] == "fp8_matmul"
    apart = np.abs(np.asarray(Image.open(io.BytesIO(base64.b64decode(narrow_answer["png"][0])))).astype(int)
                   - np.asarray(Image.open(io.BytesIO(base64.b64decode(answers[0]["png"][0])))).astype(int))
    assert 0 < apart.max() <= 12 and apart.mean() < 2  # against fp32 (measured: 9 of 255 at most, mean 1.2)
    # Fill repaints at the photo's size: its real cost is checked on the replica, not the native size's.
    photo = sample_photos["Tom_Hanks_54745.png"].read_bytes()
    with pytest.raises(BadInput, match="pixel-steps, over this deployment's"):
        asyncio.run(generator._inpaint(dict(request([], 1), kind="inpaint", image=photo, mask=photo, feather=4.0, steps=100_000)))
    # ... at what it repaints: a photo over FLUX's pixel budget costs the budget, not its own pixels.
    from ray_faceid.pipelines import flux_sampling

    monkeypatch.setattr(flux_sampling, "MAX_FILL_PIXELS", 1024)
    steps = compiled.limits.max_cost // (112 * 112) + 1  # the 112 px photo's own pixels: over the limit
    with pytest.raises(BadInput, match="needs FLUX.1 Fill"):  # priced, then refused by this dev base
        asyncio.run(generator._inpaint(dict(request([], 1), kind="inpaint", image=photo, mask=photo, feather=4.0, steps=steps)))
    # A batch that fails answers its own requests with the failure; refused ones keep their own 422.
    def broken(*_, **__):
        raise RuntimeError("the GPU fell over")

    generator.pipeline.generate_items = broken
    failed, refused = asyncio.run(generator._generate_group([request([{"id": people["ann"]}], 3),
                                                             request([], 6, scheduler="euler")]))
    assert failed["status"] == 500 and "RuntimeError" in failed["message"]
    assert refused["status"] == 422 and "scheduler: not built for FLUX yet" in refused["message"]
    generator.pipeline.generate_items = generate_items
    erase_identity(registry, "acme", people["ann"])
    assert generator.forget_erased() == 1  # her image embeddings leave the replica too
    assert [loaded.embeddings is None for loaded in held.values()].count(True) == 1
    (gone,) = asyncio.run(generator._generate_group([request([{"id": people["ann"]}], 3)]))
    assert gone["status"] == 410, gone


def test_the_flux_app_answers_over_http(ray_cluster, tmp_path, loopback_port, image_encoder_folder,  # noqa: F811
                                        sample_photos):
    """The application as `serve run` builds it, on tiny-flux with a FLUX IP-Adapter: a person
    enrolled through the API is rendered through it; what FLUX does not take yet is a 422."""
    import httpx
    from ray import serve

    from deployments.local import start
    from ray_faceid.config import AutoscalingConfig, ServeConfig
    from ray_faceid.pipelines.flux import build_tiny_flux

    save_file(xlabs_state_dict(build_tiny_flux().transformer), tmp_path / "ip_adapter.safetensors")
    one = AutoscalingConfig(min_replicas=1, max_replicas=1)
    config = ServeConfig(model="tiny-flux", adapter=str(tmp_path / "ip_adapter.safetensors"),
                         image_encoder=str(image_encoder_folder), registry=str(tmp_path / "registry"),
                         api_tokens=TOKENS, generator_autoscaling=one, encoder_autoscaling=one, ingress_autoscaling=one,
                         web_page=False)
    url, _ = start(config, loopback_port())
    headers = {"Authorization": f"Bearer {TOKENS['acme']}"}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            photo = sample_photos["Tom_Hanks_54745.png"].read_bytes()
            enrolled = client.post("/v1/identities", files=[("photos", ("tom.png", photo, "image/png"))],
                                   data={"consent": "form-7", "name": "tom"}, headers=headers)
            assert enrolled.status_code == 201, enrolled.text
            body = {"prompt": "a portrait", "steps": 2, "width": 32, "height": 32, "seed": 1,
                    "identities": [{"name": "tom"}]}
            made = client.post("/v1/generate", json=body, headers=headers)
            assert made.status_code == 200, made.text
            provenance = made.json()["images"][0]["provenance"]
            assert provenance["base_family"] == "flux" and provenance["identities"][0]["id"] == enrolled.json()["id"]
            refused = client.post("/v1/generate", json={**body, "negative_prompt": "blurry"}, headers=headers)
            assert refused.status_code == 422 and "give true_cfg S over 1" in refused.text
            away = client.post("/v1/generate", json={**body, "negative_prompt": "blurry", "true_cfg": 2}, headers=headers)
            assert away.status_code == 200 and away.json()["images"][0]["provenance"]["true_cfg"] == 2, away.text
            # Another tenant's token, as an attacker would hold it: acme's person is nowhere to be found,
            # by name or id, even sent beside acme's own request (batching across tenants: the test above).
            attacker = {"Authorization": f"Bearer {TOKENS['other']}"}
            assert client.get("/v1/identities", headers=attacker).json()["identities"] == []
            tom = enrolled.json()["id"]
            assert client.get(f"/v1/identities/{tom}", headers=attacker).status_code == 404
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(3) as pool:
                own, by_id, by_name = pool.map(
                    lambda sent: client.post("/v1/generate", json=sent[0], headers=sent[1]),
                    [(body, headers), ({**body, "identities": [{"id": tom}]}, attacker), (body, attacker)])
            assert own.status_code == 200 and own.json()["images"][0]["png_base64"] == made.json()["images"][0][
                "png_base64"]
            assert by_id.status_code == 404 and by_name.status_code == 404, (by_id.text, by_name.text)
            assert "tom" not in by_id.text and tom not in by_name.text
    finally:
        serve.shutdown()


def test_a_flux_fill_deployment_repaints_a_request_as_the_generator_does(tmp_path, image_encoder_folder):  # noqa: F811
    """A Fill replica answers an inpaint request with the generator's own image for that photo, mask
    and feather (the request's soft edge reaches the image; outside the mask the photo stays)."""
    from deployments.app import resolve_config
    from deployments.flux_generator import FluxServeGenerator
    from ray_faceid.config import ServeConfig
    from ray_faceid.pipelines.flux import build_tiny_flux, save_flux
    from ray_faceid.registry import Registry

    base = build_tiny_flux(fill=True)
    save_flux(base, tmp_path / "fill")
    save_file(xlabs_state_dict(base.transformer), tmp_path / "ip_adapter.safetensors")
    config = ServeConfig(model=str(tmp_path / "fill"), adapter=str(tmp_path / "ip_adapter.safetensors"),
                         image_encoder=str(image_encoder_folder), registry=Registry(str(tmp_path / "registry")).store,
                         api_tokens=TOKENS)
    generator = FluxServeGenerator(resolve_config(config).model_dump_json())
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 12:30] = 255

    def png(array) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    images = {}
    for feather in (0.0, 3.0):
        answer = asyncio.run(generator._inpaint(dict(request([], 5), kind="inpaint", image=png(photo), mask=png(mask),
                                                     feather=feather)))
        images[feather] = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
        want = generator.pipeline.inpaint(photo, mask, "a portrait", [], 5, 2, 3.5, feather=feather).images[0]
        assert np.abs(images[feather] - np.asarray(want).astype(int)).max() <= 1, feather
        assert np.array_equal(images[feather][mask == 0], photo[mask == 0])
    assert np.abs(images[3.0] - images[0.0])[mask > 0].max() > 2
