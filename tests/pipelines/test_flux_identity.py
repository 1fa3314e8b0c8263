"""Identity on FLUX through the FLUX IP-Adapter layout diffusers loads (XLabs' keys, built at toy
size for tiny-flux): the image equals diffusers' FluxPipeline with the file through load_ip_adapter
and the same image embedding; several people each reach only the patches of their region; requests
running at once on one generator see only their own people."""
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.identity.flux_adapter import load_flux_adapter
from ray_faceid.identity.stand_ins import xlabs_state_dict
from ray_faceid.pipelines.flux import build_tiny_flux, load_flux, save_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import IdentityCondition
from tests.identity.test_face_plus import image_encoder_folder  # noqa: F401 - a fixture: a tiny CLIP, 16-d embeds

EMBED, SIZE, STEPS = 16, 32, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_ip")
    base = build_tiny_flux()
    save_flux(base, root / "flux")
    save_file(xlabs_state_dict(base.transformer), root / "ip_adapter.safetensors")
    return root


def embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, EMBED)).astype(np.float32)


def ours(files) -> FluxGenerator:
    base = load_flux(str(files / "flux"))
    return FluxGenerator(base, load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer))


def image(generator, people, seed=3) -> np.ndarray:
    result = generator.generate("a portrait", people, seed=seed, steps=STEPS, width=SIZE, height=SIZE)
    return np.asarray(result.images[0]).astype(int)


def test_the_flux_ip_adapter_gives_the_image_of_diffusers_flux_pipeline(files, caplog):
    from diffusers import FluxPipeline

    with caplog.at_level("WARNING"):
        generator = ours(files)
    assert "recognised a FLUX IP-Adapter: 4 identity tokens from 16-d image embeddings" in caplog.text
    pipe = FluxPipeline.from_pretrained(str(files / "flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(files), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.7)
    for person in (1, 2):
        want = pipe("a portrait", num_inference_steps=STEPS, width=SIZE, height=SIZE,
                    generator=torch.Generator().manual_seed(3), output_type="np",
                    ip_adapter_image_embeds=[torch.from_numpy(embedding(person))[None]],
                    negative_ip_adapter_image_embeds=[torch.zeros(1, 1, EMBED)]).images[0]
        got = image(generator, [IdentityCondition("p", embedding(person), scale=0.7)])
        assert np.abs(got - np.round(want * 255).astype(int)).max() <= 1, person
    assert np.abs(image(generator, [IdentityCondition("p", embedding(1))])
                  - image(generator, [IdentityCondition("p", embedding(2))])).max() > 2  # the identity reaches the image
    record = generator.generate("a portrait", [IdentityCondition("ann", embedding(1))], steps=1).provenance[0]
    assert record["adapter_published"]["kind"] == "FLUX IP-Adapter" and "Non-Commercial" in \
        record["adapter_published"]["licence"] and record["identities"][0]["name"] == "ann"
    with pytest.raises(BadInput, match="reads N x 16 finite image embeddings"):
        generator.generate("a portrait", [IdentityCondition("p", np.ones((1, 8), np.float32))], steps=1)
    with pytest.raises(BadInput, match="give --adapter FILE"):
        FluxGenerator(load_flux(str(files / "flux"))).generate("a portrait", [IdentityCondition("p", embedding(1))])


def test_each_person_reaches_only_the_patches_of_their_region(files):
    """One dual-stream block's attention with two people: the patches of the left half take the
    first person's tokens as if alone, those of the right half the second's."""
    from ray_faceid.identity.flux_adapter import patch_owner

    generator = ours(files)
    attn = generator.base.transformer.transformer_blocks[0].attn
    torch.manual_seed(0)
    h = w = 8  # latents: 4 x 4 = 16 patches
    image_states, text = torch.randn(1, 16, 32), torch.randn(1, 5, 32)
    tokens = [generator.adapter.tokens(torch.from_numpy(embedding(k))) for k in (1, 2)]
    owner = patch_owner([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)], h, w, 1)
    with torch.no_grad():
        both = attn(image_states, text, identity_tokens=torch.stack(tokens, 1), identity_scale=torch.ones(1, 2),
                    patch_owner=owner)[2]
        alone = [attn(image_states, text, identity_tokens=t[:, None], identity_scale=torch.ones(1, 1))[2] for t in tokens]
    left = owner[0, :, 0]
    # patches row by row on the 4 x 4 grid: the first two of each row are the left half's
    assert left.nonzero().flatten().tolist() == [r * 4 + c for r in range(4) for c in range(2)]
    assert bool((owner[0, :, 0] ^ owner[0, :, 1]).all())  # each patch one person's
    torch.testing.assert_close(both[0, left], alone[0][0, left])
    torch.testing.assert_close(both[0, ~left], alone[1][0, ~left])
    two = image(generator, [IdentityCondition("a", embedding(1)), IdentityCondition("b", embedding(2))])
    assert np.abs(two - image(generator, [IdentityCondition("a", embedding(1))])).max() > 2
    # One person given a region: their tokens reach only its patches (as in the UNet families).
    inputs = generator.identity_inputs([[IdentityCondition("a", embedding(1), region=(0.0, 0.0, 0.5, 0.5))]], h, w)
    assert inputs["patch_owner"][0, :, 0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    bad = {"no rows": np.zeros((0, EMBED), np.float32), "3-d": np.zeros((2, 3, EMBED), np.float32),
           "huge": np.full((1, EMBED), 3e38, np.float32)}
    for what, emb in bad.items():
        with pytest.raises(BadInput, match="image embeddings|out of range"):
            generator.check_people([IdentityCondition("p", emb)])
    with pytest.raises(BadInput, match="strength must be between 0 and 4"):
        generator.check_people([IdentityCondition("p", embedding(1), scale=float("nan"))])
    with pytest.raises(BadInput, match="need 0 <= x0 < x1 <= 1"):
        generator.check_people([IdentityCondition("p", embedding(1), region=(0.9, 0.0, 0.1, 1.0))])


def test_requests_at_once_on_one_generator_see_only_their_own_people(files):
    generator = ours(files)
    people = {k: [IdentityCondition(f"p{k}", embedding(k))] for k in (1, 2, 3)}
    alone = {k: image(generator, p) for k, p in people.items()}
    results, start = {}, threading.Barrier(3)

    def run(k):
        start.wait()
        results[k] = image(generator, people[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(np.array_equal(results[k], alone[k]) for k in people)


def test_rows_of_other_people_and_prompts_share_one_batch_each_its_own_image(files):
    """Requests and catalog rows are denoised together: one person, two in their regions, nobody,
    each with its own prompt and seed, in one batch; each image is the one made alone."""
    from ray_faceid.pipelines.generate import GenerationItem

    generator = ours(files)
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    items = [GenerationItem("a portrait", [IdentityCondition("a", embedding(1))], seed=3),
             GenerationItem("two friends", [IdentityCondition("b", embedding(2), region=left),
                                            IdentityCondition("c", embedding(3), region=right, scale=0.5)], seed=4),
             GenerationItem("a landscape", [], seed=5),
             GenerationItem("a portrait", [IdentityCondition("d", embedding(4), region=right)], seed=6)]
    batched = generator.generate_items(items, steps=STEPS, width=SIZE, height=SIZE)
    for k, item in enumerate(items):
        alone = generator.generate(item.prompt, item.identities, seed=item.seed, steps=STEPS, width=SIZE,
                                   height=SIZE)
        got, want = (np.asarray(r.images[0 if r is alone else k]).astype(int) for r in (batched, alone))
        assert np.abs(got - want).max() <= 1, k
        assert batched.provenance[k]["prompt"] == item.prompt and batched.provenance[k]["seed"] == item.seed
        assert [p["name"] for p in batched.provenance[k]["identities"]] == [p.name for p in item.identities]
    assert len({r.tobytes() for r in map(np.asarray, batched.images)}) == 4
    with pytest.raises(BadInput, match="a negative prompt on FLUX works through true CFG"):
        generator.generate_items([GenerationItem("a portrait", [], "blurry")], steps=1)


def test_one_command_with_a_flux_ip_adapter_file_and_an_embedding(files, tmp_path):
    from ray_faceid.cli import app
    from ray_faceid.pipelines.provenance import read_provenance

    np.save(tmp_path / "ann.npy", embedding(1))
    out = tmp_path / "ann.png"
    made = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--adapter",
                                    str(files / "ip_adapter.safetensors"), "--face-embedding", str(tmp_path / "ann.npy"),
                                    "--prompt", "a portrait", "--steps", "2", "--out", str(out)])
    assert made.exit_code == 0, made.output
    record = read_provenance(out.read_bytes())
    assert record["base_family"] == "flux" and record["adapter_published"]["file"] == "ip_adapter.safetensors"
    assert len(record["identities"]) == 1
    bare = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--face-embedding",
                                    str(tmp_path / "ann.npy"), "--prompt", "a portrait", "--out", str(out)])
    assert bare.exit_code == 2 and "give --adapter FILE" in bare.stderr, bare.output


def test_an_embedding_of_another_width_is_refused_before_the_base_loads(files, tmp_path, monkeypatch):
    from ray_faceid.cli import app
    from ray_faceid.pipelines import flux

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(flux, "load_flux", no_load)  # FLUX.1-dev loads for minutes: the file's header says it first
    flat = xlabs_state_dict(build_tiny_flux().transformer)
    save_file(flat, tmp_path / "ip_adapter.safetensors")
    torch.save({"image_proj": {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("ip_adapter_proj")},
                "ip_adapter": {k.replace("double_blocks.", "").replace("processor.ip_adapter_double_stream_", "to_")
                               .replace("_proj", "_ip"): v for k, v in flat.items() if k.startswith("double_blocks.")}},
               tmp_path / "ip_adapter.bin")
    for name in ("ip_adapter.safetensors", "ip_adapter.bin"):
        np.save(tmp_path / "arcface.npy", np.ones((1, 512), np.float32))
        made = CliRunner().invoke(app, ["generate", "--model", str(files / "flux"), "--adapter", str(tmp_path / name),
                                        "--face-embedding", str(tmp_path / "arcface.npy"), "--prompt", "a portrait",
                                        "--out", str(tmp_path / "o.png")])
        assert made.exit_code == 2 and f"reads N x {EMBED} finite image embeddings, got shape (1, 512)" in \
            made.stderr, (name, made.output)


def test_a_flux_ip_adapter_for_another_model_is_refused_in_one_line(files, tmp_path):
    base = load_flux(str(files / "flux"))
    state = xlabs_state_dict(base.transformer)
    wide = {k: (torch.zeros(4 * 64, EMBED) if k.endswith("proj.weight") else v) for k, v in state.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(UnsupportedModel, match="64-wide tokens; this base's transformer reads 32-wide"):
        load_flux_adapter(str(tmp_path / "wide.safetensors"), base.transformer)
    more = dict(state, **{"double_blocks.5.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(32, 32)})
    save_file(more, tmp_path / "deeper.safetensors")
    with pytest.raises(UnsupportedModel, match="beyond this base's 1 dual-stream blocks"):
        load_flux_adapter(str(tmp_path / "deeper.safetensors"), base.transformer)
    torch.save({"image_proj": {}, "ip_adapter": {}}, tmp_path / "empty.bin")
    with pytest.raises(UnsupportedModel, match="no FLUX IP-Adapter projection"):
        load_flux_adapter(str(tmp_path / "empty.bin"), base.transformer)


def test_photos_read_through_the_clip_image_encoder_as_diffusers_reads_them(files, image_encoder_folder,  # noqa: F811
                                                                             sample_photos, tmp_path):
    """A person's photo, read whole through a CLIP image encoder folder: the image equals diffusers'
    FluxPipeline given the photo as ip_adapter_image (its image encoder and CLIP's processor); two
    people from photos, each in their region, from one command."""
    from diffusers import FluxPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    from ray_faceid.cli import app
    from ray_faceid.face.clip_image import ClipImageEncoder
    from ray_faceid.face.decode import decode_image
    from ray_faceid.pipelines.provenance import read_provenance

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    photo = sample_photos["Tom_Hanks_54745.png"]
    embeds = ClipImageEncoder(str(image_encoder_folder)).image_embeds([decode_image(str(photo))])
    assert embeds.shape == (1, EMBED)
    pipe = FluxPipeline.from_pretrained(str(files / "flux"),
                                        image_encoder=CLIPVisionModelWithProjection.from_pretrained(image_encoder_folder),
                                        feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(files), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    want = pipe("a portrait", num_inference_steps=STEPS, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(3),
                output_type="np", ip_adapter_image=Image.open(photo).convert("RGB"),
                negative_ip_adapter_image_embeds=[torch.zeros(1, 1, EMBED)]).images[0]
    got = image(ours(files), [IdentityCondition("p", embeds)])
    assert np.abs(got - np.round(want * 255).astype(int)).max() <= 1
    out = tmp_path / "two.png"
    other = tmp_path / "one_of_six.png"
    Image.open(sample_photos["t1.jpg"]).crop((20, 240, 230, 440)).save(other)  # one face of the group photo
    command = ["generate", "--model", str(files / "flux"), "--adapter", str(files / "ip_adapter.safetensors"),
               "--identity", f"tom={photo}", "--identity", f"other={other}", "--region",
               "tom=0,0,0.5,1", "--region", "other=0.5,0,1,1", "--prompt", "two people", "--steps", "2", "--out", str(out)]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2 and "give --image-encoder FOLDER" in refused.stderr, refused.output
    made = CliRunner().invoke(app, command + ["--image-encoder", str(image_encoder_folder)])
    assert made.exit_code == 0 and "2 identities" in made.stdout, made.output
    record = read_provenance(out.read_bytes())
    assert [p["region"] for p in record["identities"]] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    assert record["image_encoder"] == ClipImageEncoder(str(image_encoder_folder)).sha256
    # A photo that shows nobody is not a person (the adapter reads photos whole: it took a blank one).
    Image.new("RGB", (128, 128), "gray").save(tmp_path / "blank.png")
    blank = [f"other={tmp_path / 'blank.png'}" if a.startswith("other=") and "/" in a else a for a in command]
    refused = CliRunner().invoke(app, blank + ["--image-encoder", str(image_encoder_folder)])
    assert refused.exit_code == 2 and "no face found" in refused.stderr and "blank.png" in refused.stderr
    # An enrolled person: the reference crops the registry keeps, read through the same encoder.
    registry = tmp_path / "registry"
    enrolled = CliRunner().invoke(app, ["identities", "enroll", str(photo), "--name", "tom", "--consent", "form-1",
                                        "--registry", str(registry)])
    assert enrolled.exit_code == 0, enrolled.output
    command = ["generate", "--model", str(files / "flux"), "--adapter", str(files / "ip_adapter.safetensors"),
               "--identity", "tom", "--image-encoder", str(image_encoder_folder), "--registry", str(registry),
               "--prompt", "a portrait", "--steps", str(STEPS), "--seed", "3", "--out", str(tmp_path / "tom.png")]
    made = CliRunner().invoke(app, command)
    assert made.exit_code == 0, made.output
    from ray_faceid.registry import Registry

    store = Registry(str(registry))
    tom = store.resolve("default", "tom")
    crops = ClipImageEncoder(str(image_encoder_folder)).image_embeds(store.references("default", tom))
    assert read_provenance((tmp_path / "tom.png").read_bytes())["identities"][0]["id"] == tom
    got = np.asarray(Image.open(tmp_path / "tom.png")).astype(int)
    assert np.abs(got - image(ours(files), [IdentityCondition("tom", crops)])).max() <= 1


def test_the_compiled_transformer_takes_people_as_inputs(files, monkeypatch):
    """--backend torch.compile (the suite's Dynamo backend, tests/conftest.py): the image of the
    eager transformer; another person, strength, person count, region or nobody compiles nothing
    anew, and a batch compiles once per batch bucket (padded up to it)."""
    from torch._dynamo.utils import counters

    from ray_faceid.pipelines.generate import GenerationItem

    base = load_flux(str(files / "flux"))
    compiled = FluxGenerator(base, load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer),
                             backend="torch.compile")
    assert compiled.warm_up([(SIZE, SIZE)], 2)["buckets"] == 2  # batch buckets 1 and 2
    graphs = counters["stats"]["unique_graphs"]
    first = image(compiled, [IdentityCondition("a", embedding(1))])
    others = [image(compiled, [IdentityCondition("b", embedding(k), scale=0.5 + k / 4)]) for k in (2, 3)]
    two = [IdentityCondition("a", embedding(1), region=(0.0, 0.0, 0.5, 1.0)), IdentityCondition("b", embedding(2))]
    both, nobody = image(compiled, two), image(compiled, [])
    assert counters["stats"]["unique_graphs"] == graphs  # people, counts, regions and strengths are inputs
    eager = ours(files)
    assert np.abs(first - image(eager, [IdentityCondition("a", embedding(1))])).max() <= 1
    assert np.abs(others[0] - image(eager, [IdentityCondition("b", embedding(2), scale=1.0)])).max() <= 1
    assert np.abs(both - image(eager, two)).max() <= 1 and np.abs(nobody - image(eager, [])).max() <= 1
    items = [GenerationItem("a portrait", [IdentityCondition("a", embedding(k))], seed=k) for k in (1, 2, 3)]
    three = compiled.generate_items(items, steps=STEPS, width=SIZE, height=SIZE)  # padded to the bucket of 4
    assert len(three.images) == 3 and counters["stats"]["unique_graphs"] == graphs + 1
    again = compiled.generate_items(items + items[:1], steps=STEPS, width=SIZE, height=SIZE)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and again.png[:3] == three.png
    assert np.abs(np.asarray(three.images[1]).astype(int) - image(eager, items[1].identities, seed=2)).max() <= 1
    # Above the largest bucket, in chunks; each chunk reports to this call's progress, not to another
    # request's that set on_step while this one paused between steps (Serve's turns).
    from ray_faceid.pipelines import flux_sampling

    monkeypatch.setattr(flux_sampling, "BATCH_BUCKETS", (1, 2))  # three images: chunks of two and one
    seen = []

    def mine(step, total):
        seen.append(step)
        compiled.on_step = lambda *_: seen.append("another request's")

    compiled.on_step = mine
    chunked = compiled.generate_items(items, steps=1, width=SIZE, height=SIZE)
    assert len(chunked.images) == 3 and seen == [0, 1, 0, 1]
    assert compiled.generate("a portrait", steps=1).provenance[0]["backend"] == "torch.compile"


def test_compiled_ahead_for_fewer_images_serves_the_buckets_a_replica_shares(files, tmp_path, monkeypatch):
    """`ray-faceid compile --batch 2` stores Inductor's artifacts per (size, batch bucket): a replica
    whose batches reach 4 images loads the two buckets compiled ahead and compiles only the third."""
    from ray_faceid.engines.cache import EngineCache

    store = {}  # Inductor's artifacts stand-in: the suite compiles with Dynamo's eager backend
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: store.setdefault("loaded", data))
    cache = EngineCache(str(tmp_path / "engines"))

    def generator():
        base = load_flux(str(files / "flux"))
        made = FluxGenerator(base, load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer),
                             backend="torch.compile")
        made.compiler, made.engine_cache = "inductor", cache
        return made

    assert generator().warm_up([(SIZE, SIZE)], 2) == {"loaded": 0, "stored": 2, "buckets": 2}
    assert generator().warm_up([(SIZE, SIZE)], 4) == {"loaded": 2, "stored": 1, "buckets": 3}
    assert store["loaded"] == b"artifacts"
