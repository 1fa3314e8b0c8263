"""SDXL-class bases on tiny components: the family read from configs, prompt encoding and added
conditioning as diffusers does them (parity with StableDiffusionXLPipeline), every identity method,
inpainting on both UNet layouts, and a folder saved by diffusers used with no other flag."""
import json

import numpy as np
import pytest
import torch

from ray_faceid.errors import BadInput, BaseModelMismatch, UnsupportedModel
from ray_faceid.identity.adapter import AdapterOptions, IdentityAdapter
from ray_faceid.pipelines.generate import IdentityCondition, IdentityPipeline
from ray_faceid.pipelines.inpaint import inpaint
from ray_faceid.pipelines.models import build_tiny, load_base, save_base

SIZE = dict(width=64, height=64, steps=3)


def person(name, seed):
    return IdentityCondition(name, np.random.default_rng(seed).normal(size=(2, 128)))


def pixels(result, k=0):
    return np.asarray(result.images[k]).astype(int)


def strong_adapter(base, spec, **options):
    torch.manual_seed(0)
    adapter = IdentityAdapter.for_unet(base.unet, spec, AdapterOptions(**options))
    with torch.no_grad():  # an untrained adapter is close to a no-op; make the identity path count
        for p in adapter.parameters():
            p.mul_(3.0)
    return adapter


def test_the_family_and_what_it_needs_come_from_the_model():
    base = load_base("tiny-sdxl")
    assert base.family == "sdxl" and base.text_encoder_2 is not None and base.zero_empty_prompt
    assert base.native_size == (32, 32) and base.untrained
    assert load_base("tiny").family == "sd1" and load_base("tiny-sdxl-inpaint").inpainting
    base.to("cpu", torch.float16)  # SDXL's VAE says force_upcast: it stays fp32 in half precision
    assert base.unet.dtype == torch.float16 and base.vae.dtype == torch.float32


def diffusers_sdxl(base):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                     scheduler=base.scheduler, add_watermarker=False)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_identity_scale_zero_gives_diffusers_own_sdxl_image(spec128, negative):
    base = build_tiny(family="sdxl")
    reference = diffusers_sdxl(base)(
        "a portrait photo", negative_prompt=negative or None, num_inference_steps=3, guidance_scale=5.0,
        width=64, height=64, generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    expected = np.round(reference * 255).astype(int)
    plain = IdentityPipeline(base)
    got = pixels(plain.generate("a portrait photo", [], negative, seed=11, **SIZE))
    assert np.abs(got - expected).max() <= 1
    ours = IdentityPipeline(base, strong_adapter(base, spec128))
    silent = IdentityCondition("ann", person("ann", 1).embeddings, scale=0.0)
    got = pixels(ours.generate("a portrait photo", [silent], negative, seed=11, **SIZE))
    assert np.abs(got - expected).max() <= 1
    IdentityAdapter.remove(base.unet)


@pytest.mark.parametrize("options", [dict(method="decoupled"), dict(method="pva"), dict(method="pva", gate=True),
                                     dict(method="decoupled", mapper="multiref", expression_dim=0)])
def test_every_identity_method_acts_on_sdxl_cross_attention(spec128, options):
    base = build_tiny(family="sdxl")
    pipe = IdentityPipeline(base, strong_adapter(base, spec128, **options))
    ann = pixels(pipe.generate("a portrait", [person("ann", 1)], **SIZE))
    bob = pixels(pipe.generate("a portrait", [person("bob", 2)], **SIZE))
    none = pixels(pipe.generate("a portrait", [], **SIZE))
    assert np.abs(ann - bob).mean() > 0.5 and np.abs(ann - none).mean() > 0.5
    two = pipe.generate("two people", [person("ann", 1), person("bob", 2)], **SIZE)
    assert two.provenance[0]["identities"][1]["name"] == "bob"
    batch = pipe.generate("a portrait", [person("ann", 1)], num_images=2, seed=4, **SIZE)
    assert np.abs(pixels(batch, 1) - pixels(pipe.generate("a portrait", [person("ann", 1)], seed=5, **SIZE))).max() <= 1


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sdxl-inpaint"])
def test_inpainting_on_sdxl_keeps_every_pixel_outside_the_mask(spec128, model):
    base = load_base(model)
    pipe = IdentityPipeline(base, strong_adapter(base, spec128))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = np.asarray(inpaint(pipe, image, mask, person("ann", 1), "a face", steps=2, feather=0).images[0])
    assert np.array_equal(out[:8], image[:8]) and not np.array_equal(out[20:44, 20:44], image[20:44, 20:44])


@pytest.mark.parametrize("model,scheduler", [("tiny-sdxl", "ddim"), ("tiny-sdxl", "euler"),
                                             ("tiny-sdxl", "euler-trailing"), ("tiny-sdxl-inpaint", "euler")])
def test_identity_scale_zero_inpaints_as_diffusers_own_sdxl_inpaint_pipeline(spec128, model, scheduler):
    """Blended latents on a 4-channel base, the 9-channel conditioning on an inpainting base: inside
    the mask the pixels are diffusers' own (outside, ours keeps the photo's own pixels)."""
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline
    from PIL import Image

    from ray_faceid.pipelines.inpaint import inpainting_conditioning

    base = load_base(model)
    if scheduler != "ddim":  # what SDXL checkpoints ship, and the trailing spacing of few-step variants
        spacing = {"euler": "leading", "euler-trailing": "trailing"}[scheduler]
        base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing=spacing)
    pipe = IdentityPipeline(base, strong_adapter(base, spec128))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255  # on latent cells: diffusers' nearest resize and our max-pool agree
    silent = IdentityCondition("ann", person("ann", 1).embeddings, scale=0.0)
    ours = np.asarray(inpaint(pipe, image, mask, silent, "a face", seed=7, steps=3, feather=0, max_side=64)
                      .images[0]).astype(int)
    reference = StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=copy.deepcopy(base.scheduler), add_watermarker=False)
    # Latents given, not pixels: diffusers samples the VAE posterior where ours takes its mean.
    latents = pipe.encode_image(image)
    masked = inpainting_conditioning(pipe, image, mask / 255.0)[1] if base.inpainting else None
    expected = reference("a face", image=latents, mask_image=Image.fromarray(mask), masked_image_latents=masked,
                         height=64, width=64, strength=1.0, num_inference_steps=3, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    expected = np.round(expected * 255).astype(int)
    inside = mask > 0
    assert np.abs(ours[inside] - expected[inside]).max() <= 1
    assert np.array_equal(ours[~inside], image[~inside])
    IdentityAdapter.remove(base.unet)


def test_adapters_are_refused_across_families(spec128):
    sd1, sdxl = build_tiny(), build_tiny(family="sdxl")
    with pytest.raises(BaseModelMismatch, match="made for an SD1 base; the base loaded is SDXL"):
        IdentityAdapter.for_unet(sd1.unet, spec128).install(sdxl.unet)
    with pytest.raises(BaseModelMismatch, match="made for an SDXL base; the base loaded is SD1"):
        IdentityAdapter.for_unet(sdxl.unet, spec128).install(sd1.unet)
    with pytest.raises(BadInput, match="multiples of 2 for this model, got 63x64"):
        IdentityPipeline(sdxl).generate("a portrait", [], width=63, height=64, steps=1)


def test_other_layouts_are_refused_in_one_line(tmp_path):
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UnsupportedModel, match="a FluxPipeline folder without vae, text_encoder") as caught:
        load_base(str(flux))  # FLUX runs (tests/pipelines/test_flux.py): this one lacks its other parts
    assert "\n" not in str(caught.value)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    with pytest.raises(UnsupportedModel, match="looks like a FLUX model of another kind") as caught:
        load_base(str(flux))
    assert "\n" not in str(caught.value) and "SDXL" in str(caught.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UnsupportedModel, match="bare UNet"):
        load_base(str(bare))
    partial = tmp_path / "partial"
    save_base(build_tiny(family="sdxl"), partial)
    import shutil

    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(UnsupportedModel, match="no text_encoder_2"):
        load_base(str(partial))



@pytest.mark.parametrize("change, says", [
    ({"in_channels": 8}, "8 input channels: an InstructPix2Pix-style image-editing UNet"),
    ({"in_channels": 7, "num_class_embeds": 1000}, "7 input channels: an upscaler UNet"),
    ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 768}, "class embedding"),
    ({"addition_embed_type": "text_image"}, "'text_image' added conditioning"),
    ({"out_channels": 8}, "predicts 8 channels"),
])
def test_unet_layouts_the_families_do_not_run_are_refused_before_loading(tmp_path, change, says):
    folder = tmp_path / "other"
    save_base(build_tiny(), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not loaded")  # refused before it is read
    with pytest.raises(UnsupportedModel, match=says) as caught:
        load_base(str(folder))
    assert "\n" not in str(caught.value)


def test_a_unet_without_its_text_encoder_is_refused_before_loading(tmp_path):
    import shutil

    folder = tmp_path / "no_text"
    save_base(build_tiny(), folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(UnsupportedModel, match="no text_encoder"):
        load_base(str(folder))


def test_a_folder_saved_by_diffusers_sdxl_pipeline_generates_with_its_adapter_alone(tmp_path, sample_photos):
    """No family flag: the folder says it is SDXL. A real base needs an identity adapter (never a
    random one): without it one line says so; with a published FaceID file it generates."""
    import subprocess
    import sys

    from tests.identity.test_published_adapters import face, faceid_state_dict, save

    base = build_tiny(family="sdxl")
    diffusers_sdxl(base).save_pretrained(tmp_path / "sdxl")
    loaded = load_base(str(tmp_path / "sdxl"))
    assert loaded.family == "sdxl" and loaded.model_hash() == base.model_hash()
    cli = [sys.executable, "-c", "from ray_faceid.cli import app; app()"]
    out = tmp_path / "out.png"
    bare = subprocess.run([*cli, "generate", "--model", str(tmp_path / "sdxl"), "--prompt", "a portrait",
                           "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode == 2 and "no identity adapter was given: pass --adapter" in bare.stderr
    adapter = save(faceid_state_dict(base.unet), tmp_path / "ip-adapter-faceid_sdxl.bin")
    np.save(tmp_path / "face.npy", face(1))
    done = subprocess.run([*cli, "generate", "--model", str(tmp_path / "sdxl"), "--prompt", "a portrait",
                           "--adapter", adapter, "--face-embedding", str(tmp_path / "face.npy"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from ray_faceid.pipelines.provenance import read_provenance

    record = read_provenance(out.read_bytes())
    assert record["base_family"] == "sdxl" and record["size"] == [32, 32]
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    refused = subprocess.run([*cli, "generate", "--model", str(flux), "--prompt", "a portrait",
                              "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "FluxPipeline folder without vae" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr


def test_the_compiled_engine_takes_sdxls_conditioning_as_live_inputs(spec128, tmp_path):
    """Warm once; then other people, strengths, prompts and personal adapters: 0 recompiles, eager's images."""
    from ray_faceid.engines.cache import EngineCache

    def pipeline(backend):
        base = build_tiny(family="sdxl")
        return IdentityPipeline(base, strong_adapter(base, spec128), backend=backend, engine_cache=EngineCache(tmp_path))

    compiled, eager = pipeline("torch.compile"), pipeline("torch")
    assert compiled.warm_up([(32, 32)], [1], max_images=1)["buckets"] == 1
    delta = {k: 0.1 * torch.randn_like(v) for k, v in compiled.adapter.processors.state_dict().items()}
    requests = [("a portrait", person("ann", 1)), ("a portrait", person("bob", 2)),
                ("a smiling portrait", IdentityCondition("ann2", person("ann", 1).embeddings, scale=0.5)),
                ("a portrait", IdentityCondition("own", person("bob", 2).embeddings, personal=("v1", delta)))]
    images = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, who in requests:
            got = pixels(compiled.generate(prompt, [who], seed=3, steps=2, width=32, height=32))
            want = pixels(eager.generate(prompt, [who], seed=3, steps=2, width=32, height=32))
            assert np.abs(got - want).max() <= 1, who.name
            images.append(got.tobytes())
    assert len(set(images)) == len(requests)


def test_onnxruntime_runs_sdxl_with_the_added_inputs(spec128, tmp_path):
    pytest.importorskip("onnxruntime")
    from ray_faceid.engines.cache import EngineCache

    images = []
    for backend in ("torch", "onnxruntime"):
        base = build_tiny(family="sdxl")
        pipe = IdentityPipeline(base, strong_adapter(base, spec128), backend=backend, engine_cache=EngineCache(tmp_path))
        images.append(pixels(pipe.generate("a portrait", [person("ann", 1)], seed=2, steps=2, width=32, height=32)))
    assert np.abs(images[0] - images[1]).max() <= 1


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_generate_on_an_inpainting_base_says_to_inpaint(model):
    """A 9-channel base repaints masked photos: generate says so, typed, instead of a shape error."""
    with pytest.raises(BadInput, match="is an inpainting model: it repaints a masked photo"):
        IdentityPipeline(load_base(model)).generate("a portrait", [], steps=1)
