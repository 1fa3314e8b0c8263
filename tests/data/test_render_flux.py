"""A catalog on a FLUX base through the render job (Ray Data, the session's local cluster): enrolled
people read as the FLUX IP-Adapter reads a person (their reference crops through the CLIP image
encoder), each image equal to FluxGenerator's on the same embeddings; what FLUX does not take yet is
that row's error; a re-run renders nothing."""
import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ray_faceid.config import RenderConfig
from ray_faceid.data.render import run_render
from ray_faceid.enrollment import enroll_dataset
from ray_faceid.registry import Registry
from tests.identity.test_face_plus import image_encoder_folder  # noqa: F401 - a fixture: a tiny CLIP, 16-d embeds
from tests.pipelines.test_flux_identity import files  # noqa: F401 - a fixture: tiny-flux and its FLUX IP-Adapter

CONFIG = RenderConfig(steps=2, size="32x32", workers=1, batch_size=4)


def test_a_catalog_renders_on_flux_with_enrolled_people(small_dataset, files, image_encoder_folder,  # noqa: F811
                                                        tmp_path):
    from ray_faceid.face.clip_image import ClipImageEncoder
    from ray_faceid.identity.flux_adapter import load_flux_adapter
    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator
    from ray_faceid.pipelines.generate import IdentityCondition

    registry = Registry(str(tmp_path / "registry"))
    ids = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")["enrolled"]
    rows = [{"id": "amy", "identities": [ids["amy"]], "prompt": "a person at the beach", "seed": 1},
            {"id": "two", "identities": [{"id": ids["amy"], "region": [0, 0, 0.5, 1]}, ids["penny"]],
             "prompt": "two people", "seed": 2},
            {"id": "plain", "prompt": "a beach", "seed": 3},
            {"id": "penny", "identities": [ids["penny"]], "prompt": "a person in a park", "seed": 4},
            {"id": "smile", "identities": [ids["amy"]], "prompt": "a person", "expression": "smile"}]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    flux, adapter = str(files / "flux"), str(files / "ip_adapter.safetensors")
    summary = run_render(str(catalog), str(out), flux, registry.store, adapter, CONFIG,
                         image_encoder=str(image_encoder_folder))
    records = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert {k: r["status"] for k, r in records.items()} == {"amy": "ok", "two": "ok", "plain": "ok", "penny": "ok",
                                                            "smile": "error"}
    assert "expression: not built for FLUX yet" in records["smile"]["error"]
    assert summary["rendered"] == 4 and summary["failed"] == 1
    provenance = json.loads(records["amy"]["provenance"])
    assert provenance["base_family"] == "flux" and provenance["identities"][0]["id"] == ids["amy"]
    base = load_flux(flux)
    generator = FluxGenerator(base, load_flux_adapter(adapter, base.transformer))
    crops = ClipImageEncoder(str(image_encoder_folder)).image_embeds(registry.references("default", ids["amy"]))
    want = generator.generate("a person at the beach", [IdentityCondition("amy", crops)], seed=1, steps=2, width=32,
                              height=32).images[0]
    got = np.asarray(Image.open(records["amy"]["output_uri"])).astype(int)
    assert np.abs(got - np.asarray(want).astype(int)).max() <= 1
    again = run_render(str(catalog), str(out), flux, registry.store, adapter, CONFIG,
                       image_encoder=str(image_encoder_folder))
    assert again["rendered"] == 0 and again["cached"] == 4
    # --unet-batch: rows of other people and prompts denoised together, each the image made alone.
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_flux import FluxRenderer

    batched = FluxRenderer(CONFIG.model_copy(update={"unet_batch": 4}), flux, adapter, registry.store, "default",
                           str(tmp_path / "batched"), image_encoder=str(image_encoder_folder))
    sizes, generate_items = [], batched.pipeline.generate_items
    batched.pipeline.generate_items = lambda items, *args: sizes.append(len(items)) or generate_items(items, *args)
    texts = read_catalog(str(catalog))
    made = {r["id"]: r for r in batched.render_batch(texts, list(range(len(texts))))}
    assert sizes == [2, 1, 1]  # amy's and penny's rows together; two people, nobody: a batch each
    assert {k: r["status"] for k, r in made.items()} == {k: r["status"] for k, r in records.items()}
    for row_id in ("amy", "penny", "two"):
        a = np.asarray(Image.open(made[row_id]["output_uri"])).astype(int)
        assert np.abs(a - np.asarray(Image.open(records[row_id]["output_uri"])).astype(int)).max() <= 1, row_id
    # With the step cache: its threshold keys the rows (another image) and each record says what it reused.
    cached = FluxRenderer(CONFIG.model_copy(update={"unet_batch": 4, "flux_step_cache": 0.5}), flux, adapter,
                          registry.store, "default", str(tmp_path / "cached"), image_encoder=str(image_encoder_folder))
    with_cache = {r["id"]: r for r in cached.render_batch(texts, list(range(len(texts))))}
    assert with_cache["amy"]["key"] != made["amy"]["key"]
    assert json.loads(with_cache["amy"]["provenance"])["step_cache"]["threshold"] == 0.5
    # Float8 transformer weights (and products) make another image: keyed apart, each record says so.
    # Text encoders on the CPU move where the prompt is encoded, as the device does: the same key.
    for memory, keyed_apart in (({"flux_transformer_weights": "fp8_matmul"}, True), ({"flux_text_encoders": "cpu"}, False)):
        held = FluxRenderer(CONFIG.model_copy(update={"unet_batch": 4, **memory}), flux, adapter, registry.store,
                            "default", str(tmp_path / "held"), image_encoder=str(image_encoder_folder))
        amy = next(r for r in held.render_batch(texts, list(range(len(texts)))) if r["id"] == "amy")
        assert (amy["key"] != made["amy"]["key"]) is keyed_apart, memory
        assert json.loads(amy["provenance"]).get("transformer_weights") == memory.get("flux_transformer_weights")
    # On FLUX's ONNX graph (backend onnxruntime): the same images.
    on_onnx = FluxRenderer(CONFIG.model_copy(update={"unet_batch": 4, "backend": "onnxruntime"}), flux, adapter,
                           registry.store, "default", str(tmp_path / "onnx"), image_encoder=str(image_encoder_folder))
    exported = {r["id"]: r for r in on_onnx.render_batch(texts, list(range(len(texts))))}
    for row_id in ("amy", "two"):
        a = np.asarray(Image.open(exported[row_id]["output_uri"])).astype(int)
        assert np.abs(a - np.asarray(Image.open(records[row_id]["output_uri"])).astype(int)).max() <= 1, row_id


def test_an_inpaint_row_renders_on_flux_fill_as_the_generator_repaints_it(small_dataset, image_encoder_folder,  # noqa: F811
                                                                        tmp_path):
    """A catalog's inpaint row (photo and mask beside the catalog, one enrolled person) on FLUX.1 Fill:
    the image equals FluxGenerator.inpaint's on the same person's crops, with the job's feather."""
    from safetensors.torch import save_file

    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_flux import FluxRenderer
    from ray_faceid.face.clip_image import ClipImageEncoder
    from ray_faceid.identity.flux_adapter import load_flux_adapter
    from ray_faceid.pipelines.flux import build_tiny_flux, load_flux, save_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator
    from ray_faceid.pipelines.generate import IdentityCondition
    from tests.pipelines.test_flux_identity import xlabs_state_dict

    save_flux(build_tiny_flux(fill=True), tmp_path / "fill")
    adapter = str(tmp_path / "ip_adapter.safetensors")
    save_file(xlabs_state_dict(build_tiny_flux(fill=True).transformer), adapter)
    registry = Registry(str(tmp_path / "registry"))
    amy = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")["enrolled"]["amy"]
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 12:30] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "amy", "identities": [amy], "prompt": "a face", "seed": 6,
                                   "image": "photo.png", "mask": "mask.png"}) + "\n")
    config = CONFIG.model_copy(update={"feather": 3.0})
    renderer = FluxRenderer(config, str(tmp_path / "fill"), adapter, registry.store, "default", str(tmp_path / "out"),
                            image_encoder=str(image_encoder_folder), catalog=str(catalog))
    (made,) = renderer.render_batch(read_catalog(str(catalog)), [0])
    assert made["status"] == "ok", made.get("error")
    base = load_flux(str(tmp_path / "fill"))
    crops = ClipImageEncoder(str(image_encoder_folder)).image_embeds(registry.references("default", amy))
    want = FluxGenerator(base, load_flux_adapter(adapter, base.transformer)).inpaint(
        photo, mask, "a face", [IdentityCondition("amy", crops)], 6, 2, feather=3.0).images[0]
    got = np.asarray(Image.open(made["output_uri"])).astype(int)
    assert np.abs(got - np.asarray(want).astype(int)).max() <= 1
    assert json.loads(made["provenance"])["feather"] == 3.0


def test_a_compiled_render_actor_warms_the_jobs_shapes_before_its_first_row(small_dataset, files,  # noqa: F811
                                                                            image_encoder_folder, tmp_path):  # noqa: F811
    """On torch.compile an actor compiles the job's size for every batch bucket its rows can fill when
    it starts (from `ray-faceid compile`'s artifacts where the engine cache has them, into it where
    not): its rows then compile nothing."""
    from torch._dynamo.utils import counters

    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_flux import FluxRenderer

    registry = Registry(str(tmp_path / "registry"))
    ids = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")["enrolled"]
    rows = [{"id": "amy", "identities": [ids["amy"]], "prompt": "a person", "seed": 1},
            {"id": "penny", "identities": [ids["penny"]], "prompt": "a person", "seed": 2, "identity_start": 1},
            {"id": "plain", "prompt": "a beach", "seed": 3},
            {"id": "late", "identities": [ids["penny"]], "prompt": "a person", "identity_start": 2}]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    renderer = FluxRenderer(CONFIG.model_copy(update={"backend": "torch.compile", "unet_batch": 2}), str(files / "flux"),
                            str(files / "ip_adapter.safetensors"), registry.store, "default", str(tmp_path / "out"),
                            image_encoder=str(image_encoder_folder))
    assert renderer.warmed["buckets"] == 2  # batches of 1 and 2 rows at 32x32
    graphs = counters["stats"]["unique_graphs"]
    texts = read_catalog(str(catalog))
    made = renderer.render_batch(texts, list(range(len(texts))))
    assert [r["status"] for r in made] == ["ok"] * 3 + ["error"]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while rows ran
    # A row's identity from its second step (PuLID's start_step), batched with amy's from the first; a
    # start past the job's 2 steps is that row's error alone.
    assert json.loads(made[1]["provenance"])["identity_start"] == 1
    assert "identity start 2 is past the last of 2 steps" in made[3]["error"]


def test_an_identity_start_of_0_keys_a_row_as_one_without_it():
    """0 is the default: a catalog that writes it out keeps the outputs rendered before it existed."""
    from ray_faceid.data.catalog import parse_row

    plain, zero, one = (parse_row(text, 0).key_fields() for text in (
        '{"id": "a", "prompt": "x", "identities": ["amy"]}',
        '{"id": "a", "prompt": "x", "identities": ["amy"], "identity_start": 0}',
        '{"id": "a", "prompt": "x", "identities": ["amy"], "identity_start": 1}'))
    assert plain == zero != one
