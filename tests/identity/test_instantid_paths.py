"""InstantID beyond `generate`: render and Serve run it on enrolled people. Each catalog row or request
gives its own pose (the face's five keypoints) or gets a frontal face; rows and requests of different
people share one UNet batch and each image equals `generate` on the same embedding and pose; two
people in one image fail that row or request alone. Tiny SDXL folder as diffusers saves it, InstantID's
ip-adapter.bin and IdentityNet at toy size, an ArcFace-shaped ONNX recogniser."""
import asyncio
import base64
import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.identity.test_instantid import POSE, instantid_state_dict, save_identitynet

pytest.importorskip("cv2", reason="IdentityNet's keypoint image is drawn with OpenCV (the insightface extra)")
SIZE, STEPS, GUIDANCE = 64, 2, 5.0  # 64 px: room for the keypoints (10 px discs) to differ
TOKENS = {"acme": "acme-token-0123456789abcdef"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_arcface_onnx):
    """The user's files (an SDXL folder, ip-adapter.bin, IdentityNet) and a registry holding two people."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ray_faceid.config import FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.pipelines.models import build_tiny
    from ray_faceid.registry import REFERENCE_CROP, Registry

    root = tmp_path_factory.mktemp("instantid")
    base = build_tiny(family="sdxl")
    StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                              tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                              scheduler=base.scheduler, add_watermarker=False).save_pretrained(root / "sdxl")
    face_config = FaceConfig(recognizer_onnx=str(tiny_arcface_onnx))
    spec = FaceAnalyzer(face_config).spec
    torch.save(instantid_state_dict(base.unet, embed=spec.dim), root / "ip-adapter.bin")
    registry = Registry(str(root / "registry"))
    crop = np.zeros((REFERENCE_CROP, REFERENCE_CROP, 3), np.uint8)
    taken = [{"index": 0, "filename": "0.png", "accepted": True, "reason": None}]
    people = {}
    for k, name in enumerate(("ann", "bob")):
        v = np.random.default_rng(k).normal(size=(1, spec.dim)).astype(np.float32)
        embedding = 20 * v / np.linalg.norm(v)  # raw ArcFace norms are around 20
        people[name] = (registry.create("acme", name, f"form-{name}", embedding, np.ones(1, np.float32), spec,
                                        [crop], taken)["id"], embedding)
    return SimpleNamespace(sdxl=str(root / "sdxl"), adapter=str(root / "ip-adapter.bin"), face=face_config,
                           sd1_net=save_identitynet(build_tiny().unet, root / "sd1_ControlNetModel"),  # another family's
                           net=save_identitynet(base.unet, root / "ControlNetModel", keypoint_weight=2.0),
                           registry=registry.store,
                           people=people)


def generated(pipeline, embedding, pose, seed) -> np.ndarray:
    from ray_faceid.pipelines.generate import IdentityCondition

    image = pipeline.generate("a portrait", [IdentityCondition("p", embedding, pose=pose)], seed=seed, steps=STEPS,
                              guidance=GUIDANCE, width=SIZE, height=SIZE).images[0]
    return np.asarray(image).astype(int)


def test_render_runs_instantid_rows_each_with_its_pose_as_generate_does(parts, tmp_path):
    from ray_faceid.config import RenderConfig
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.errors import BadInput

    config = RenderConfig(steps=STEPS, guidance=GUIDANCE, size=f"{SIZE}x{SIZE}", face=parts.face, device="cpu",
                          unet_batch=4)
    out = str(tmp_path / "out")
    with pytest.raises(BadInput, match=r"give identitynet \(--identitynet\) FOLDER"):
        Renderer(config, parts.sdxl, parts.adapter, parts.registry, "acme", out)
    renderer = Renderer(config.model_copy(update={"identitynet": parts.net}), parts.sdxl, parts.adapter,
                        parts.registry, "acme", out)
    rows = [json.dumps({"id": "ann", "prompt": "a portrait", "seed": 3,
                        "identities": [{"id": "ann", "pose": POSE.tolist()}]}),
            json.dumps({"id": "bob", "prompt": "a portrait", "seed": 4, "identities": ["bob"]}),
            json.dumps({"id": "both", "prompt": "a portrait", "seed": 5, "identities": ["ann", "bob"]}),
            json.dumps({"id": "bad-pose", "prompt": "a portrait", "identities": [{"id": "ann", "pose": [[0.5, 1.5]]}]})]
    ann, bob, both, bad_pose = renderer.render_batch(rows, [0, 1, 2, 3])
    assert ann["status"] == bob["status"] == "ok", (ann, bob)
    assert both["status"] == "error" and "one person per image (got 2)" in both["error"]
    assert bad_pose["status"] == "error" and "pose" in bad_pose["error"]
    from ray_faceid.identity.instantid import frontal_points

    frontal = frontal_points(SIZE, SIZE) / SIZE
    for record, (name, pose, seed) in zip((ann, bob), (("ann", POSE, 3), ("bob", frontal, 4))):
        rendered = np.asarray(Image.open(record["output_uri"])).astype(int)
        assert np.abs(rendered - generated(renderer.pipeline, parts.people[name][1], pose, seed)).max() <= 1, name
    assert np.abs(np.asarray(Image.open(ann["output_uri"])).astype(int)
                  - generated(renderer.pipeline, parts.people["ann"][1], frontal, 3)).max() > 2  # the pose reached it
    provenance = json.loads(ann["provenance"])
    assert provenance["adapter_published"]["kind"] == "InstantID"
    assert provenance["identitynet"]["weights_sha256"] == renderer.pipeline.adapter.identitynet.sha256
    # Another IdentityNet scale is another image: the row's key changes with it (not read from the last run).
    stronger = Renderer(config.model_copy(update={"identitynet": parts.net, "identitynet_scale": 1.2}), parts.sdxl,
                        parts.adapter, parts.registry, "acme", out).render_batch(rows[:1], [0])[0]
    assert stronger["status"] == "ok" and not stronger["cached"] and stronger["key"] != ann["key"]


def request(identities: list[dict], seed: int) -> dict:
    return {"kind": "generate", "tenant": "acme", "identities": identities, "prompt": "a portrait",
            "negative_prompt": "", "seed": seed, "num_images": 1, "steps": STEPS, "guidance": GUIDANCE, "width": SIZE,
            "height": SIZE, "cancelled": threading.Event()}


def test_serve_batches_instantid_requests_of_different_people_each_with_its_pose(parts, tmp_path):
    """The Generator's batch runner (plain async code: no Serve needed), from a config resolve_config
    accepted; its refusals of InstantID configs it cannot run are one line each."""
    from deployments.app import resolve_config
    from deployments.generator import Generator
    from deployments.schemas import GenerateRequest
    from ray_faceid.config import ServeConfig
    from ray_faceid.errors import BadInput
    from ray_faceid.identity.instantid import frontal_points

    config = ServeConfig(model=parts.sdxl, adapter=parts.adapter, identitynet=parts.net, face=parts.face,
                         registry=parts.registry, api_tokens=TOKENS)
    refusals = (({"identitynet": None}, "set identitynet to its folder"),
                ({"backend": "tensorrt"}, "set backend torch, torch.compile or onnxruntime"),
                ({"identitynet": parts.registry}, "no IdentityNet at"),
                ({"identitynet": parts.sd1_net}, "cross_attention_dim 32; this base's UNet has 64"))
    for change, says in refusals:
        with pytest.raises(BadInput, match=says):
            resolve_config(config.model_copy(update=change))
    with pytest.raises(ValueError, match="pose"):  # the API's 422: four points, or one outside the image
        GenerateRequest.model_validate({"prompt": "p", "identities": [{"name": "ann", "pose": POSE.tolist()[:4]}]})
    with pytest.raises(ValueError, match="pose"):
        GenerateRequest.model_validate({"prompt": "p", "identities": [{"name": "ann", "pose": [[0.5, -0.1]] * 5}]})
    from ray_faceid.identity.expression import EXPRESSION_KEYS
    from ray_faceid.identity.flow import AttributeFlow, save_flow

    # An attribute flow for its encoder: requests may ask edits, which InstantID (a raw embedding) refuses.
    save_flow(str(tmp_path / "flow"), AttributeFlow(64, EXPRESSION_KEYS, couplings=2, hidden=32), "arcface/64/insightface")
    generator = Generator(resolve_config(config.model_copy(update={"flow": str(tmp_path / "flow")})).model_dump_json())
    generator.load_identity = generator._load_identity  # Serve's multiplexing LRU needs a replica context
    assert "InstantID" in generator.defaults()["served"]
    (ann, ann_emb), (bob, bob_emb) = parts.people["ann"], parts.people["bob"]
    answers = asyncio.run(generator._generate_group([request([{"id": ann, "pose": POSE.tolist()}], 3),
                                                     request([{"id": bob}], 4)]))
    for answer, embedding, pose, seed in zip(answers, (ann_emb, bob_emb), (POSE, frontal_points(SIZE, SIZE) / SIZE),
                                             (3, 4)):
        assert "error" not in answer, answer
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
        assert np.abs(image - generated(generator.pipeline, embedding, pose, seed)).max() <= 1
        assert answer["provenance"][0]["identitynet"]["scale"] == 0.8
    (two,) = asyncio.run(generator._generate_group([request([{"id": ann}, {"id": bob}], 5)]))
    assert two["status"] == 422 and "one person per image" in two["message"], two
    # One tenant's request InstantID cannot make fails alone, never the requests batched with it.
    edited, plain = asyncio.run(generator._generate_group([request([{"id": ann, "edits": {"smile": 0.8}}], 3),
                                                          request([{"id": bob}], 4)]))
    assert edited["status"] == 422 and "InstantID reads the raw one" in edited["message"], edited
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain["png"][0])))).astype(int)
    assert np.abs(image - generated(generator.pipeline, bob_emb, frontal_points(SIZE, SIZE) / SIZE, 4)).max() <= 1
    # A torch.compile replica: IdentityNet compiled into the warmed graph, the two people's batch run in it.
    compiled = Generator(resolve_config(config.model_copy(update={
        "backend": "torch.compile", "warm_up_sizes": [f"{SIZE}x{SIZE}"], "generator_batch_size": 2,
        "limits": config.limits.model_copy(update={"max_images": 1})})).model_dump_json())
    compiled.load_identity = compiled._load_identity
    assert compiled.warm_up_report["buckets"] == 2  # 2 and 4 rows
    engine = compiled.pipeline.compiled_engine()
    graph, calls = engine.compiled, []
    engine.compiled = lambda **inputs: calls.append("control_image" in inputs) or graph(**inputs)
    answers = asyncio.run(compiled._generate_group([request([{"id": ann, "pose": POSE.tolist()}], 3),
                                                    request([{"id": bob}], 4)]))
    assert calls == [True] * STEPS  # both requests in one batch, every step in the compiled graph
    for answer, embedding, pose, seed in zip(answers, (ann_emb, bob_emb), (POSE, frontal_points(SIZE, SIZE) / SIZE),
                                             (3, 4)):
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"][0])))).astype(int)
        assert np.abs(image - generated(generator.pipeline, embedding, pose, seed)).max() <= 1


def test_inpaint_command_repaints_an_enrolled_persons_face_with_instantid(parts, tmp_path):
    """`ray-faceid inpaint --identity NAME` with InstantID's files: the enrolled person's stored ArcFace
    embeddings (no face options), IdentityNet given; without it, one line saying to give it."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.pipelines.provenance import read_provenance

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:56, 12:52] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    command = ["inpaint", "--image", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"), "--identity", "ann",
               "--prompt", "a face", "--model", parts.sdxl, "--adapter", parts.adapter, "--registry", parts.registry,
               "--tenant", "acme", "--steps", "2", "--out", str(tmp_path / "out.png")]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "give --identitynet FOLDER" in refused.stderr, refused.output
    made = CliRunner().invoke(app, command + ["--identitynet", parts.net])
    assert made.exit_code == 0, made.output
    record = read_provenance((tmp_path / "out.png").read_bytes())
    assert record["adapter_published"]["kind"] == "InstantID" and record["identitynet"]["scale"] == 0.8
    # Her embedding given as a file (embedded elsewhere) paints the same face as her enrolled record.
    np.save(tmp_path / "ann.npy", parts.people["ann"][1])
    at = command.index("--identity")
    given = command[:at] + ["--face-embedding", str(tmp_path / "ann.npy")] + command[at + 2:]
    given[given.index("--out") + 1] = str(tmp_path / "given.png")
    made = CliRunner().invoke(app, given + ["--identitynet", parts.net])
    assert made.exit_code == 0, made.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "given.png")), np.asarray(Image.open(tmp_path / "out.png")))


def test_a_render_job_on_dlibs_face_stack_reads_each_persons_stored_arcface_embeddings(parts, tmp_path):
    """`ray-faceid render` without face options (dlib's stack, which scores the outputs) and a published
    file: each person's stored ArcFace embeddings make their tokens, as generate takes them; a person
    enrolled with dlib alone fails their row alone, with the command that adds the embeddings."""
    from ray_faceid.config import RenderConfig
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.face.spec import EncoderSpec
    from ray_faceid.identity.instantid import frontal_points
    from ray_faceid.registry import REFERENCE_CROP, Registry

    registry = Registry(str(tmp_path / "registry"))
    crop = [np.zeros((REFERENCE_CROP, REFERENCE_CROP, 3), np.uint8)]
    taken = [{"index": 0, "filename": "0.png", "accepted": True, "reason": None}]
    registry.create("acme", "bob", "form-bob", parts.people["bob"][1], np.ones(1, np.float32),
                    FaceAnalyzer(parts.face).spec, crop, taken)
    dlib = EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)
    dan_id = registry.create("acme", "dan", "form-dan", np.ones((1, 128), np.float32), np.ones(1, np.float32), dlib, crop,
                             taken)["id"]
    config = RenderConfig(steps=STEPS, guidance=GUIDANCE, size=f"{SIZE}x{SIZE}", device="cpu", identitynet=parts.net)
    renderer = Renderer(config, parts.sdxl, parts.adapter, registry.store, "acme", str(tmp_path / "out"))
    rows = [json.dumps({"id": name, "prompt": "a portrait", "seed": 4, "identities": [name]}) for name in ("bob", "dan")]
    bob, dan = renderer.render_batch(rows, [0, 1])
    assert bob["status"] == "ok", bob
    rendered = np.asarray(Image.open(bob["output_uri"])).astype(int)
    frontal = frontal_points(SIZE, SIZE) / SIZE
    assert np.abs(rendered - generated(renderer.pipeline, parts.people["bob"][1], frontal, 4)).max() <= 1
    command = f"`ray-faceid identities embed {dan_id} --tenant acme --registry REGISTRY --insightface-root PACK`"
    assert dan["status"] == "error" and command in dan["error"], dan


def test_personalize_runs_identitynet_beside_the_unet_in_every_step(parts, ray_cluster):
    """personalize on InstantID: without its IdentityNet one line saying to give it; with it, every
    training step adds IdentityNet's residuals from the person's tokens and their reference crop's five
    points (as generate adds them), and the personal adapter reaches the person's image."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.identity.instantid import attach_identitynet
    from ray_faceid.identity.personalization import load_personal
    from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
    from ray_faceid.pipelines.models import load_base
    from ray_faceid.registry import Registry

    command = ["personalize", "--adapter", parts.adapter, "--model", parts.sdxl, "--registry", parts.registry,
               "--tenant", "acme", "--identities", "ann", "--steps", "3", "--size", str(SIZE), "--lr", "1e-2", "--json"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "give --identitynet FOLDER" in refused.stderr, refused.output
    done = CliRunner().invoke(app, [*command, "--identitynet", parts.net])
    assert done.exit_code == 0, done.output
    ann, embedding = parts.people["ann"]
    assert json.loads(done.stdout[done.stdout.index("{"):])["trained"] == [ann]
    base = load_base(parts.sdxl)
    pipeline = IdentityPipeline(base, IdentityAdapter.load(parts.adapter, base.unet))
    attach_identitynet(pipeline, parts.net, 0.8, "--identitynet")
    registry = Registry(parts.registry)
    record = registry.adapter_record("acme", ann, pipeline.adapter.content_hash())
    assert record["identitynet"]["weights_sha256"] == pipeline.adapter.identitynet.sha256
    personal = load_personal(registry, "acme", ann, pipeline.adapter.content_hash(), pipeline.adapter)
    # Not without IdentityNet (or beside another): the personal adapter learned beside its residuals.
    assert load_personal(registry, "acme", ann, pipeline.adapter.content_hash(),
                         IdentityAdapter.load(parts.adapter, base.unet)) is None

    def image(own) -> np.ndarray:
        person = IdentityCondition("ann", embedding, personal=own)
        return np.asarray(pipeline.generate("a portrait", [person], seed=3, steps=STEPS, guidance=GUIDANCE, width=SIZE,
                                            height=SIZE).images[0]).astype(int)

    assert np.abs(image(personal) - image(None)).max() > 2
    # The training step's prediction takes IdentityNet's residuals (none at scale 0: another loss).
    import torch

    from ray_faceid.identity.objective import adapter_losses
    from ray_faceid.train.examples import reference_batch

    crops = registry.references("acme", ann)
    batch = reference_batch("ann", crops, embedding, np.ones(1), [0], SIZE, "a photo", keypoints=True)
    adapter, losses = pipeline.adapter, []
    for scale in (0.8, 0.0):
        adapter.identitynet.scale = scale
        with torch.no_grad():
            losses.append(float(adapter_losses(base, adapter, batch, 0.0, torch.Generator().manual_seed(0))["total"]))
    assert losses[0] != losses[1], losses
