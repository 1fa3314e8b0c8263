"""Generation and inpainting with identities on tiny components (CPU, seconds)."""
import numpy as np
import pytest
import torch

from ray_faceid.engines.base import DTYPES
from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.inpaint import inpaint
from ray_faceid.pipelines.provenance import read_provenance

SIZE = dict(width=64, height=64, steps=3)


def person(name, seed):
    return IdentityCondition(name, np.random.default_rng(seed).normal(size=(2, 128)))


@pytest.fixture(scope="module", params=["decoupled", "pva"])
def pipe(request, tiny_base, spec128):
    torch.manual_seed(0)
    adapter = IdentityAdapter.for_unet(tiny_base.unet, spec128, AdapterOptions(method=request.param, expression_dim=5))
    with torch.no_grad():  # an untrained adapter is close to a no-op; make the identity path count
        for p in adapter.parameters():
            p.mul_(3.0)
    pipeline = IdentityPipeline(tiny_base, adapter)
    yield pipeline
    IdentityAdapter.remove(tiny_base.unet)


def test_same_seed_same_bytes_and_provenance(pipe):
    a = pipe.generate("a photo of a person", [person("ann", 1)], seed=7, **SIZE)
    b = pipe.generate("a photo of a person", [person("ann", 1)], seed=7, **SIZE)
    assert a.png[0] == b.png[0]
    record = read_provenance(a.png[0])
    assert record["seed"] == 7 and record["ai_generated"] is True and record["untrained_base"] is True
    assert record["base_model"].startswith("tiny") and record["adapter"] == pipe.adapter.content_hash()
    assert record["identities"][0]["name"] == "ann" and record["identities"][0]["id"] is None  # from photos
    c = pipe.generate("a photo of a person", [person("ann", 1)], seed=8, **SIZE)
    assert c.png[0] != a.png[0]


def test_identity_changes_the_image(pipe):
    ann = np.asarray(pipe.generate("a portrait", [person("ann", 1)], **SIZE).images[0], dtype=float)
    bob = np.asarray(pipe.generate("a portrait", [person("bob", 2)], **SIZE).images[0], dtype=float)
    none = np.asarray(pipe.generate("a portrait", [], **SIZE).images[0], dtype=float)
    assert np.abs(ann - bob).mean() > 0.5
    assert np.abs(ann - none).mean() > 0.5


def test_expression_request_changes_the_image(pipe):
    plain = pipe.generate("a portrait", [person("ann", 1)], **SIZE).images[0]
    smiling = IdentityCondition("ann", person("ann", 1).embeddings, expression="smile, turn left")
    assert np.asarray(pipe.generate("a portrait", [smiling], **SIZE).images[0]).tobytes() != np.asarray(plain).tobytes()
    with pytest.raises(BadInput, match="expression 'frown' unknown"):
        pipe.generate("a portrait", [IdentityCondition("ann", person("ann", 1).embeddings, expression="frown")], **SIZE)


def test_two_identities_with_regions(pipe):
    left = IdentityCondition("ann", person("ann", 1).embeddings, region=(0.0, 0.0, 0.5, 1.0))
    right = IdentityCondition("bob", person("bob", 2).embeddings, region=(0.5, 0.0, 1.0, 1.0))
    out = pipe.generate("two people", [left, right], **SIZE)
    assert out.images[0].size == (64, 64)
    assert [i["name"] for i in out.provenance[0]["identities"]] == ["ann", "bob"]
    with pytest.raises(BadInput, match="need 0 <= x0 < x1 <= 1"):
        pipe.generate("x", [IdentityCondition("a", left.embeddings, region=(0.6, 0, 0.2, 1))], **SIZE)


def test_bad_requests_are_refused(pipe):
    with pytest.raises(BadInput, match="multiples of 2 for this model, got 63x64"):
        pipe.generate("x", [person("ann", 1)], width=63, height=64, steps=2)
    with pytest.raises(BadInput, match="512-d embeddings, the adapter needs 128-d"):
        pipe.generate("x", [IdentityCondition("a", np.ones((1, 512)))], **SIZE)
    # More steps than the scheduler has timesteps was a ValueError deep in diffusers (a 500 from Serve).
    with pytest.raises(BadInput, match="steps must be between 1 and 1000"):
        pipe.generate("x", [person("ann", 1)], width=64, height=64, steps=1001)


def test_inpaint_keeps_every_pixel_outside_the_mask(pipe):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)  # not a size the model takes: resized inside
    mask = np.zeros((70, 90), np.uint8)
    mask[20:50, 30:70] = 255
    out = inpaint(pipe, image, mask, person("ann", 1), "a face", steps=3, feather=3)
    result = np.asarray(out.images[0])
    assert result.shape == image.shape
    assert np.array_equal(result[mask == 0], image[mask == 0])
    assert (result[mask > 0] != image[mask > 0]).mean() > 0.5
    assert read_provenance(out.png[0])["kind"] == "inpaint"
    with pytest.raises(BadInput, match="mask is empty"):
        inpaint(pipe, image, np.zeros((70, 90), np.uint8), person("ann", 1), "x", steps=2)
    with pytest.raises(BadInput, match="must match"):
        inpaint(pipe, image, np.zeros((10, 10), np.uint8), person("ann", 1), "x", steps=2)


def test_a_batch_matches_the_images_made_one_by_one(pipe):
    from ray_faceid.pipelines.generate import GenerationItem

    items = [GenerationItem("a portrait", [person("ann", 1)], seed=3),
             GenerationItem("a painting", [person("bob", 2)], "blurry", seed=4)]
    batch = pipe.generate_items(items, **SIZE)
    assert batch.seeds == [3, 4] and [r["prompt"] for r in batch.provenance] == ["a portrait", "a painting"]
    for k, item in enumerate(items):
        single = pipe.generate(item.prompt, item.identities, item.negative_prompt, seed=item.seed, **SIZE)
        diff = np.abs(np.asarray(batch.images[k], float) - np.asarray(single.images[0], float))
        assert diff.max() <= 2  # float rounding of batched kernels only


PRECISION = {dtype: name for name, dtype in DTYPES.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_the_fp32_image(spec128, dtype):
    """GPUs serve in fp16 / bf16: the pipeline casts at the UNet, VAE and mapper boundaries and keeps
    the scheduler's latents in fp32. Here on CPU, against the fp32 image of the same request."""
    from ray_faceid.pipelines.models import build_tiny

    images = {}
    for run in (torch.float32, dtype):
        base = build_tiny()
        torch.manual_seed(0)
        adapter = IdentityAdapter.for_unet(base.unet, spec128, AdapterOptions(method="pva"))
        trained = adapter.content_hash()
        pipe = IdentityPipeline(base, adapter, precision=PRECISION[run])
        assert base.unet.dtype == run and next(adapter.parameters()).dtype == run
        assert pipe.adapter_hash == trained  # the registry's records refer to the weights as trained
        people = [person("a", 1), person("b", 2)]
        results = [pipe.generate("a portrait", people[:n], steps=3, width=64, height=64) for n in (1, 2)]
        assert all(r.provenance[0]["adapter"] == trained for r in results)
        images[run] = [np.asarray(r.images[0], dtype=np.float32) for r in results]
    for full, half in zip(images[torch.float32], images[dtype]):
        assert np.abs(full - half).mean() < 2.0 and np.abs(full - half).max() < 40
