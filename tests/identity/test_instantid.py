"""InstantID from its published parts: `ip-adapter.bin` (a resampler over the raw ArcFace embedding
and identity attention) built at toy size in the authors' key layout, and IdentityNet, a ControlNet
folder saved by diffusers. With the same embedding, keypoints, seed and scheduler the image equals
diffusers' SDXL ControlNet pipeline with that file loaded by `load_ip_adapter` and the ControlNet
fed the face tokens in place of the text (as InstantID's reference pipeline feeds it)."""
import numpy as np
import pytest
import torch

from ray_faceid.errors import BadInput, NotFound, UnsupportedModel
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.adapter import IdentityAdapter
from ray_faceid.identity.instantid import IdentityNet, keypoint_image
from ray_faceid.identity.stand_ins import instantid_state_dict, save_identitynet
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.models import build_tiny

EMBED = 16  # antelopev2 gives 512-d; InstantID reads it raw (not unit length)
SPEC = EncoderSpec(name="arcface_glintr100", dim=EMBED, version="test", license="-", metric="cosine", threshold=0.6)
SIZE = 64
POSE = np.array([[0.35, 0.4], [0.62, 0.38], [0.5, 0.55], [0.4, 0.7], [0.6, 0.72]])  # a face turned a little


def face(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(1, EMBED)).astype(np.float32)
    return 20 * v / np.linalg.norm(v)  # insightface's raw ArcFace norms are around 20


def diffusers_image(folder, net_folder, embedding, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """InstantID's path through diffusers' own code: StableDiffusionXLControlNetPipeline, the adapter by
    load_ip_adapter (its resampler as IPAdapterPlusImageProjection), the ControlNet reading the face
    tokens of that projection (zero embedding's for the unconditional rows) in place of the text."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    class FaceTokenControlNet(ControlNetModel):
        face_tokens = None

        def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
            return super().forward(sample, timestep, self.face_tokens, *args, **kwargs)

    base = build_tiny(family="sdxl")
    net = FaceTokenControlNet.from_pretrained(net_folder)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=net, scheduler=base.scheduler, add_watermarker=False)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.bin", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    embeds = torch.cat([torch.zeros(1, 1, 1, EMBED), torch.from_numpy(embedding)[None, None]])  # negative, then the face
    with torch.no_grad():
        net.face_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](embeds[:, 0])
    image = pipe("a portrait photo", image=keypoint_image(POSE * SIZE, SIZE, SIZE), num_inference_steps=3,
                 guidance_scale=5.0, controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(seed),
                 ip_adapter_image_embeds=[embeds], output_type="np", width=SIZE, height=SIZE).images[0]
    return np.round(image * 255).astype(int), net.face_tokens


def test_instantid_gives_the_image_of_diffusers_controlnet_pipeline_with_its_parts(tmp_path, caplog):
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    base = build_tiny(family="sdxl")
    path = tmp_path / "ip-adapter.bin"
    torch.save(instantid_state_dict(base.unet), path)
    net_folder = save_identitynet(base.unet, tmp_path / "ControlNetModel")
    with caplog.at_level("WARNING"):
        adapter = IdentityAdapter.load(str(path), base.unet, SPEC)
    assert "recognised InstantID (InstantID, with its IdentityNet): 4 identity tokens from 16-d" in caplog.text
    adapter.identitynet = IdentityNet(net_folder, base.unet, scale=0.8)
    pipe = IdentityPipeline(base, adapter)
    images = {}
    for seed, person in ((11, 1), (12, 2)):
        condition = IdentityCondition("p", face(person), scale=0.8, pose=POSE)
        got = np.asarray(pipe.generate("a portrait photo", [condition], seed=seed, steps=3, guidance=5.0,
                                       width=SIZE, height=SIZE).images[0]).astype(int)
        want, tokens = diffusers_image(tmp_path, net_folder, face(person), seed)
        ours = adapter.tokens(torch.from_numpy(np.concatenate([np.zeros_like(face(person)), face(person)])))
        torch.testing.assert_close(ours, tokens, atol=1e-5, rtol=1e-5)  # the resampler, part by part
        assert np.abs(got - want).max() <= 1, (seed, np.abs(got - want).max())
        images[person] = got
    assert np.abs(images[1] - images[2]).max() > 2  # the identity reaches the image
    record = pipe.generate("a portrait photo", [IdentityCondition("p", face(1), pose=POSE)], seed=1, steps=1,
                           width=SIZE, height=SIZE).provenance[0]
    assert record["adapter_published"]["kind"] == "InstantID" and "non-commercial" in record["adapter_published"]["licence"]
    assert record["identitynet"]["weights_sha256"] == adapter.identitynet.sha256 and record["identitynet"]["scale"] == 0.8
    # IdentityNet's residuals reach the image: without them (scale 0) it is another image.
    adapter.identitynet.scale = 0.0
    plain = np.asarray(pipe.generate("a portrait photo", [IdentityCondition("p", face(1), scale=0.8, pose=POSE)],
                                     seed=11, steps=3, guidance=5.0, width=SIZE, height=SIZE).images[0]).astype(int)
    assert np.abs(plain - images[1]).max() > 2


def test_the_keypoint_image_is_drawn_as_identitynet_was_trained_on_it():
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    points = np.array([[60, 80], [140, 80], [100, 120], [70, 160], [130, 160]], float)
    image = np.asarray(keypoint_image(points, 200, 220))
    assert image.shape == (220, 200, 3)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(points.astype(int), colours):
        assert tuple(image[y, x]) == colour  # a full-colour disc on each point
    # Half way from the right eye to the nose: the limb in the eye's colour at 60 %.
    assert tuple(image[100, 80]) == (153, 0, 0)
    assert image[5, 5].sum() == 0  # black elsewhere


def test_instantid_without_its_parts_or_on_another_path_is_refused_in_one_line(tmp_path):
    base = build_tiny(family="sdxl")
    path = tmp_path / "ip-adapter.bin"
    torch.save(instantid_state_dict(base.unet), path)
    adapter = IdentityAdapter.load(str(path), base.unet, SPEC)
    pipe = IdentityPipeline(base, adapter)
    person = IdentityCondition("p", face(1), pose=POSE)
    with pytest.raises(BadInput, match="give --identitynet FOLDER"):
        pipe.generate("a portrait photo", [person], steps=1, width=SIZE, height=SIZE)
    with pytest.raises(NotFound, match="no IdentityNet at .*config.json and diffusion_pytorch_model"):
        IdentityNet(str(tmp_path), base.unet)
    sd1 = build_tiny()
    net_folder = save_identitynet(sd1.unet, tmp_path / "sd1_controlnet")
    with pytest.raises(UnsupportedModel, match="cross_attention_dim 32; this base's UNet has 64"):
        IdentityNet(net_folder, base.unet)
    adapter.identitynet = IdentityNet(save_identitynet(base.unet, tmp_path / "ControlNetModel"), base.unet)
    import json

    from ray_faceid.identity.instantid import identitynet_config

    other = json.loads((tmp_path / "ControlNetModel" / "config.json").read_text())
    (tmp_path / "other_layout").mkdir()
    (tmp_path / "other_layout" / "config.json").write_text(json.dumps(dict(other, layers_per_block=2)))
    (tmp_path / "other_layout" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="layers_per_block 2; this base's UNet has 1"):  # not mid-denoise
        identitynet_config(str(tmp_path / "other_layout"), base.unet.config)
    with pytest.raises(BadInput, match=r"one person per image \(got 2\)"):
        pipe.generate("two", [person, IdentityCondition("q", face(2))], steps=1, width=SIZE, height=SIZE)
    with pytest.raises(BadInput, match="IdentityNet draws the face at every step"):  # not a start it ignores
        pipe.generate("a portrait photo", [person], steps=2, width=SIZE, height=SIZE, identity_start=1)
    with pytest.raises(BadInput, match="TensorRT plans do not take its residuals yet"):
        IdentityPipeline(base, adapter, backend="tensorrt")


def test_one_command_from_instantids_files_an_embedding_and_a_pose_photo(tmp_path, sample_photos):
    """README's InstantID row with tiny stand-ins: an SDXL folder as diffusers saves it, ip-adapter.bin,
    the IdentityNet folder, an embedding made elsewhere and a photo giving the pose."""
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    from diffusers import StableDiffusionXLPipeline
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.pipelines.provenance import read_provenance

    base = build_tiny(family="sdxl")
    StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                              tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                              scheduler=base.scheduler, add_watermarker=False).save_pretrained(tmp_path / "sdxl")
    torch.save(instantid_state_dict(base.unet), tmp_path / "ip-adapter.bin")
    net_folder = save_identitynet(base.unet, tmp_path / "ControlNetModel")
    np.save(tmp_path / "ann.npy", face(1))
    command = ["generate", "--model", str(tmp_path / "sdxl"), "--adapter", str(tmp_path / "ip-adapter.bin"),
               "--face-embedding", str(tmp_path / "ann.npy"), "--prompt", "a portrait", "--size", "64x64",
               "--steps", "2", "--out", str(tmp_path / "ann.png")]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "give --identitynet FOLDER" in refused.stderr, refused.output
    posed = CliRunner().invoke(app, command + ["--identitynet", net_folder, "--pose", str(sample_photos["Tom_Hanks_54745.png"])])
    assert posed.exit_code == 0, posed.output
    record = read_provenance((tmp_path / "ann.png").read_bytes())
    assert record["adapter_published"]["kind"] == "InstantID" and record["identitynet"]["scale"] == 0.8
    frontal = CliRunner().invoke(app, command + ["--identitynet", net_folder, "--out", str(tmp_path / "front.png")])
    assert frontal.exit_code == 0 and "a frontal face in the middle" in frontal.stderr, frontal.output
    assert (tmp_path / "front.png").read_bytes() != (tmp_path / "ann.png").read_bytes()  # the pose reached the image


def engine_and_eager(tmp_path, backend: str):
    """InstantID's files at toy size and two pipelines over them: on `backend`, and eager (torch)."""
    from ray_faceid.engines.cache import EngineCache
    from ray_faceid.identity.instantid import attach_identitynet

    torch.save(instantid_state_dict(build_tiny(family="sdxl").unet), tmp_path / "ip-adapter.bin")
    net_folder = save_identitynet(build_tiny(family="sdxl").unet, tmp_path / "ControlNetModel", keypoint_weight=2.0)

    def pipeline(backend):
        base = build_tiny(family="sdxl")
        adapter = IdentityAdapter.load(str(tmp_path / "ip-adapter.bin"), base.unet, SPEC)
        pipe = IdentityPipeline(base, adapter, backend=backend, engine_cache=EngineCache(tmp_path / "engines"))
        attach_identitynet(pipe, net_folder, 0.8, "--identitynet")
        return pipe

    return pipeline(backend), pipeline("torch")


def images_of_two_people_and_two_poses(engine, eager) -> set[bytes]:
    """Each image on `engine` within 1/255 of eager's; the set of distinct images."""
    images = set()
    for person in (IdentityCondition("ann", face(1), pose=POSE), IdentityCondition("bob", face(2), pose=POSE),
                   IdentityCondition("ann, frontal", face(1))):
        got, want = (np.asarray(p.generate("a portrait photo", [person], seed=5, steps=2, guidance=5.0, width=SIZE,
                                           height=SIZE).images[0]).astype(int) for p in (engine, eager))
        assert np.abs(got - want).max() <= 1, person.name
        images.add(got.tobytes())
    return images


def test_the_compiled_engine_runs_instantid_with_identitynet_in_its_graph(tmp_path):
    """torch.compile with InstantID: IdentityNet compiled into the UNet's graph, the person's tokens and
    each row's keypoint image its live inputs. After one warm-up, two people and two poses run the
    compiled graph at every step with 0 recompiles, each eager's image within 1/255."""
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    compiled, eager = engine_and_eager(tmp_path, "torch.compile")
    assert compiled.warm_up([(SIZE, SIZE)], [1], max_images=1)["buckets"] == 1
    compiled.compile_new_shapes = False  # as on Serve: a shape the warm-up missed would run eager, not compile
    engine = compiled.compiled_engine()
    graph, calls = engine.compiled, []
    engine.compiled = lambda **inputs: calls.append(sorted(inputs)) or graph(**inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = images_of_two_people_and_two_poses(compiled, eager)
    assert len(calls) == 3 * 2 and all("control_image" in names for names in calls)  # every step in the graph
    assert len(images) == 3  # each person and each pose reaches the image


def test_compile_builds_instantids_engine_with_its_identitynet_and_refuses_it_without(tmp_path):
    """`ray-faceid compile` of InstantID builds what a replica serves (IdentityNet in the graph), compiled
    or exported to ONNX: without --identitynet one line saying to give it."""
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    from diffusers import StableDiffusionXLPipeline
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    base = build_tiny(family="sdxl")
    StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                              tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                              scheduler=base.scheduler, add_watermarker=False).save_pretrained(tmp_path / "sdxl")
    torch.save(instantid_state_dict(base.unet, embed=512), tmp_path / "ip-adapter.bin")
    net_folder = save_identitynet(base.unet, tmp_path / "ControlNetModel")
    command = ["compile", "--out", str(tmp_path / "engines"), "--model", str(tmp_path / "sdxl"), "--adapter",
               str(tmp_path / "ip-adapter.bin"), "--size", "64x64", "--batch", "2"]
    refused = CliRunner().invoke(app, command + ["--backend", "torch.compile"])
    assert refused.exit_code == 2 and "give --identitynet FOLDER" in refused.stderr, refused.output
    built = CliRunner().invoke(app, command + ["--backend", "torch.compile", "--identitynet", net_folder])
    said = " ".join(built.stdout.split())  # what it built, as a Serve config must ask for it
    assert built.exit_code == 0 and "compiled 1 batch buckets for 64x64, 1 identity an image, IdentityNet at scale 0.8" \
        in said, built.output
    assert f"set RAY_FACEID_CACHE={tmp_path.resolve()} where they run" in said  # how commands find them
    pytest.importorskip("onnxruntime")
    exported = CliRunner().invoke(app, command + ["--backend", "onnx", "--identitynet", net_folder])
    assert exported.exit_code == 0 and "onnx engines ready: 1" in exported.stdout, exported.output
    from ray_faceid.engines.select import adapter_structure

    # What compile built is what a replica with insightface's encoder looks up (the engine takes tokens).
    compiled, replica = (IdentityAdapter.load(str(tmp_path / "ip-adapter.bin"), base.unet, spec)
                         for spec in (None, SPEC.model_copy(update={"dim": 512})))
    assert adapter_structure(compiled) == adapter_structure(replica)


def test_onnxruntime_runs_instantid_with_identitynet_in_the_exported_graph(tmp_path):
    """ONNX export with InstantID: IdentityNet exported into the UNet's graph, the keypoint image an input
    beside the tokens; two people and two poses on one graph give eager's images within 1/255."""
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    pytest.importorskip("onnxruntime")
    exported, eager = engine_and_eager(tmp_path, "onnxruntime")
    assert len(images_of_two_people_and_two_poses(exported, eager)) == 3  # each person and pose reaches the image
    assert len(exported.engines) == 1  # one graph: the people and poses are its inputs
    assert len(list((tmp_path / "engines").rglob("unet.onnx"))) == 1


def test_inpaint_with_instantid_puts_the_face_where_the_mask_is(tmp_path):
    """InstantID inpaint: IdentityNet reads a frontal face filling the mask's box where no pose is given
    (the same image as that pose given), another pose gives another face; outside the mask, unchanged."""
    pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
    from ray_faceid.identity.instantid import attach_identitynet, box_points
    from ray_faceid.pipelines.inpaint import inpaint

    base = build_tiny(family="sdxl")
    torch.save(instantid_state_dict(base.unet), tmp_path / "ip-adapter.bin")
    adapter = IdentityAdapter.load(str(tmp_path / "ip-adapter.bin"), base.unet, SPEC)
    pipe = IdentityPipeline(base, adapter)
    attach_identitynet(pipe, save_identitynet(base.unet, tmp_path / "ControlNetModel", keypoint_weight=2.0), 0.8,
                       "--identitynet")
    photo = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:56, 12:52] = 255

    def painted(pose) -> np.ndarray:
        person = IdentityCondition("ann", face(1), pose=pose)
        return np.asarray(inpaint(pipe, photo, mask, person, "a face", seed=2, steps=2).images[0]).astype(int)

    in_the_mask = painted(None)
    assert np.array_equal(in_the_mask, painted(box_points((12, 8, 52, 56), SIZE, SIZE)))
    assert np.abs(in_the_mask - painted(POSE)).max() > 2  # IdentityNet reads where the face goes
    assert np.array_equal(in_the_mask[mask == 0], photo[mask == 0])
    # An inpainting base (9 input channels): the same IdentityNet reads its 4 latent channels.
    inpainting = build_tiny(family="sdxl", inpainting=True)
    pipe = IdentityPipeline(inpainting, IdentityAdapter.load(str(tmp_path / "ip-adapter.bin"), inpainting.unet, SPEC))
    attach_identitynet(pipe, str(tmp_path / "ControlNetModel"), 0.8, "--identitynet")
    assert np.array_equal(painted(None)[mask == 0], photo[mask == 0])
