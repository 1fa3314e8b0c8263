"""Published identity adapters from their own files: IP-Adapter-FaceID (`.bin` and `.safetensors`,
LoRA embedded), built at toy size in the authors' key layout, gives diffusers' own
`load_ip_adapter` image (its LoRA through PEFT) with the same embedding, seed and scheduler; other
layouts, widths and encoders are refused in one line."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_faceid.errors import BadInput, EncoderMismatch, UnsupportedModel
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.stand_ins import faceid_state_dict, save  # noqa: F401 - other tests import them from here
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny
from ray_faceid.pipelines.schedulers import SHORT_NAMES, Sampler

EMBED = 16  # the published files take 512-d ArcFace embeddings; the hidden width is a multiple of it
SPEC = EncoderSpec(name="arcface_w600k_r50", dim=EMBED, version="test", license="-", metric="cosine", threshold=0.6)
SIZE = dict(width=64, height=64)


def face(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(1, EMBED)).astype(np.float32)
    return v / np.linalg.norm(v)


def save_like_a_user(folder) -> object:
    """The tiny base saved as diffusers' own pipeline saves a model (a base like a user's own, not
    marked as our smoke base); returns the base."""
    from diffusers import StableDiffusionPipeline

    base = build_tiny()
    StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                            scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return base


def diffusers_image(folder, weight_name: str, embedding: np.ndarray, seed: int, family: str = "sd1",
                    guidance: float = 5.0, sampler: str | None = None) -> np.ndarray:
    """diffusers' own path: load_ip_adapter (its FaceID LoRA through PEFT), ip_adapter_image_embeds
    (without guidance, the face's alone), the base's scheduler or `sampler` (a short name) swapped in."""
    pytest.importorskip("peft", reason="diffusers applies the FaceID LoRA through PEFT (`dev` extra)")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base = build_tiny(family=family)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                         scheduler=base.scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if sampler:
        import diffusers

        class_name, settings = SHORT_NAMES[sampler]
        pipe.scheduler = getattr(diffusers, class_name).from_config(base.scheduler.config, **settings)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    embeds = torch.cat([torch.zeros(1, len(embedding), EMBED), torch.from_numpy(embedding)[None]])  # negative, then the face
    embeds = embeds if guidance > 1 else embeds[1:]
    image = pipe("a portrait photo", num_inference_steps=3, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed), ip_adapter_image_embeds=[embeds], output_type="np",
                 **SIZE).images[0]
    return np.round(image * 255).astype(int)


@pytest.mark.parametrize("family,suffix", [("sd1", ".bin"), ("sd1", ".safetensors"), ("sdxl", ".bin")])
def test_ip_adapter_faceid_gives_diffusers_own_image(tmp_path, family, suffix, caplog):
    base = build_tiny(family=family)
    path = save(faceid_state_dict(base.unet), tmp_path / f"ip-adapter-faceid_test{suffix}")
    with caplog.at_level("WARNING"):
        adapter = IdentityAdapter.load(path, base.unet, SPEC)
    assert "recognised IP-Adapter-FaceID (FaceID): 4 identity tokens from 16-d ArcFace embeddings" in caplog.text
    pipe = IdentityPipeline(base, adapter)
    for seed, person in ((11, 1), (12, 2)):
        got = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(person))], seed=seed, steps=3,
                                       guidance=5.0, **SIZE).images[0]).astype(int)
        want = diffusers_image(tmp_path, path.rsplit("/", 1)[-1], face(person), seed, family)
        assert np.abs(got - want).max() <= 1, (seed, np.abs(got - want).max())
    again = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(1))], seed=11, steps=3,
                                     guidance=5.0, **SIZE).images[0]).astype(int)
    other = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(2))], seed=11, steps=3,
                                     guidance=5.0, **SIZE).images[0]).astype(int)
    assert np.abs(again - other).max() > 2  # the identity reaches the image
    # Guidance 1 (a few-step base): the face's rows alone, as diffusers runs them.
    got = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(1))], seed=11, steps=3,
                                   guidance=1.0, **SIZE).images[0]).astype(int)
    assert np.abs(got - diffusers_image(tmp_path, path.rsplit("/", 1)[-1], face(1), 11, family, 1.0)).max() <= 1
    # A stochastic sampler on the identity path: its draws as diffusers makes them.
    got = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(1))], seed=11, steps=3,
                                   guidance=5.0, sampler=Sampler.parse("euler-a"), **SIZE).images[0]).astype(int)
    assert np.abs(got - diffusers_image(tmp_path, path.rsplit("/", 1)[-1], face(1), 11, family,
                                        sampler="euler-a")).max() <= 1
    provenance = pipe.generate("a portrait photo", [IdentityCondition("p", face(1))], seed=11, steps=1,
                               **SIZE).provenance[0]
    assert provenance["adapter_published"]["kind"] == "IP-Adapter-FaceID"
    assert "non-commercial" in provenance["adapter_published"]["licence"]


def test_faceid_portrait_gives_each_photo_its_own_tokens_as_diffusers_does(tmp_path, caplog):
    """FaceID-Portrait (FaceID's layout, 16 tokens): several photos of one person, each its own tokens
    (diffusers: ip_adapter_image_embeds of N x R x D); not one fused embedding. Compiled and on ONNX
    Runtime, each photo count is its own graph."""
    from ray_faceid.engines.cache import EngineCache

    base = build_tiny()
    name = "ip-adapter-faceid-portrait_sd15.bin"
    path = save(faceid_state_dict(base.unet, tokens=16), tmp_path / name)
    with caplog.at_level("WARNING"):
        adapter = IdentityAdapter.load(path, base.unet, SPEC)
    assert "(FaceID-Portrait, tokens per photo): 16 identity tokens" in caplog.text
    pipe = IdentityPipeline(base, adapter)
    photos = np.concatenate([face(1), face(2), face(3)])
    images = []
    for refs in (photos, photos[:1]):
        got = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", refs)], seed=11, steps=3,
                                       guidance=5.0, **SIZE).images[0]).astype(int)
        want = diffusers_image(tmp_path, name, refs, 11)
        assert np.abs(got - want).max() <= 1, (len(refs), np.abs(got - want).max())
        images.append(got)
    assert np.abs(images[0] - images[1]).max() > 0  # every photo reaches the image, with its own 16 tokens
    assert pipe.identity_tokens([IdentityCondition("p", photos)]).shape[2] == 3 * 16
    # Compiled (the suite's Dynamo backend): a graph per token count, each photo count its own image.
    compiled = IdentityPipeline(base, adapter, backend="torch.compile")
    for refs, want in ((photos, images[0]), (photos[:1], images[1])):
        got = np.asarray(compiled.generate("a portrait photo", [IdentityCondition("p", refs)], seed=11, steps=3,
                                           guidance=5.0, **SIZE).images[0]).astype(int)
        assert np.abs(got - want).max() <= 1, len(refs)
    if importlib.util.find_spec("onnxruntime") is not None:  # ONNX Runtime: a graph per token count too
        exported = IdentityPipeline(base, adapter, backend="onnxruntime", engine_cache=EngineCache(tmp_path / "engines"))
        for refs, want in ((photos, images[0]), (photos[:1], images[1])):
            got = np.asarray(exported.generate("a portrait photo", [IdentityCondition("p", refs)], seed=11, steps=3,
                                               guidance=5.0, **SIZE).images[0]).astype(int)
            assert np.abs(got - want).max() <= 1, len(refs)
        assert len(exported.engines) == 2
    with pytest.raises(BadInput, match="a TensorRT plan holds one"):
        IdentityPipeline(base, adapter, backend="tensorrt").generate("a", [IdentityCondition("p", photos)],
                                                                     steps=1, **SIZE)
    with pytest.raises(UnsupportedModel, match="unnormalised FaceID-Portrait"):
        IdentityAdapter.load(save(faceid_state_dict(base.unet, tokens=16), tmp_path / "portrait_sdxl_unnorm.bin"),
                             base.unet, SPEC)


def test_a_warmed_portrait_engine_serves_people_of_each_warmed_photo_count_compiled(tmp_path):
    """A Serve replica of FaceID-Portrait on torch.compile warms each photo count of warm_up_photos: a
    person of three photos runs in the compiled graph (it ran eager), with eager's image; the count is
    refused for other adapters, in the config and in compile, in one line."""
    from ray_faceid.config import ServeConfig
    from ray_faceid.engines.cache import EngineCache

    base = build_tiny()
    portrait = save(faceid_state_dict(base.unet, tokens=16), tmp_path / "ip-adapter-faceid-portrait_sd15.bin")
    adapter = IdentityAdapter.load(portrait, base.unet, SPEC)
    compiled = IdentityPipeline(base, adapter, backend="torch.compile", engine_cache=EngineCache(tmp_path / "engines"))
    assert compiled.warm_up([(16, 16)], [1], max_images=1, photos=[1, 3])["buckets"] == 2
    compiled.compile_new_shapes = False  # as on a Serve replica after its warm-up
    engine = compiled.compiled_engine()
    graph, calls = engine.compiled, []
    engine.compiled = lambda **inputs: calls.append(inputs["identity_tokens"].shape[2]) or graph(**inputs)
    photos = np.concatenate([face(1), face(2), face(3)])
    got = compiled.generate("a portrait", [IdentityCondition("p", photos)], seed=3, steps=2, width=16, height=16)
    want = IdentityPipeline(base, adapter).generate("a portrait", [IdentityCondition("p", photos)], seed=3, steps=2,
                                                    width=16, height=16)
    assert calls == [3 * 16] * 2  # both steps in the warmed graph
    assert np.abs(np.asarray(got.images[0]).astype(int) - np.asarray(want.images[0]).astype(int)).max() <= 1
    plain = save(faceid_state_dict(base.unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    with pytest.raises(BadInput, match="warm-up photo counts are for FaceID-Portrait"):
        IdentityPipeline(base, IdentityAdapter.load(plain, base.unet, SPEC), backend="torch.compile").warm_up(
            [(16, 16)], [1], max_images=1, photos=[3])
    from deployments.app import resolve_config

    with pytest.raises(BadInput, match="warm_up_photos is for FaceID-Portrait files"):
        resolve_config(ServeConfig(adapter=plain, registry=str(tmp_path / "r"), backend="torch.compile",
                                   warm_up_photos=[1, 3], api_tokens={"acme": "acme-token-0123456789abcdef"}))
    with pytest.raises(ValueError, match="warm_up_photos x batch buckets"):
        ServeConfig(backend="torch.compile", warm_up_photos=list(range(1, 17)))
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    save_like_a_user(tmp_path / "sd15")
    refused = CliRunner().invoke(app, ["compile", "--out", str(tmp_path / "engines"), "--model", str(tmp_path / "sd15"),
                                       "--adapter", plain, "--backend", "torch.compile", "--size", "16x16", "--photos",
                                       "1,3"])
    assert refused.exit_code == 2 and "warm-up photo counts are for FaceID-Portrait" in refused.stderr, refused.output


def test_personalize_trains_a_portrait_person_on_each_other_photos_own_tokens(tmp_path, ray_cluster, monkeypatch):
    """personalize on FaceID-Portrait: each reference the target in turn, every other photo its own 16
    tokens as the pipeline gives them (not one fused embedding); the personal adapter reaches the
    person's image. InstantID still refuses it in one line (its tests)."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.identity.personalization import load_personal
    from ray_faceid.registry import Registry
    from ray_faceid.train.examples import reference_batch

    save_like_a_user(tmp_path / "sd15")  # a tiny stand-in's width is no family's: its load checks it on the base
    adapter = save(faceid_state_dict(build_tiny().unet, tokens=16), tmp_path / "ip-adapter-faceid-portrait_sd15.bin")
    monkeypatch.chdir(tmp_path)  # relative paths, as the default ./faceid_registry is (the workers run elsewhere)
    registry = Registry("registry")
    photos = np.concatenate([face(1), face(2), face(3)])
    crops = [np.random.default_rng(k).integers(0, 256, (256, 256, 3), dtype=np.uint8) for k in range(3)]
    ann = registry.create("default", "ann", "form-1", photos, np.ones(3, np.float32), SPEC, crops,
                          [{"index": k, "filename": f"{k}.png", "accepted": True, "reason": None} for k in range(3)])["id"]
    batch = reference_batch("ann", crops, photos, np.ones(3), [0, 1, 2], 32, "a photo", per_photo=True)
    assert batch.photo_embeddings.shape == (3, 2, EMBED)  # each target conditioned on the two other photos
    assert np.allclose(batch.photo_embeddings[0].numpy(), photos[[1, 2]])
    done = CliRunner().invoke(app, ["personalize", "--adapter", Path(adapter).name, "--model", "sd15",
                                    "--registry", "registry", "--steps", "3", "--size", "32", "--lr", "1e-2",
                                    "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["trained"] == [ann] and not summary["failed"], summary
    base = build_tiny()
    portrait = IdentityAdapter.load(adapter, base.unet, SPEC)  # as generate and Serve load it: beside their encoder
    # One file is one adapter whichever ArcFace spec it is loaded beside (personalize loads it with none):
    # its personal adapters were never found by generate or Serve.
    assert portrait.content_hash() == IdentityAdapter.load(adapter, base.unet).content_hash()
    personal = load_personal(registry, "default", ann, portrait.content_hash(), portrait)
    pipe = IdentityPipeline(base, portrait)

    def image(own) -> np.ndarray:
        person = IdentityCondition("ann", photos, np.ones(3, np.float32), personal=own)
        return np.asarray(pipe.generate("a portrait", [person], seed=3, steps=2, **SIZE).images[0]).astype(int)

    assert np.abs(image(personal) - image(None)).max() > 2


def test_personalize_finds_people_without_the_files_encoder_before_any_worker(tmp_path, monkeypatch):
    """A person enrolled with dlib alone has no ArcFace embeddings for a FaceID file: personalize names them
    and says how to add them before Ray starts (it started Ray Train and failed them in the worker)."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.data import cluster
    from ray_faceid.registry import Registry

    save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_state_dict(build_tiny().unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    registry = Registry(str(tmp_path / "registry"))
    dlib = EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)
    dan = registry.create("default", "dan", "form-1", np.ones((1, 128), np.float32), np.ones(1, np.float32), dlib,
                          [np.zeros((256, 256, 3), np.uint8)], [{"index": 0, "filename": "0.png", "accepted": True,
                                                                 "reason": None}])["id"]

    def init_ray(*args, **kwargs):
        raise AssertionError("Ray started for a job with nobody to adapt")

    monkeypatch.setattr(cluster, "init_ray", init_ray)
    run = CliRunner().invoke(app, ["personalize", "--adapter", adapter, "--model", str(tmp_path / "sd15"),
                                   "--registry", registry.store, "--json"])
    assert run.exit_code == 3, run.output
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert list(summary["failed"]) == [dan], summary
    # The command for this person and tenant; the store a placeholder (an API caller is told no server path).
    command = f"`ray-faceid identities embed {dan} --tenant default --registry REGISTRY --insightface-root PACK`"
    assert command in summary["failed"][dan], summary


def test_render_gives_each_enrolled_photo_its_own_portrait_tokens(tmp_path, tiny_arcface_onnx, sample_photos):
    """FaceID-Portrait on enrolled people (render; Serve takes the same rows): each reference photo's
    embedding gives its own tokens, as generate does; rows of people with other photo counts, sent
    together, are denoised apart; two people of unequal counts in one row fail that row alone."""
    from ray_faceid.config import FaceConfig, RenderConfig
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import REFERENCE_CROP, Registry

    face_config = FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))
    analyzer = FaceAnalyzer(face_config)
    save_like_a_user(tmp_path / "sd15")
    state = faceid_state_dict(build_tiny().unet, tokens=16, embed=analyzer.spec.dim)
    state["ip_adapter"] = {k: v * 4 if "_ip." in k else v for k, v in state["ip_adapter"].items()}  # tokens that show
    adapter = save(state, tmp_path / "ip-adapter-faceid-portrait_sd15.bin")
    faces = [analyzer.analyze(analyzer.load(sample_photos[name]))[0] for name in ("Tom_Hanks_54745.png", "t1.jpg")]
    embeddings = np.stack([f.embedding for f in faces])  # two photos' (of two people: the tiny encoder tells nobody)
    registry = Registry(str(tmp_path / "registry"))
    crop = np.zeros((REFERENCE_CROP, REFERENCE_CROP, 3), np.uint8)
    taken = [{"index": k, "filename": f"{k}.png", "accepted": True, "reason": None} for k in range(2)]
    registry.create("default", "two", "form-1", embeddings, np.ones(2, np.float32), analyzer.spec, [crop] * 2, taken)
    registry.create("default", "one", "form-2", embeddings[:1], np.ones(1, np.float32), analyzer.spec, [crop], taken[:1])
    config = RenderConfig(steps=2, size="32x32", face=face_config, device="cpu", unet_batch=4)
    renderer = Renderer(config, str(tmp_path / "sd15"), adapter, registry.store, "default", str(tmp_path / "out"))
    rows = [json.dumps({"id": name, "prompt": "a portrait", "identities": people, "seed": 3})
            for name, people in (("two", ["two"]), ("one", ["one"]), ("both", ["two", "one"]),
                                 ("posed", [{"id": "one", "pose": [[0.5, 0.5]] * 5}]))]
    two, one, both, posed = renderer.render_batch(rows, [0, 1, 2, 3])
    assert two["status"] == one["status"] == "ok", (two, one)
    assert both["status"] == "error" and "same number of photos (got [2, 1])" in both["error"]
    assert posed["status"] == "error" and "pose is for InstantID" in posed["error"]  # not silently dropped

    def generated(references) -> np.ndarray:
        return np.asarray(renderer.pipeline.generate("a portrait", [IdentityCondition("p", references)], seed=3,
                                                     steps=2, guidance=5.0, width=32, height=32).images[0]).astype(int)

    rendered = np.asarray(Image.open(two["output_uri"])).astype(int)
    assert np.abs(rendered - generated(embeddings)).max() <= 1
    assert np.abs(rendered - generated(embeddings[:1])).max() > 2  # the second photo's tokens reach the image
    assert np.abs(np.asarray(Image.open(one["output_uri"])).astype(int) - generated(embeddings[:1])).max() <= 1


def registry_person(store, name: str, embeddings: np.ndarray, spec) -> str:
    """A person enrolled with `spec`'s embeddings alone (their reference crops blank)."""
    from ray_faceid.registry import REFERENCE_CROP

    crop = np.zeros((REFERENCE_CROP, REFERENCE_CROP, 3), np.uint8)
    taken = [{"index": 0, "filename": "0.png", "accepted": True, "reason": None}]
    return store.create("default", name, "form-2", embeddings, np.ones(len(embeddings), np.float32), spec, [crop],
                        taken)["id"]


def test_a_person_enrolled_with_dlib_renders_with_a_faceid_file_after_identities_embed(tmp_path, tiny_arcface_onnx,
                                                                                         sample_photos):
    """Enrolled once (dlib, the default), then the ArcFace-shaped encoder's embeddings added from the
    registry's reference crops: a FaceID catalog row renders them; before, the row said how to add
    them. Erasure leaves none of either behind."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.config import FaceConfig, RenderConfig
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.pipelines.provenance import read_provenance
    from ray_faceid.registry import Registry

    registry = str(tmp_path / "registry")
    run = CliRunner().invoke
    enrolled = run(app, ["identities", "enroll", str(sample_photos["Tom_Hanks_54745.png"]), "--name", "hanks",
                         "--consent", "form-1", "--registry", registry])
    assert enrolled.exit_code == 0, enrolled.output
    face_config = FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))
    arcface = FaceAnalyzer(face_config).spec
    save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_state_dict(build_tiny().unet, embed=arcface.dim), tmp_path / "ip-adapter-faceid_sd15.bin")
    config = RenderConfig(steps=2, size="32x32", face=face_config, device="cpu")
    row = json.dumps({"id": "r1", "prompt": "a portrait", "identities": ["hanks"], "seed": 3})

    def render() -> dict:
        renderer = Renderer(config, str(tmp_path / "sd15"), adapter, registry, "default", str(tmp_path / "out"))
        return renderer.render_batch([row], [0])[0]

    before = render()
    assert before["status"] == "error" and "identities embed" in before["error"], before
    added = run(app, ["identities", "embed", "hanks", "--face-backend", "dlib", "--recognizer-onnx",
                      str(tiny_arcface_onnx), "--registry", registry])
    assert added.exit_code == 0 and f"hanks: 1 embeddings of {arcface.key()} added" in added.output, added.output
    store = Registry(registry)
    identity = store.resolve("default", "hanks")
    embeddings, _, spec = store.embeddings("default", identity, arcface)
    assert spec.key() == arcface.key() and embeddings.shape == (1, arcface.dim)
    assert store.embeddings("default", identity)[2].name == "dlib_resnet"  # the enrollment's stay what they were
    # Serve and personalize ask for what the adapter takes (a published file: any ArcFace of its width)
    takes = IdentityAdapter.load(adapter, build_tiny().unet, arcface).takes
    assert store.embeddings("default", identity, accept=takes)[2].key() == arcface.key()
    again = run(app, ["identities", "embed", "--face-backend", "dlib", "--registry", registry])  # everyone, dlib
    assert again.exit_code == 0 and "embeddings of dlib_resnet" in again.output and "enrolled with it already" in \
        again.output, again.output
    after = render()
    assert after["status"] == "ok", after
    assert json.loads(after["provenance"])["identities"][0]["embeddings_encoder"] == arcface.key()
    # On dlib's stack (the default) the file reads the ArcFace set, the outputs are scored with dlib's,
    # and the record says which set made the image; a person with no dlib set is named unscored.
    ann = registry_person(store, "ann", embeddings, arcface)
    on_dlib = Renderer(RenderConfig(steps=2, size="32x32", device="cpu"), str(tmp_path / "sd15"), adapter, registry,
                       "default", str(tmp_path / "out"))
    rows = [json.dumps({"id": f"r-{p}", "prompt": "a portrait", "identities": [p], "seed": 3}) for p in ("hanks", "ann")]
    hanks_row, ann_row = on_dlib.render_batch(rows, [0, 1])
    assert hanks_row["status"] == ann_row["status"] == "ok", (hanks_row, ann_row)
    assert json.loads(hanks_row["provenance"])["identities"][0]["embeddings_encoder"] == arcface.key()
    assert json.loads(hanks_row["scores"])["unscored"] == []
    assert json.loads(ann_row["scores"])["unscored"] == [ann]
    from ray_faceid.data.catalog import parse_row

    again = parse_row(rows[0], 0)  # the same row and settings, another ArcFace set read: another output
    key = on_dlib.key(again, [])
    on_dlib.identities["hanks"] = dict(on_dlib.identities["hanks"], encoder="arcface_onnx/512/another@0123")
    assert on_dlib.key(again, []) != key
    # generate --identity finds the embeddings the file takes without the face options they were made with.
    made = run(app, ["generate", "--identity", "hanks", "--adapter", adapter, "--model", str(tmp_path / "sd15"),
                     "--registry", registry, "--prompt", "a portrait", "--size", "32x32", "--steps", "2", "--out",
                     str(tmp_path / "hanks.png")])
    assert made.exit_code == 0, made.output
    recorded = read_provenance((tmp_path / "hanks.png").read_bytes())["identities"][0]
    assert recorded["embeddings_encoder"] == arcface.key() and recorded["id"] == identity
    erased = run(app, ["identities", "delete", "hanks", "--registry", registry])
    assert erased.exit_code == 0, erased.output
    assert not store.files("default", identity)


def test_published_layouts_the_system_does_not_run_or_damaged_files_are_refused_in_one_line(tmp_path):
    base = build_tiny()
    state = faceid_state_dict(base.unet)
    plus = {"image_proj": {"perceiver_resampler.proj_in.weight": torch.zeros(2, 2), **state["image_proj"]},
            "ip_adapter": state["ip_adapter"]}
    instantid = {"image_proj": {"latents": torch.zeros(1, 4, 8), "proj_in.weight": torch.zeros(8, 8)},
                 "ip_adapter": state["ip_adapter"]}
    for name, bad, says in (("plus.bin", plus, "a FaceID-Plus resampler without"), ("instantid.bin", instantid, "InstantID"),
                            ("other.bin", {"image_proj": {"x": torch.zeros(1)}, "ip_adapter": {}},
                             "not an IP-Adapter-FaceID file")):
        with pytest.raises(UnsupportedModel, match=says) as refused:
            IdentityAdapter.load(save(bad, tmp_path / name), base.unet, SPEC)
        assert "\n" not in str(refused.value)
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.zeros(32, 4)},
              str(tmp_path / "ip-adapter-faceid_sd15_lora.safetensors"))
    with pytest.raises(UnsupportedModel, match="holds a LoRA alone .* the authors' .bin of the same name without `_lora`"):
        IdentityAdapter.load(str(tmp_path / "ip-adapter-faceid_sd15_lora.safetensors"), base.unet, SPEC)
    (tmp_path / "damaged.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UnsupportedModel, match="not a readable .safetensors file"):
        IdentityAdapter.load(str(tmp_path / "damaged.safetensors"), base.unet, SPEC)
    sdxl = build_tiny(family="sdxl")
    wide = save(faceid_state_dict(sdxl.unet), tmp_path / "sdxl.bin")
    with pytest.raises(UnsupportedModel, match="cross-attention width 64; this SD1 base has 32"):
        IdentityAdapter.load(wide, base.unet, SPEC)
    dlib = EncoderSpec(name="dlib_resnet", dim=128, version="x", license="-", metric="euclidean", threshold=0.6)
    with pytest.raises(EncoderMismatch, match="--face-backend insightface"):
        IdentityAdapter.load(save(state, tmp_path / "ok.bin"), base.unet, dlib)


def test_the_files_lora_fuses_into_a_unet_on_another_device(tmp_path):
    """The file is read on the CPU; the pipeline moves the UNet to its device (a GPU) before the
    LoRA fuses into it: the sum is made there (it failed with tensors on two devices)."""
    from ray_faceid.identity.published import fuse_lora

    base = build_tiny()
    adapter = IdentityAdapter.load(save(faceid_state_dict(base.unet), tmp_path / "ip-adapter-faceid_sd15.bin"),
                                   base.unet, SPEC)
    unet = build_tiny().unet.to("meta")  # another device than the file's tensors, on a machine without a GPU
    assert fuse_lora(unet, adapter.base_lora, "file") and unet.down_blocks[0].attentions[0].transformer_blocks[0] \
        .attn1.to_q.weight.device.type == "meta"


def test_a_real_base_without_an_adapter_is_refused_and_the_smoke_base_is_seeded(tmp_path, sample_photos):
    """Never a random adapter: a real base with no --adapter says where one comes from (it made
    another image each run); the tiny smoke-test base's untrained adapter gives the same bytes."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    save_like_a_user(tmp_path / "real")
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    fast = ["--size", "32x32", "--steps", "2", "--seed", "3"]
    refused = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "real"), "--ref", hanks, "--prompt", "a",
                                       "--out", str(tmp_path / "x.png"), *fast])
    assert refused.exit_code == 2 and "no identity adapter was given: pass --adapter" in refused.stderr
    from deployments.app import resolve_config  # a Serve config likewise, when read: it would serve nothing
    from ray_faceid.config import ServeConfig

    tokens = {"acme": "acme-token-0123456789abcdef"}
    from ray_faceid import storage
    from ray_faceid.pipelines.models import save_base

    storage.write_bytes("memory://models/real/model_index.json", (tmp_path / "real" / "model_index.json").read_bytes())
    for real in (str(tmp_path / "real"), "memory://models/real", "someone/sd15-on-the-hub"):  # a folder, a URI, a hub id
        with pytest.raises(BadInput, match="no identity adapter was given: pass --adapter .* refuse them all"):
            resolve_config(ServeConfig(model=real, api_tokens=tokens))
    save_base(build_tiny(), tmp_path / "smoke")  # our smoke base saved: marked, it runs its seeded adapter
    for smoke in ("tiny", str(tmp_path / "smoke")):
        resolve_config(ServeConfig(model=smoke, api_tokens=tokens))
    made = []
    for k in range(2):
        out = tmp_path / f"tiny{k}.png"
        result = CliRunner().invoke(app, ["generate", "--ref", hanks, "--prompt", "a", "--out", str(out), *fast])
        assert result.exit_code == 0, result.output
        made.append(np.asarray(Image.open(out)))
    assert np.array_equal(made[0], made[1])


def test_one_command_from_a_published_file_and_an_embedding(tmp_path):
    """README's 'Bring published weights', with tiny stand-ins: a base as diffusers saves it, the
    FaceID file, an embedding made elsewhere: one `generate` gives the image, its provenance says what made it."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.pipelines.provenance import read_provenance

    base = save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_state_dict(base.unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    np.save(tmp_path / "ann.npy", face(1))
    out = tmp_path / "ann.png"
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "sd15"), "--adapter", adapter,
                                      "--face-embedding", str(tmp_path / "ann.npy"), "--prompt", "a portrait",
                                      "--size", "32x32", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    provenance = read_provenance(out.read_bytes())
    assert provenance["adapter_published"]["file"] == "ip-adapter-faceid_sd15.bin"
    wrong = np.ones((1, 7), np.float32)
    np.save(tmp_path / "wrong.npy", wrong)
    refused = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "sd15"), "--adapter", adapter,
                                       "--face-embedding", str(tmp_path / "wrong.npy"), "--prompt", "a",
                                       "--size", "32x32", "--steps", "2", "--out", str(tmp_path / "w.png")])
    assert refused.exit_code == 2 and "7-d embeddings, the adapter needs 16-d" in refused.stderr


def test_the_compiled_engine_runs_a_published_adapter_with_identity_live(tmp_path):
    """torch.compile with a FaceID file: its LoRA fused once before the compile, people and strengths
    as data (0 recompiles), eager's image within 1/255 (16x16: the suite's compiled tests' size)."""
    from ray_faceid.engines.cache import EngineCache

    def pipeline(backend):
        base = build_tiny()
        adapter = IdentityAdapter.load(save(faceid_state_dict(base.unet), tmp_path / "faceid.bin"), base.unet, SPEC)
        return IdentityPipeline(base, adapter, backend=backend, engine_cache=EngineCache(tmp_path / "engines"))

    compiled, eager = pipeline("torch.compile"), pipeline("torch")
    assert compiled.warm_up([(16, 16)], [1], max_images=1)["buckets"] == 1
    weights = {k: v.clone() for k, v in compiled.base.unet.state_dict().items()}
    images = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for person in (IdentityCondition("ann", face(1)), IdentityCondition("bob", face(2)),
                       IdentityCondition("ann weaker", face(1), scale=0.5)):
            got, want = (np.asarray(p.generate("a portrait photo", [person], seed=5, steps=2, guidance=5.0, width=16,
                                               height=16).images[0]).astype(int) for p in (compiled, eager))
            assert np.abs(got - want).max() <= 1, person.name
            images.append(got.tobytes())
    assert len(set(images)) == 3  # every person and strength reaches the image
    assert compiled.base.unet._ray_faceid_fused_lora  # the file's LoRA is in the compiled base...
    assert all(torch.equal(v, compiled.base.unet.state_dict()[k]) for k, v in weights.items())  # ...once, not per call


def test_onnxruntime_runs_a_published_adapter_with_its_lora_in_the_graph(tmp_path):
    """ONNX export with a FaceID file: the fused LoRA goes into the exported base, the identity
    weights are the graph's inputs; two people give eager's images within 1/255 (16x16)."""
    pytest.importorskip("onnxruntime")
    from ray_faceid.engines.cache import EngineCache

    def pipeline(backend):
        base = build_tiny()
        adapter = IdentityAdapter.load(save(faceid_state_dict(base.unet), tmp_path / "faceid.bin"), base.unet, SPEC)
        return IdentityPipeline(base, adapter, backend=backend, engine_cache=EngineCache(tmp_path / "engines"))

    onnx, eager = pipeline("onnxruntime"), pipeline("torch")
    images = []
    for person in (IdentityCondition("ann", face(1)), IdentityCondition("bob", face(2))):
        got, want = (np.asarray(p.generate("a portrait photo", [person], seed=5, steps=2, guidance=5.0, width=16,
                                           height=16).images[0]).astype(int) for p in (onnx, eager))
        assert np.abs(got - want).max() <= 1, person.name
        images.append(got.tobytes())
    assert len(set(images)) == 2  # each person reaches the image through the graph's inputs
    assert onnx.base.unet._ray_faceid_fused_lora  # the exported base carries the file's LoRA
