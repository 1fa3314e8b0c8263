"""A photo read as PuLID-FLUX's pipeline reads it (identity/pulid_faces.py): the largest face's raw
ArcFace embedding, the face aligned to FFHQ's template, whitened outside the parser's face classes,
greyed inside, and EVA-CLIP's embedding and hidden states of that; then the file's IDFormer makes the
person's tokens, which reach the image. The encoders are toys of the published layouts (their
architectures are checked against their authors' code in tests/face/test_pulid_encoders.py); the
ArcFace is a stand-in recogniser behind dlib's detector (antelopev2's pack cannot be fetched here)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.face.pulid_encoder_recipe import EVA_TOY, REFERENCE, recipe_state

TINY_ARCFACE = 64  # tests/conftest.py's stand-in recogniser


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    """EVA-CLIP's and facexlib's file names, holding toy weights of their published layouts."""
    folder = tmp_path_factory.mktemp("pulid_encoders")
    reference = np.load(Path(__file__).parents[1] / "face" / REFERENCE)
    eva = json.loads(str(reference["eva_shapes"]))
    torch.save({f"visual.{k}": torch.from_numpy(v) for k, v in recipe_state(eva, seed=1).items()},
               folder / "EVA02_CLIP_L_336_psz14_s6B.pt")
    parser = json.loads(str(reference["parsing_shapes"]))
    state = {k: torch.from_numpy(v) for k, v in recipe_state(parser, seed=2).items()}
    state.update({k: torch.zeros((), dtype=torch.long) for k in parser if k.endswith("num_batches_tracked")})
    torch.save(state, folder / "parsing_bisenet.pth")
    return folder


@pytest.fixture(scope="module")
def reader(encoders, tiny_arcface_onnx):
    from ray_faceid.config import FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.identity.pulid_faces import PulidFaceReader

    # dlib's 68 points give the mouth corners the alignment needs (antelopev2's SCRFD gives five).
    analyzer = FaceAnalyzer(FaceConfig(recognizer_onnx=str(tiny_arcface_onnx), landmarks="dlib68"))
    return PulidFaceReader(str(encoders), analyzer)


def test_a_photo_becomes_the_features_pulids_idformer_reads(reader, sample_photos):
    from ray_faceid.face.decode import decode_image
    from ray_faceid.identity.instantid import FIVE_POINTS
    from ray_faceid.identity.pulid_faces import FFHQ_FIVE, align_ffhq

    photo = decode_image(sample_photos["Tom_Hanks_54745.png"])
    face = reader.analyzer.analyze(photo)[0]
    features = reader.read([photo, photo[:, ::-1].copy()], ["tom", "tom mirrored"])
    assert features.arcface.shape == (2, TINY_ARCFACE) and features.eva.shape == (2, EVA_TOY["embed_dim"])
    np.testing.assert_allclose(features.arcface[0].numpy(), face.embedding, rtol=1e-5)  # raw, as PuLID reads it
    assert [h.shape for h in features.hidden] == [(2, 1 + (EVA_TOY["image_size"] // 14) ** 2, EVA_TOY["width"])] * 5
    assert (features.eva[0] - features.eva[1]).abs().max() > 1e-4  # each photo its own
    # The face lands on FFHQ's template: least median of squares puts most of its five points within a
    # few pixels of it in the 512 crop (a turned face's nose and a mouth corner stay off).
    points = np.stack([face.landmarks.point(name) for name in FIVE_POINTS]).astype(np.float32)
    import cv2

    matrix = cv2.estimateAffinePartial2D(points, FFHQ_FIVE, method=cv2.LMEDS)[0]
    placed = points @ matrix[:, :2].T + matrix[:, 2]
    assert (np.linalg.norm(placed - FFHQ_FIVE, axis=1) < 12).sum() >= 3
    aligned = align_ffhq(photo, points)
    assert aligned.shape == (512, 512, 3) and aligned.std() > 20


def test_a_photo_over_1024_pixels_is_read_as_pulid_reads_it_shrunk_first(reader, sample_photos):
    """PuLID's app shrinks a photo to a long edge of 1024 (Lanczos) before its encoders see it: a
    1280-wide group photo reads as that shrunk copy does, not as a warp of the full photo would."""
    import cv2

    from ray_faceid.face.decode import decode_image

    photo = decode_image(sample_photos["t1.jpg"])
    height, width = photo.shape[:2]
    scale = 1024 / max(height, width)
    shrunk = cv2.resize(photo, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_LANCZOS4)
    full, small = reader.read([photo], ["group"]), reader.read([shrunk], ["group, shrunk"])
    assert torch.equal(full.eva, small.eva) and torch.equal(full.arcface, small.arcface)


def test_what_the_parser_calls_not_face_is_white_and_the_face_grey(reader, sample_photos, monkeypatch):
    from ray_faceid.face import eva_clip
    from ray_faceid.face.decode import decode_image

    def left_half_background(images):  # class 0 (background) on the left half, 1 (skin) on the right
        scores = torch.zeros(len(images), 19, *images.shape[2:])
        scores[:, 0, :, : images.shape[3] // 2] = 1
        scores[:, 1, :, images.shape[3] // 2:] = 1
        return scores

    seen = []
    monkeypatch.setattr(reader, "parser", left_half_background)
    hook = reader.eva.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        reader.read([decode_image(sample_photos["Tom_Hanks_54745.png"])], ["tom"])
    finally:
        hook.remove()
    std, mean = torch.tensor(eva_clip.STD).view(3, 1, 1), torch.tensor(eva_clip.MEAN).view(3, 1, 1)
    image = seen[0][0] * std + mean  # back to [0, 1]
    size = image.shape[-1]
    assert torch.allclose(image[:, :, : size // 2 - 2], torch.ones(()), atol=1e-4)  # white (bicubic's edge aside)
    right = image[:, :, size // 2 + 2:]
    assert torch.allclose(right[0], right[1], atol=1e-4) and torch.allclose(right[1], right[2], atol=1e-4)  # grey
    assert right.std() > 0.01  # the face's own shades


def test_each_parser_class_is_whitened_or_greyed_as_pulid_does(reader, sample_photos, monkeypatch):
    """Class by class, the 19 of CelebAMask-HQ: those PuLID's get_id_embedding lists as background
    (bg_label = [0, 16, 18, 7, 8, 9, 14, 15]: background, ears, earring, neck, necklace, cloth, hat) are
    white, the rest (skin, brows, eyes, glasses, nose, mouth, lips, hair) keep the face's grey."""
    from ray_faceid.face import eva_clip
    from ray_faceid.face.decode import decode_image

    photo = decode_image(sample_photos["Tom_Hanks_54745.png"])
    std, mean = torch.tensor(eva_clip.STD).view(3, 1, 1), torch.tensor(eva_clip.MEAN).view(3, 1, 1)
    whitened = set()
    for label in range(19):
        def only(images, label=label):
            scores = torch.zeros(len(images), 19, *images.shape[2:])
            scores[:, label] = 1
            return scores

        seen = []
        monkeypatch.setattr(reader, "parser", only)
        hook = reader.eva.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            reader.read([photo], ["tom"])
        finally:
            hook.remove()
        image = seen[0][0] * std + mean
        if torch.allclose(image, torch.ones(()), atol=1e-4):
            whitened.add(label)
        else:
            assert image.std() > 0.01, label  # the face's own grey shades
    assert whitened == {0, 16, 18, 7, 8, 9, 14, 15}


def test_pulids_file_makes_tokens_that_reach_the_image_and_other_widths_are_refused(reader, sample_photos, tmp_path):
    from ray_faceid.errors import BadInput
    from ray_faceid.face.decode import decode_image
    from ray_faceid.identity.pulid_flux import load_pulid_flux
    from ray_faceid.identity.stand_ins import pulid_state_dict
    from ray_faceid.pipelines.flux import build_tiny_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator
    from ray_faceid.pipelines.generate import IdentityCondition

    features = reader.read([decode_image(sample_photos["Tom_Hanks_54745.png"])], ["tom"])
    base = build_tiny_flux()
    save_file(pulid_state_dict(base.transformer, id_input=TINY_ARCFACE + EVA_TOY["embed_dim"],
                               vit_width=EVA_TOY["width"]), str(tmp_path / "pulid.safetensors"))
    adapter = load_pulid_flux(str(tmp_path / "pulid.safetensors"), base.transformer)
    tokens = adapter.tokens_of(features, "tom")
    assert tokens.shape == (1, adapter.tokens_per_person, adapter.width) and np.isfinite(tokens).all()
    generator = FluxGenerator(base, adapter)

    def image(people):
        return np.asarray(generator.generate("a portrait", people, seed=3, steps=2).images[0]).astype(int)

    assert np.abs(image([IdentityCondition("tom", tokens)]) - image([])).max() > 2
    save_file(pulid_state_dict(build_tiny_flux().transformer), str(tmp_path / "other.safetensors"))  # 16 + 8 wide
    other = load_pulid_flux(str(tmp_path / "other.safetensors"), build_tiny_flux().transformer)
    with pytest.raises(BadInput, match="reads an ArcFace \\+ EVA-CLIP embedding of 24"):
        other.tokens_of(features, "tom")


def test_a_recogniser_other_than_antelopev2s_is_said(encoders, reader, caplog):
    """Any 512-d ArcFace would run (buffalo_l's w600k_r50, say), but the file's IDFormer was trained
    on glintr100's embeddings: said when the reader starts, not silently accepted."""
    from ray_faceid.identity.pulid_faces import PulidFaceReader

    with caplog.at_level("WARNING"):
        PulidFaceReader(str(encoders), reader.analyzer)
    assert "trained on antelopev2's ArcFace (glintr100.onnx)" in caplog.text
    assert reader.analyzer.spec.version.split("@")[0] in caplog.text


def test_a_folder_without_the_encoders_is_named_in_one_line(tmp_path, tiny_arcface_onnx):
    from ray_faceid.errors import BadInput
    from ray_faceid.identity.pulid_faces import PulidFaceReader

    with pytest.raises(BadInput, match="has no EVA02_CLIP_L_336_psz14_s6B.pt"):
        PulidFaceReader(str(tmp_path), analyzer=None)


def test_generate_reads_a_photo_for_pulid_as_the_tokens_it_makes(reader, encoders, sample_photos, tmp_path,
                                                                 tiny_arcface_onnx, monkeypatch):
    """`ray-faceid generate --adapter PULID --image-encoder FOLDER --insightface-root PACK --ref PHOTO`:
    the image equals the one made from the same photo's tokens given as --face-embedding. The pack's
    detector is dlib's here (no SCRFD offline): the command's face stack is swapped for the test's."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app, faces
    from ray_faceid.config import FaceConfig
    from ray_faceid.face.decode import decode_image
    from ray_faceid.identity.pulid_flux import load_pulid_flux
    from ray_faceid.identity.stand_ins import pulid_state_dict
    from ray_faceid.pipelines.flux import build_tiny_flux, save_flux
    from ray_faceid.pipelines.provenance import read_provenance

    base = build_tiny_flux()
    save_flux(base, tmp_path / "flux")
    pulid = str(tmp_path / "pulid_flux_v0.9.1.safetensors")
    save_file(pulid_state_dict(base.transformer, id_input=TINY_ARCFACE + EVA_TOY["embed_dim"],
                               vit_width=EVA_TOY["width"]), pulid)
    photo = str(sample_photos["Tom_Hanks_54745.png"])
    tokens = load_pulid_flux(pulid, build_tiny_flux().transformer).tokens_of(
        reader.read([decode_image(photo)], ["tom"]), "tom")
    np.save(tmp_path / "tom_tokens.npy", tokens)
    monkeypatch.setattr(faces, "face_config", lambda *args, **kwargs: FaceConfig(recognizer_onnx=str(tiny_arcface_onnx),
                                                                                   landmarks="dlib68"))
    common = ["generate", "--model", str(tmp_path / "flux"), "--adapter", pulid, "--prompt", "a portrait", "--steps",
              "2", "--seed", "3"]
    read = CliRunner().invoke(app, [*common, "--image-encoder", str(encoders), "--insightface-root", str(tmp_path),
                                    "--ref", photo, "--out", str(tmp_path / "read.png")])
    assert read.exit_code == 0, read.output
    given = CliRunner().invoke(app, [*common, "--face-embedding", str(tmp_path / "tom_tokens.npy"), "--out",
                                     str(tmp_path / "given.png")])
    assert given.exit_code == 0, given.output
    from PIL import Image

    assert np.abs(np.asarray(Image.open(tmp_path / "read.png")).astype(int)
                  - np.asarray(Image.open(tmp_path / "given.png")).astype(int)).max() <= 1
    record = read_provenance((tmp_path / "read.png").read_bytes())
    assert record["image_encoder"] == reader.sha256  # what read the photo: the encoders' weights hash
    assert record["identities"][0]["embeddings_encoder"] == reader.analyzer.spec.key()
    refused = CliRunner().invoke(app, [*common, "--image-encoder", str(encoders), "--ref", photo, "--out",
                                       str(tmp_path / "x.png")])
    said = " ".join(refused.stderr.split())
    assert refused.exit_code == 2 and "give --insightface-root PACK" in said and "give --image-encoder" not in said, said
    # Readers given with no photo to read: they would be loaded for nothing (a traceback before).
    refused = CliRunner().invoke(app, [*common, "--insightface-root", str(tmp_path), "--face-embedding",
                                       str(tmp_path / "tom_tokens.npy"), "--out", str(tmp_path / "x.png")])
    said = " ".join(refused.stderr.split())
    assert refused.exit_code == 2 and "--insightface-root reads photos for PuLID-FLUX" in said, refused.output
    # An enrolled person: the reference crops the registry keeps, read the same way.
    registry = ["--registry", str(tmp_path / "registry")]
    enrolled = CliRunner().invoke(app, ["identities", "enroll", photo, "--name", "tom", "--consent", "licence (test)",
                                        *registry])
    assert enrolled.exit_code == 0, enrolled.output
    made = CliRunner().invoke(app, [*common, "--image-encoder", str(encoders), "--insightface-root", str(tmp_path),
                                    "--identity", "tom", *registry, "--out", str(tmp_path / "enrolled.png")])
    assert made.exit_code == 0, made.output
    from ray_faceid.registry import Registry

    store = Registry(str(tmp_path / "registry"))
    crops = store.references("default", store.resolve("default", "tom"))
    np.save(tmp_path / "crop_tokens.npy", load_pulid_flux(pulid, build_tiny_flux().transformer).tokens_of(
        reader.read(crops, ["tom"] * len(crops)), "tom"))
    given = CliRunner().invoke(app, [*common, "--face-embedding", str(tmp_path / "crop_tokens.npy"), "--out",
                                     str(tmp_path / "crop_given.png")])
    assert given.exit_code == 0, given.output
    assert np.abs(np.asarray(Image.open(tmp_path / "enrolled.png")).astype(int)
                  - np.asarray(Image.open(tmp_path / "crop_given.png")).astype(int)).max() <= 1


def test_render_reads_an_enrolled_person_for_pulid_as_generate_does(reader, encoders, sample_photos, tmp_path,
                                                                    tiny_arcface_onnx, ray_cluster):
    """A catalog row naming an enrolled person: their reference crops read by PuLID's encoders in the
    render actor, the image equal to the generator's on the tokens of the same crops."""
    from PIL import Image
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.config import FaceConfig, RenderConfig
    from ray_faceid.data.render import run_render
    from ray_faceid.errors import BadInput, UnsupportedModel
    from ray_faceid.identity.pulid_flux import load_pulid_flux
    from ray_faceid.identity.stand_ins import pulid_state_dict
    from ray_faceid.pipelines.flux import build_tiny_flux, save_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.registry import Registry

    registry = str(tmp_path / "registry")
    enrolled = CliRunner().invoke(app, ["identities", "enroll", str(sample_photos["Tom_Hanks_54745.png"]), "--name",
                                        "tom", "--consent", "licence (test)", "--registry", registry])
    assert enrolled.exit_code == 0, enrolled.output
    base = build_tiny_flux()
    save_flux(base, tmp_path / "flux")
    pulid = str(tmp_path / "pulid_flux_v0.9.1.safetensors")
    save_file(pulid_state_dict(base.transformer, id_input=TINY_ARCFACE + EVA_TOY["embed_dim"],
                               vit_width=EVA_TOY["width"]), pulid)
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "tom", "identities": ["tom"], "prompt": "a portrait", "seed": 5}) + "\n")
    config = RenderConfig(steps=2, size="32x32", workers=1,
                          face=FaceConfig(recognizer_onnx=str(tiny_arcface_onnx), landmarks="dlib68"))
    summary = run_render(str(catalog), str(tmp_path / "out"), str(tmp_path / "flux"), registry, pulid, config,
                         image_encoder=str(encoders))
    assert summary["rendered"] == 1 and not summary["errors"], summary["errors"]
    store = Registry(registry)
    crops = store.references("default", store.resolve("default", "tom"))
    adapter = load_pulid_flux(pulid, base.transformer)
    tokens = adapter.tokens_of(reader.read(crops, ["tom"] * len(crops)), "tom")
    want = FluxGenerator(base, adapter).generate("a portrait", [IdentityCondition("tom", tokens)], seed=5, steps=2,
                                                 width=32, height=32).images[0]
    got = next((tmp_path / "out" / "images").rglob("*.png"))
    assert np.abs(np.asarray(Image.open(got)).astype(int) - np.asarray(want).astype(int)).max() <= 1
    with pytest.raises(BadInput, match="give --image-encoder FOLDER"):  # before Ray, not in every row
        run_render(str(catalog), str(tmp_path / "out2"), str(tmp_path / "flux"), registry, pulid, config)
    (tmp_path / "no_encoders").mkdir()
    with pytest.raises(BadInput, match="has no EVA02_CLIP_L_336_psz14_s6B.pt"):  # before Ray too
        run_render(str(catalog), str(tmp_path / "out3"), str(tmp_path / "flux"), registry, pulid, config,
                   image_encoder=str(tmp_path / "no_encoders"))
    # A damaged parser, a PuLID file cut short, a stack without mouth corners: before Ray, not per actor.
    damaged = tmp_path / "damaged_encoders"
    damaged.mkdir()
    (damaged / "EVA02_CLIP_L_336_psz14_s6B.pt").write_bytes((encoders / "EVA02_CLIP_L_336_psz14_s6B.pt").read_bytes())
    (damaged / "parsing_bisenet.pth").write_bytes((encoders / "parsing_bisenet.pth").read_bytes()[:5000])
    (tmp_path / "cut.safetensors").write_bytes(Path(pulid).read_bytes()[:-100])
    five_points = config.model_copy(update={"face": FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))})
    for settings, adapter, encoder_folder, says in (
            (config, pulid, damaged, "not a readable face parser"),
            (config, str(tmp_path / "cut.safetensors"), encoders, "cut short"),
            (five_points, pulid, encoders, "landmarks dlib68")):
        with pytest.raises((BadInput, UnsupportedModel), match=says):
            run_render(str(catalog), str(tmp_path / "out4"), str(tmp_path / "flux"), registry, adapter, settings,
                       image_encoder=str(encoder_folder))
    assert not (tmp_path / "out4" / "images").exists()


def test_a_serve_replica_reads_enrolled_people_for_pulid_as_render_does(reader, encoders, sample_photos, tmp_path,
                                                                       tiny_arcface_onnx):
    """A FLUX Generator replica serving PuLID-FLUX (from a config resolve_config accepted): each
    request's enrolled person read by its encoders from their reference crops, each image equal to the
    generator's on the same crops' tokens; a config without the encoders is refused when read."""
    import asyncio
    import base64
    import io
    import threading

    from PIL import Image

    from deployments.app import resolve_config
    from deployments.flux_generator import FluxServeGenerator
    from ray_faceid.config import FaceConfig, ServeConfig
    from ray_faceid.errors import BadInput
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.face.clip_image import face_crop
    from ray_faceid.identity.stand_ins import pulid_state_dict
    from ray_faceid.pipelines.flux import build_tiny_flux, save_flux
    from ray_faceid.pipelines.generate import IdentityCondition
    from ray_faceid.registry import Registry

    base = build_tiny_flux()
    save_flux(base, tmp_path / "flux")
    pulid = str(tmp_path / "pulid_flux_v0.9.1.safetensors")
    save_file(pulid_state_dict(base.transformer, id_input=TINY_ARCFACE + EVA_TOY["embed_dim"],
                               vit_width=EVA_TOY["width"]), pulid)
    registry, analyzer = Registry(str(tmp_path / "registry")), FaceAnalyzer()
    people = {}
    for name, photo in (("ann", "Tom_Hanks_54745.png"), ("bob", "t1.jpg")):
        picture = analyzer.load(sample_photos[photo])
        face = analyzer.analyze(picture)[0]
        crop = face_crop(picture, face.landmarks)[..., ::-1]  # a face a detector finds again, as enrolled crops are
        people[name] = registry.create("acme", name, f"form-{name}", face.embedding[None], np.ones(1, np.float32),
                                       analyzer.spec, [np.ascontiguousarray(crop)], [])["id"]
    tokens = {"acme": "acme-token-0123456789abcdef"}
    face = FaceConfig(recognizer_onnx=str(tiny_arcface_onnx), landmarks="dlib68")
    config = ServeConfig(model=str(tmp_path / "flux"), adapter=pulid, image_encoder=str(encoders), face=face,
                         registry=registry.store, api_tokens=tokens)
    # Each refused when the config is read, not by every replica in a loop: files' layouts from their
    # names and shapes alone (a file cut short, another base's width, a tower missing a weight).
    (tmp_path / "cut.safetensors").write_bytes(Path(pulid).read_bytes()[:-100])
    (tmp_path / "trailing.safetensors").write_bytes(Path(pulid).read_bytes() + bytes(16))  # safetensors refuses it too
    from types import SimpleNamespace

    wider = SimpleNamespace(config=SimpleNamespace(num_attention_heads=3, attention_head_dim=16),
                            transformer_blocks=[0], single_transformer_blocks=[0])  # a 48-wide transformer's shape
    save_file(pulid_state_dict(wider), str(tmp_path / "wide.safetensors"))
    damaged = tmp_path / "damaged_encoders"
    damaged.mkdir()
    (damaged / "parsing_bisenet.pth").write_bytes((encoders / "parsing_bisenet.pth").read_bytes())
    eva = torch.load(encoders / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True)
    torch.save({k: v for k, v in eva.items() if k != "visual.blocks.3.mlp.w3.weight"},
               damaged / "EVA02_CLIP_L_336_psz14_s6B.pt")
    for change, says in (({"face": FaceConfig()}, "face: PuLID-FLUX reads people's ArcFace embedding"),
                         ({"face": FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))}, "face.landmarks dlib68"),
                         ({"image_encoder": str(tmp_path)}, "has no EVA02_CLIP_L_336_psz14_s6B.pt"),
                         ({"image_encoder": str(damaged)}, "image_encoder: .* is not EVA02-CLIP's vision tower .*w3"),
                         ({"adapter": str(tmp_path / "cut.safetensors")}, "adapter: .*cut short"),
                         ({"adapter": str(tmp_path / "trailing.safetensors")}, "adapter: .*damaged"),
                         ({"adapter": str(tmp_path / "wide.safetensors")}, "adapter: .*PuLID-FLUX for a 48-wide")):
        with pytest.raises(BadInput, match=says):
            resolve_config(config.model_copy(update=change))
    generator = FluxServeGenerator(resolve_config(config).model_dump_json())
    assert "PuLID-FLUX" in generator.defaults()["served"] and generator.info()["image_encoder"] == reader.sha256
    generator.load_identity = generator._load_identity  # Serve's multiplexing needs a replica context

    def request(person: str, seed: int, start: int = 0) -> dict:
        return {"kind": "generate", "tenant": "acme", "identities": [{"id": people[person]}], "prompt": "a portrait",
                "negative_prompt": "", "seed": seed, "num_images": 1, "steps": 2, "guidance": 3.5, "width": 32,
                "height": 32, "cancelled": threading.Event(), "identity_start": start}

    # bob's identity from the second step (PuLID's start_step), in the same batch as ann's from the first;
    # a start past the request's steps is that request's own 422.
    answers = asyncio.run(generator._generate_group([request("ann", 3), request("bob", 4, 1), request("bob", 5, 2)]))
    assert answers[2]["status"] == 422 and "past the last of 2 steps: give a step from 0 to 1" in answers[2]["message"]
    for answer, name, seed, start in zip(answers, ("ann", "bob"), (3, 4), (0, 1)):
        assert "error" not in answer and "status" not in answer, answer
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
        crops = registry.references("acme", people[name])
        want_tokens = generator.pipeline.adapter.tokens_of(reader.read(crops, [name]), name)
        want = generator.pipeline.generate("a portrait", [IdentityCondition(name, want_tokens)], seed=seed, steps=2,
                                           width=32, height=32, identity_start=start).images[0]
        assert np.abs(got - np.asarray(want).astype(int)).max() <= 1, name
