"""IP-Adapter-FaceID-Plus and PlusV2 from their own files: at toy size in the authors' key layout
(perceiver resampler, LoRA inside), with a tiny CLIP image encoder saved as the authors' folder is
(no processor config), the image equals diffusers' own path (`load_ip_adapter`, the projection's
`clip_embeds` and `shortcut`, its LoRA through PEFT) with the same embedding, face crop and seed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_faceid.errors import BadInput
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.stand_ins import CLIP_INNER as INNER
from ray_faceid.identity.stand_ins import CLIP_WIDTH, faceid_plus_state_dict, save_image_encoder
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny
from tests.identity.test_published_adapters import EMBED, SIZE, SPEC, face, faceid_state_dict, save, save_like_a_user


@pytest.fixture(scope="module")
def image_encoder_folder(tmp_path_factory):
    """A tiny CLIP vision model saved as h94/IP-Adapter's models/image_encoder is: config and weights only."""
    return Path(save_image_encoder(tmp_path_factory.mktemp("image_encoder")))


def crop(seed: int) -> np.ndarray:
    """A 224 px 'aligned face' (any pixels: both paths read the same crop)."""
    return np.random.default_rng(seed).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)


def diffusers_plus_image(folder, weight_name, encoder_folder, embedding, face_crop, seed, family, v2) -> np.ndarray:
    pytest.importorskip("peft", reason="diffusers applies the FaceID LoRA through PEFT (`dev` extra)")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    base = build_tiny(family=family)
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 scheduler=base.scheduler, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_folder),
                 feature_extractor=CLIPImageProcessor())
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                                         add_watermarker=False, **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, requires_safety_checker=False, **parts)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = pipe.prepare_ip_adapter_image_embeds([Image.fromarray(face_crop)], None, "cpu", 1, True)[0]
    projection.shortcut, projection.shortcut_scale = v2, 1.0
    embeds = torch.cat([torch.zeros(1, 1, EMBED), torch.from_numpy(embedding)[None]])
    image = pipe("a portrait photo", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                 ip_adapter_image_embeds=[embeds], output_type="np", **SIZE).images[0]
    return np.round(image * 255).astype(int)


@pytest.mark.parametrize("family,name", [("sd1", "ip-adapter-faceid-plus_sd15.bin"),
                                         ("sd1", "ip-adapter-faceid-plusv2_sd15.safetensors"),
                                         ("sdxl", "ip-adapter-faceid-plusv2_sdxl.bin")])
def test_faceid_plus_gives_diffusers_own_image(tmp_path, image_encoder_folder, family, name, caplog):
    from ray_faceid.face.clip_image import ClipImageEncoder

    base = build_tiny(family=family)
    path = save(faceid_plus_state_dict(base.unet), tmp_path / name)
    with caplog.at_level("WARNING"):
        adapter = IdentityAdapter.load(path, base.unet, SPEC)
    v2 = "plusv2" in name
    assert f"recognised IP-Adapter-FaceID (FaceID-Plus{'V2, shortcut' if v2 else ''}): 4 identity tokens from 16-d " \
           f"ArcFace embeddings and {CLIP_WIDTH}-d CLIP image features" in caplog.text
    adapter.image_encoder = ClipImageEncoder(str(image_encoder_folder))
    pipe = IdentityPipeline(base, adapter)
    images = {}
    for seed, person in ((11, 1), (12, 2)):
        features = adapter.image_encoder.features([crop(person)])
        condition = IdentityCondition("p", face(person), image_features=features)
        got = np.asarray(pipe.generate("a portrait photo", [condition], seed=seed, steps=3, guidance=5.0,
                                       **SIZE).images[0]).astype(int)
        want = diffusers_plus_image(tmp_path, name, image_encoder_folder, face(person), crop(person), seed, family, v2)
        assert np.abs(got - want).max() <= 1, (seed, np.abs(got - want).max())
        images[person] = got
    # The face's CLIP features reach the image, not only its embedding.
    other = IdentityCondition("p", face(1), image_features=adapter.image_encoder.features([crop(2)]))
    moved = np.asarray(pipe.generate("a portrait photo", [other], seed=11, steps=3, guidance=5.0, **SIZE).images[0])
    assert np.abs(moved.astype(int) - images[1]).max() > 2
    # Without features it says what to give, in one line.
    with pytest.raises(BadInput, match="--image-encoder FOLDER") as refused:
        pipe.generate("a portrait photo", [IdentityCondition("p", face(1))], seed=1, steps=1, **SIZE)
    assert "\n" not in str(refused.value)


def test_one_command_with_a_plus_v2_file_an_image_encoder_and_a_photo(tmp_path, image_encoder_folder, sample_photos):
    """`generate` with FaceID-PlusV2: the embedding made elsewhere, the photo read through CLIP; the
    provenance names the file and the image encoder; without --image-encoder it says what to give."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.pipelines.provenance import read_provenance

    base = save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_plus_state_dict(base.unet), tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    np.save(tmp_path / "hanks.npy", face(1))
    common = ["generate", "--model", str(tmp_path / "sd15"), "--adapter", adapter, "--face-embedding",
              str(tmp_path / "hanks.npy"), "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--prompt", "a portrait",
              "--size", "32x32", "--steps", "2"]
    made, versions = {}, set()
    for scale in ("1.0", "0.3"):
        out = tmp_path / f"hanks{scale}.png"
        result = CliRunner().invoke(app, [*common, "--image-encoder", str(image_encoder_folder), "--plus-v2-scale",
                                          scale, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "Loading weights" not in result.stderr  # the user's folders load without a bar per file
        provenance = read_provenance(out.read_bytes())
        assert provenance["adapter_published"]["variant"] == "FaceID-PlusV2, shortcut"
        assert provenance["adapter_published"]["shortcut_scale"] == float(scale)
        assert provenance["image_encoder"]
        made[scale] = np.asarray(Image.open(out)).astype(int)
        versions.add(provenance["adapter"])
    assert np.abs(made["1.0"] - made["0.3"]).max() > 0  # the scale reaches the image...
    assert len(versions) == 2  # ...and the adapter's version, as all it is made of
    plain = save(faceid_state_dict(base.unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    wrong = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "sd15"), "--adapter", plain,
                                     "--face-embedding", str(tmp_path / "hanks.npy"), "--plus-v2-scale", "0.5",
                                     "--prompt", "a", "--size", "32x32", "--steps", "2", "--out", str(tmp_path / "p.png")])
    assert wrong.exit_code == 2 and "is for FaceID-PlusV2 files" in wrong.stderr
    embedding_only = [a for a in common if a not in ("--ref", str(sample_photos["Tom_Hanks_54745.png"]))]
    refused = CliRunner().invoke(app, [*embedding_only, "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "give --image-encoder FOLDER" in refused.stderr
    no_photo = CliRunner().invoke(app, [*embedding_only, "--image-encoder", str(image_encoder_folder), "--out",
                                        str(tmp_path / "x.png")])
    assert no_photo.exit_code == 2 and "reads the face's photos, not only an embedding" in no_photo.stderr
    missing = CliRunner().invoke(app, [*common, "--image-encoder", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert missing.exit_code != 0 and "no CLIP image encoder at" in missing.stderr and "config.json" in missing.stderr


def test_an_enrolled_persons_reference_crop_gives_nearly_the_photos_own_clip_crop(sample_photos):
    """The registry keeps no photo, only the face on the loose diffusion template: re-aligned onto
    FaceID-Plus's template it is the crop the photo gives, slightly softer."""
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.face.clip_image import face_crop, face_crop_from_reference
    from ray_faceid.registry import REFERENCE_CROP

    analyzer = FaceAnalyzer()
    crops = {}
    for name in ("Tom_Hanks_54745.png", "t1.jpg"):
        pixels = analyzer.load(sample_photos[name])
        landmarks = analyzer.analyze(pixels)[0].landmarks
        reference = align(pixels, landmarks, loose_template(REFERENCE_CROP))[0]
        crops[name] = face_crop(pixels, landmarks).astype(int), face_crop_from_reference(reference).astype(int)
    direct, via_reference = crops["Tom_Hanks_54745.png"]
    assert via_reference.shape == direct.shape == (224, 224, 3)
    near = np.abs(via_reference - direct).mean()
    assert near < 3, near  # of 255: resampling blur only, no shift, scale or channel swap
    assert np.abs(crops["t1.jpg"][0] - direct).mean() > 10 * near  # another face is far further


def test_render_runs_faceid_plus_on_enrolled_people_as_generate_does(tmp_path, image_encoder_folder, tiny_arcface_onnx,
                                                                     sample_photos):
    """A catalog row of an enrolled person: the CLIP features of their reference crops reach the
    image, which is the one the pipeline gives with those features; the row's key names the encoder."""
    from ray_faceid.config import FaceConfig, RenderConfig
    from ray_faceid.data.catalog import parse_row
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.registry import REFERENCE_CROP, Registry

    face_config = FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))
    analyzer = FaceAnalyzer(face_config)
    save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_plus_state_dict(build_tiny().unet, embed=analyzer.spec.dim),
                   tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    registry = Registry(str(tmp_path / "registry"))
    pixels = analyzer.load(sample_photos["Tom_Hanks_54745.png"])
    found = analyzer.analyze(pixels)[0]
    reference = align(pixels, found.landmarks, loose_template(REFERENCE_CROP))[0]
    hanks = registry.create("default", "hanks", "form-1", found.embedding[None], np.ones(1, np.float32), analyzer.spec,
                            [reference], [{"index": 0, "filename": "hanks.png", "accepted": True, "reason": None}])
    config = RenderConfig(steps=2, size="32x32", face=face_config, device="cpu")
    renderer = Renderer(config, str(tmp_path / "sd15"), adapter, registry.store, "default", str(tmp_path / "out"),
                        image_encoder=str(image_encoder_folder))
    record = renderer.render(parse_row('{"id": "r1", "prompt": "a portrait", "identities": ["hanks"], "seed": 3}', 0))
    assert record["status"] == "ok", record
    assert json.loads(record["provenance"])["image_encoder"] == renderer.pipeline.adapter.image_encoder.sha256
    rendered = np.asarray(Image.open(record["output_uri"])).astype(int)

    def generated(features) -> np.ndarray:
        condition = IdentityCondition("hanks", found.embedding[None], np.ones(1, np.float32), image_features=features)
        return np.asarray(renderer.pipeline.generate("a portrait", [condition], seed=3, steps=2, guidance=5.0,
                                                     width=32, height=32).images[0]).astype(int)

    encoder = renderer.pipeline.adapter.image_encoder
    assert np.abs(rendered - generated(encoder.enrolled_features(registry.references("default", hanks["id"])))).max() <= 1
    assert np.abs(rendered - generated(encoder.features([crop(5)]))).max() > 2  # the crops' features reach the image
    # Without the encoder, one line saying what to give; a plain FaceID file refuses one.
    with pytest.raises(BadInput, match="--image-encoder FOLDER"):
        Renderer(config, str(tmp_path / "sd15"), adapter, registry.store, "default", str(tmp_path / "out"))
    plain = save(faceid_state_dict(build_tiny().unet, embed=analyzer.spec.dim), tmp_path / "ip-adapter-faceid_sd15.bin")
    with pytest.raises(BadInput, match="--image-encoder is for IP-Adapter-FaceID-Plus"):
        Renderer(config, str(tmp_path / "sd15"), plain, registry.store, "default", str(tmp_path / "out"),
                 image_encoder=str(image_encoder_folder))


def test_personalize_reads_the_references_through_clip_and_train_refuses_plus(tmp_path, image_encoder_folder,
                                                                              tiny_arcface_onnx, sample_photos,
                                                                              ray_cluster, monkeypatch):
    """personalize on FaceID-Plus: without the CLIP image encoder one line saying to give it; with it,
    each person's reference crops read through CLIP condition the training steps (as the pipeline
    reads an enrolled person), and the personal adapter changes that person's image. train (rows of
    embeddings alone) refuses it, saying what runs it."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.config import FaceConfig
    from ray_faceid.face.align import align, loose_template
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.identity import published
    from ray_faceid.identity.face_plus import attach_image_encoder
    from ray_faceid.identity.personalization import load_personal
    from ray_faceid.registry import REFERENCE_CROP, Registry

    monkeypatch.setitem(published.FAMILY_OF_WIDTH, 32, "sd1")  # the tiny base's width stands for SD 1.x's
    analyzer = FaceAnalyzer(FaceConfig(recognizer_onnx=str(tiny_arcface_onnx)))
    save_like_a_user(tmp_path / "sd15")
    adapter = save(faceid_plus_state_dict(build_tiny().unet, embed=analyzer.spec.dim),
                   tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    registry = Registry(str(tmp_path / "registry"))
    references, embeddings = [], []
    for photo in ("Tom_Hanks_54745.png", "t1.jpg"):  # two references: each the target, the other its condition
        pixels = analyzer.load(sample_photos[photo])
        found = analyzer.analyze(pixels)[0]
        references.append(align(pixels, found.landmarks, loose_template(REFERENCE_CROP))[0])
        embeddings.append(found.embedding)
    hanks = registry.create("default", "hanks", "form-1", np.stack(embeddings), np.ones(2, np.float32), analyzer.spec,
                            references, [{"index": k, "filename": f"{k}.png", "accepted": True, "reason": None}
                                         for k in range(2)])["id"]
    command = ["personalize", "--adapter", adapter, "--model", str(tmp_path / "sd15"), "--registry", registry.store,
               "--steps", "3", "--size", "32", "--lr", "1e-2", "--json"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "give --image-encoder FOLDER" in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1
    done = CliRunner().invoke(app, [*command, "--image-encoder", str(image_encoder_folder)])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["trained"] == [hanks] and not summary["failed"], summary
    base = build_tiny()
    plus = IdentityAdapter.load(adapter, base.unet)
    attach_image_encoder(plus, str(image_encoder_folder), "cpu", "--image-encoder")
    record = registry.adapter_record("default", hanks, plus.content_hash())
    assert record["image_encoder"] == plus.image_encoder.sha256 and record["loss_end"] < record["loss_start"]
    personal = load_personal(registry, "default", hanks, plus.content_hash(), plus)
    # Not beside another image encoder (or none): the personal adapter learned this one's features.
    assert load_personal(registry, "default", hanks, plus.content_hash(), IdentityAdapter.load(adapter, base.unet)) is None
    features = plus.image_encoder.enrolled_features(registry.references("default", hanks))
    pipe = IdentityPipeline(base, plus)

    def image(own) -> np.ndarray:
        person = IdentityCondition("hanks", np.stack(embeddings), np.ones(2, np.float32), image_features=features,
                                   personal=own)
        return np.asarray(pipe.generate("a portrait", [person], seed=3, steps=2, width=32, height=32).images[0])

    assert np.abs(image(personal).astype(int) - image(None)).max() > 2  # the personal adapter reaches the image
    again = CliRunner().invoke(app, [*command, "--image-encoder", str(image_encoder_folder)])
    assert again.exit_code == 0 and json.loads(again.stdout[again.stdout.index("{"):])["skipped"] == [hanks]
    dataset = tmp_path / "dataset"  # an ingest output's summary: the check comes before its rows are read
    dataset.mkdir()
    (dataset / "summary.json").write_text('{"encoder_spec": {"name": "arcface"}}')
    trained = CliRunner().invoke(app, ["train", str(dataset), "--method", "imr", "--adapter", adapter, "--model",
                                       str(tmp_path / "sd15"), "--out", str(tmp_path / "imr")])
    assert trained.exit_code == 2 and "through a CLIP image encoder; training rows hold embeddings" in trained.stderr


def test_half_precision_tokens_of_the_zero_embedding_are_finite():
    """On a GPU the adapter runs in fp16; the unconditional rows take the tokens of a zero embedding,
    whose normalisation was 0/0 in fp16 (every image black)."""
    from ray_faceid.identity.face_plus import FacePlusMapper
    from ray_faceid.identity.tokens import IdProjector

    torch.manual_seed(0)
    zero = torch.zeros(1, EMBED, dtype=torch.float16)
    projector = IdProjector(EMBED, 32, 4).half()
    plus = FacePlusMapper(EMBED, 32, 4, 2 * EMBED, CLIP_WIDTH, 1, INNER, shortcut_scale=1.0).half()
    assert torch.isfinite(projector(zero)).all()
    assert torch.isfinite(plus(zero, torch.randn(1, 5, CLIP_WIDTH, dtype=torch.float16))).all()


def test_a_serve_config_with_a_compiled_portrait_or_plus_without_its_encoder_is_refused_when_it_is_read(tmp_path,
                                                                                                      monkeypatch,
                                                                                                      image_encoder_folder):
    """Serve's build refuses it in one line (ServeConfigRefused: once, no replica loads a base and
    fails in a loop); a plain FaceID file, and FaceID-Plus with its image encoder, pass."""
    from deployments.app import ServeConfigRefused, build_app
    from ray_faceid.config import ServeConfig

    monkeypatch.setenv("RAY_FACEID_API_TOKENS", "ops:0123456789abcdef0123")
    unet = build_tiny().unet
    registry = str(tmp_path / "registry")
    plus = save(faceid_plus_state_dict(unet), tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    portrait = save(faceid_state_dict(unet, tokens=16), tmp_path / "ip-adapter-faceid-portrait_sd15.bin")
    plain = save(faceid_state_dict(unet), tmp_path / "ip-adapter-faceid_sd15.bin")
    for config, refusal in (
        (ServeConfig(adapter=portrait, registry=registry, backend="tensorrt"),
         r"FaceID-Portrait.* a TensorRT plan holds one set: set backend torch, torch.compile or onnxruntime"),
        (ServeConfig(adapter=plus, registry=registry), "FaceID-PlusV2.* set image_encoder to its folder"),
        (ServeConfig(adapter=plus, image_encoder=str(tmp_path), registry=registry), "image_encoder: no CLIP image "
                                                                                     "encoder at"),
        (ServeConfig(adapter=plain, image_encoder=str(image_encoder_folder), registry=registry),
         "image_encoder is for IP-Adapter-FaceID-Plus"),
    ):
        with pytest.raises(ServeConfigRefused, match=refusal) as refused:
            build_app(config)
        assert "\n" not in str(refused.value)
    assert build_app(ServeConfig(adapter=plain, registry=registry)) is not None
    assert build_app(ServeConfig(adapter=portrait, registry=registry)) is not None  # on torch: per-photo tokens
    assert build_app(ServeConfig(adapter=portrait, registry=registry, backend="torch.compile")) is not None
    assert build_app(ServeConfig(adapter=plus, image_encoder=str(image_encoder_folder), registry=registry)) is not None
