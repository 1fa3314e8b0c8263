"""Serve with the torch.compile engine and a published identity adapter: the Generator fuses the
IP-Adapter-FaceID-PlusV2 file's LoRA once, compiles its configured shapes before it is ready, reads
each enrolled person's reference crops through the CLIP image encoder, and answers requests from the
compiled engine (tiny components, an ArcFace-shaped ONNX recogniser, fake GPU, loopback)."""
import base64
import io

import httpx
import pytest
from PIL import Image

from tests.identity.test_face_plus import image_encoder_folder  # noqa: F401 - a fixture

TOKENS = {"acme": "acme-token-0123456789abcdef"}
HEADERS = {"Authorization": f"Bearer {TOKENS['acme']}"}


@pytest.fixture(scope="module")
def published_file(tmp_path_factory) -> str:
    """An IP-Adapter-FaceID-PlusV2 .bin for the tiny base, in its authors' layout (named as they name
    it), taking the tiny recogniser's 64-d embeddings."""
    from ray_faceid.pipelines.models import build_tiny
    from tests.identity.test_face_plus import faceid_plus_state_dict
    from tests.identity.test_published_adapters import save

    return save(faceid_plus_state_dict(build_tiny().unet, embed=64),
                tmp_path_factory.mktemp("published") / "ip-adapter-faceid-plusv2_sd15.bin")


@pytest.fixture(scope="module")
def compiled_api(ray_cluster, tmp_path_factory, loopback_port, tiny_arcface_onnx, published_file,
                 image_encoder_folder):  # noqa: F811 - the fixture imported above
    from ray import serve

    from deployments.local import start
    from ray_faceid.config import AutoscalingConfig, FaceConfig, ServeConfig, ServeLimits

    one = AutoscalingConfig(min_replicas=1, max_replicas=1)
    config = ServeConfig(
        adapter=published_file, image_encoder=str(image_encoder_folder), face=FaceConfig(recognizer_onnx=str(tiny_arcface_onnx)),
        registry=str(tmp_path_factory.mktemp("registry")), api_tokens=TOKENS, generator_gpus=1.0,
        # 16x16, one identity, one image: the smallest shape (traced with the suite's torch.compile
        # backend, eager: tests/conftest.py).
        backend="torch.compile", warm_up_sizes=["16x16"], warm_up_identities=[1], generator_batch_size=1,
        generator_autoscaling=one, encoder_autoscaling=one, ingress_autoscaling=one,
        limits=ServeLimits(max_steps=20, max_side=256, max_images=1, max_reseeds=0),
    )
    url, _ = start(config, loopback_port())
    with httpx.Client(base_url=url, timeout=300) as client:
        yield client
    serve.shutdown()


def test_the_generator_serves_from_the_engine_it_compiled_before_it_was_ready(compiled_api, sample_photos):
    from ray import serve

    generator = serve.get_deployment_handle("Generator", "faceid")
    info = generator.info.remote().result()
    assert info["backend"] == "torch.compile"
    assert info["adapter_published"]["kind"] == "IP-Adapter-FaceID"
    served = generator.defaults.remote().result()["served"]  # the page says it after sign-in
    assert ("IP-Adapter-FaceID (FaceID-PlusV2, shortcut) from ip-adapter-faceid-plusv2_sd15.bin; licence: "
            "IP-Adapter-FaceID weights") in served
    # One size, one identity, one image per batch: batch bucket 2 (the CFG pair), compiled in __init__.
    assert info["warm_up"]["buckets"] == 1
    photo = sample_photos["Tom_Hanks_54745.png"].read_bytes()
    enrolled = compiled_api.post("/v1/identities", files=[("photos", ("hanks.png", photo, "image/png"))],
                                 data={"consent": "consent-form-42", "name": "hanks"}, headers=HEADERS)
    assert enrolled.status_code == 201, enrolled.text
    body = {"prompt": "a portrait photo", "steps": 2, "width": 16, "height": 16, "seed": 1,
            "identities": [{"id": enrolled.json()["id"]}]}
    first = compiled_api.post("/v1/generate", json=body, headers=HEADERS)
    assert first.status_code == 200, first.text
    image = first.json()["images"][0]
    assert image["provenance"]["backend"] == "torch.compile"
    published = image["provenance"]["adapter_published"]
    assert published["file"] == "ip-adapter-faceid-plusv2_sd15.bin" and "non-commercial" in published["licence"]
    assert image["provenance"]["image_encoder"]  # the person's reference crops read through it
    assert Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).size == (16, 16)
    stronger = compiled_api.post("/v1/generate", json={**body, "identities": [{**body["identities"][0], "scale": 1.5}]},
                                 headers=HEADERS)
    assert stronger.status_code == 200, stronger.text
    assert stronger.json()["images"][0]["png_base64"] != image["png_base64"]  # strength is a live input
    again = compiled_api.post("/v1/generate", json=body, headers=HEADERS).json()
    assert again["images"][0]["png_base64"] == image["png_base64"]  # deterministic on the compiled engine
