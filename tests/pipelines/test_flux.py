"""FLUX.1 from a folder diffusers saved (tiny-flux at toy size, FLUX's 16 latent channels, a T5
tokenizer made in code): from a prompt, the image equals diffusers' FluxPipeline with its defaults
(512 T5 tokens, dev's guidance 3.5 as an input, the schedule shifted by the token count; schnell
without guidance), alone or batched. The variant is read from the configs; a path that does not run
FLUX yet says so in one line (identity on FLUX: tests/pipelines/test_flux_identity.py)."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.errors import BadInput, UnsupportedModel
from ray_faceid.pipelines.flux import build_tiny_flux, load_flux, save_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.provenance import read_provenance

SIZE, STEPS = 32, 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """dev and schnell, each saved by diffusers' FluxPipeline.save_pretrained."""
    root = tmp_path_factory.mktemp("flux")
    for variant, guidance_embeds in (("dev", True), ("schnell", False)):
        save_flux(build_tiny_flux(guidance_embeds=guidance_embeds), root / variant)
    return {variant: str(root / variant) for variant in ("dev", "schnell")}


def diffusers_images(folder: str, seeds: list[int], **kwargs) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a portrait photo", num_inference_steps=STEPS, width=SIZE, height=SIZE,
                  num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                  output_type="np", **kwargs).images
    return np.round(images * 255).astype(int)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_makes_the_image_of_diffusers_flux_pipeline(folders, variant):
    base = load_flux(folders[variant])
    assert base.variant == variant and base.family == "flux" and not base.inpainting
    generator = FluxGenerator(base)
    ours = generator.generate("a portrait photo", seed=3, steps=STEPS, width=SIZE, height=SIZE, num_images=2)
    want = diffusers_images(folders[variant], [3, 4])  # dev: FluxPipeline's own default guidance (3.5)
    for k in range(2):
        assert np.abs(np.asarray(ours.images[k]).astype(int) - want[k]).max() <= 1, k
    assert np.abs(want[0] - want[1]).max() > 2  # each seed its own image
    alone = generator.generate("a portrait photo", seed=4, steps=STEPS, width=SIZE, height=SIZE)
    assert alone.png[0] == ours.png[1]  # batched or alone: the same bytes
    record = ours.provenance[0]
    assert record["base_family"] == "flux" and record["flux_variant"] == variant and record["seed"] == 3
    assert record["guidance"] == (3.5 if variant == "dev" else None) and record["max_sequence_length"] == 512
    if variant == "dev":  # guidance is an input of dev's transformer: another value, another image
        other = generator.generate("a portrait photo", seed=3, steps=STEPS, guidance=1.5, width=SIZE, height=SIZE)
        assert np.abs(np.asarray(other.images[0]).astype(int) - diffusers_images(folders[variant], [3],
                                                                                 guidance_scale=1.5)[0]).max() <= 1
        assert other.png[0] != ours.png[0]
    else:
        with pytest.raises(BadInput, match="schnell, which takes no guidance"):
            generator.generate("a portrait photo", guidance=3.5, steps=1, width=SIZE, height=SIZE)
        # 0 is no guidance, as diffusers' schnell examples pass it: the same image
        zero = generator.generate("a portrait photo", seed=4, steps=STEPS, guidance=0, width=SIZE, height=SIZE)
        assert zero.png[0] == alone.png[0] and zero.provenance[0]["guidance"] is None
    with pytest.raises(BadInput, match="multiples of 4"):
        generator.generate("a portrait photo", steps=1, width=30, height=SIZE)


def test_a_flux_folder_generates_from_one_command_and_paths_without_flux_say_so(folders, tmp_path, sample_photos):
    from ray_faceid.pipelines.models import load_base

    out = tmp_path / "flux.png"
    made = CliRunner().invoke(app, ["generate", "--model", folders["dev"], "--prompt", "a portrait photo",
                                    "--steps", "2", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert "FLUX.1 dev: 32x32, 2 steps, guidance 3.5" in made.stderr
    record = read_provenance(out.read_bytes())
    assert record["base_family"] == "flux" and record["untrained_base"] and record["identities"] == []
    refused = CliRunner().invoke(app, ["generate", "--model", folders["dev"], "--prompt", "a portrait", "--ref",
                                       str(sample_photos["Tom_Hanks_54745.png"]), "--out", str(out)])
    assert refused.exit_code == 2
    assert "identity on FLUX reads a FLUX IP-Adapter or PuLID-FLUX: give --adapter FILE" in refused.stderr
    assert "and --image-encoder FOLDER" in refused.stderr  # both missing: both named at once
    refused = CliRunner().invoke(app, ["generate", "--model", folders["dev"], "--prompt", "a portrait",
                                       "--negative-prompt", "blurry", "--scheduler", "euler", "--out", str(out)])
    assert refused.exit_code == 2 and "--scheduler: not built for FLUX yet" in refused.stderr
    refused = CliRunner().invoke(app, ["generate", "--model", folders["schnell"], "--prompt", "a portrait",
                                       "--guidance", "3.5", "--out", str(out)])
    assert refused.exit_code == 2 and "schnell, which takes no guidance" in refused.stderr
    assert "untrained base model" not in refused.stderr  # refused from its configs, before it loads
    zero = CliRunner().invoke(app, ["generate", "--model", folders["schnell"], "--prompt", "a portrait",
                                    "--guidance", "0", "--steps", "1", "--out", str(out)])
    assert zero.exit_code == 0, zero.output
    assert "Traceback" not in refused.output
    with pytest.raises(UnsupportedModel, match="is a FLUX model: `ray-faceid generate`, `render` and Serve run it"):
        load_base(folders["dev"])  # render, Serve, inpaint, train, compile load through it
    refused = CliRunner().invoke(app, ["compile", "--model", "tiny-flux", "--backend", "tensorrt", "--out",
                                       str(tmp_path / "engines")])
    assert refused.exit_code == 2 and "has no TensorRT engine yet" in refused.stderr, refused.output
    # Ahead of Serve: every batch bucket a replica's batches fill, into the engine cache it looks in (the
    # suite's Dynamo backend keeps no Inductor artifacts; the UNet engine's test checks them).
    compiled = CliRunner().invoke(app, ["compile", "--model", folders["dev"], "--batch", "2", "--size", "32x32",
                                        "--out", str(tmp_path / "engines")])  # FLUX's default: torch.compile
    assert compiled.exit_code == 0, compiled.output
    assert "compiled 2 batch buckets of FLUX's transformer" in " ".join(compiled.stdout.split())
    fill = CliRunner().invoke(app, ["compile", "--model", "tiny-flux-fill", "--backend", "torch.compile", "--out",
                                    str(tmp_path / "engines")])
    assert fill.exit_code == 2 and "is FLUX.1 Fill" in fill.stderr, fill.output  # a KeyError before
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig

    with pytest.raises(BadInput, match="backend: not built for FLUX yet"):  # Serve runs FLUX eager
        resolve_config(ServeConfig(model=folders["dev"], backend="tensorrt",
                                   api_tokens={"acme": "acme-token-0123456789abcdef"}))


def test_flux_fill_repaints_the_mask_as_diffusers_flux_fill_pipeline_does(tmp_path, caplog):
    """FLUX.1 Fill (its transformer reads the packed masked photo and mask beside the latents: told
    apart by its input channels): inside the mask the image equals diffusers' FluxFillPipeline with
    its defaults (guidance 30), outside it the photo's own pixels; from one command too."""
    from diffusers import FluxFillPipeline
    from PIL import Image

    from ray_faceid.pipelines.model_ref import resolve_model

    save_flux(build_tiny_flux(fill=True), tmp_path / "fill")
    ref = resolve_model(str(tmp_path / "fill"), flux=True)
    assert ref.family == "flux" and ref.inpainting
    fill = load_flux(ref)
    assert fill.variant == "fill" and fill.default_guidance == 30.0
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 12:30] = 255
    generator = FluxGenerator(fill)
    ours = np.asarray(generator.inpaint(photo, mask, "a face", seed=3, steps=STEPS).images[0]).astype(int)
    pipe = FluxFillPipeline.from_pretrained(str(tmp_path / "fill"))
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a face", image=Image.fromarray(photo), mask_image=Image.fromarray(mask), height=32, width=40,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    inside = mask > 127
    assert np.abs(ours - np.round(want * 255).astype(int))[inside].max() <= 1
    assert np.array_equal(ours[~inside], photo[~inside]) and np.abs(ours - photo)[inside].max() > 2
    odd = generator.inpaint(photo[:30, :37], mask[:30, :37], "a face", steps=1).images[0]  # padded, cut back
    assert odd.size == (37, 30)
    # A photo over FLUX's pixel budget is repainted reduced (a 12 MP photo ran at full size) and the
    # repainted part brought back to its size; outside the mask its own pixels stay, byte for byte.
    big_photo = np.kron(photo, np.ones((4, 4, 1), np.uint8))
    big_mask = np.kron(mask, np.ones((4, 4), np.uint8))
    big = generator.inpaint(big_photo, big_mask, "a face", steps=1, max_pixels=32 * 40)
    painted, inside_big = np.asarray(big.images[0]).astype(int), big_mask > 127
    assert painted.shape == big_photo.shape and np.array_equal(painted[~inside_big], big_photo[~inside_big])
    assert np.abs(painted - big_photo)[inside_big].max() > 2
    assert big.provenance[0]["size"] == [160, 128] and big.provenance[0]["repainted_at"] == [40, 32]
    # A stroke thinner than the reduction is repainted too, not left as the reduced photo enlarged.
    stroke = np.zeros_like(big_mask)
    stroke[40:100, 61] = 255
    thin = np.asarray(generator.inpaint(big_photo, stroke, "a face", steps=1, max_pixels=32 * 40).images[0])
    assert np.abs(thin.astype(int) - big_photo)[stroke > 127].mean() > 4
    with pytest.raises(BadInput, match="FLUX.1 Fill, an inpainting model"):
        generator.generate("a portrait", steps=1)
    # Compiled, each photo size compiles at its first request (none is warmed ahead): said once a size.
    compiled = FluxGenerator(fill, backend="torch.compile")
    assert "each photo size compiles at its first request" in compiled.warm_up([(32, 40)], 1)["note"]
    with caplog.at_level("WARNING"):
        for size in (40, 40, 36):
            compiled.inpaint(photo[:32, :size], mask[:32, :size], "a face", steps=1)
    assert [r.getMessage() for r in caplog.records if "compiling the transformer" in r.getMessage()] == [
        f"FLUX.1 Fill: compiling the transformer for {w}x32 photos (their first request; minutes on a GPU without "
        "cached artifacts, then cached)" for w in (40, 36)]
    with pytest.raises(BadInput, match="mask is empty"):  # as on the UNet families, not the photo returned
        generator.inpaint(photo, np.zeros_like(mask), "a face", steps=1)
    with pytest.raises(BadInput, match="repainting a masked photo needs FLUX.1 Fill"):
        FluxGenerator(build_tiny_flux()).inpaint(photo, mask, "a face", steps=1)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    made = CliRunner().invoke(app, ["inpaint", "--model", str(tmp_path / "fill"), "--image", str(tmp_path / "photo.png"),
                                    "--mask", str(tmp_path / "mask.png"), "--prompt", "a face", "--steps", "2",
                                    "--out", str(tmp_path / "out.png")])
    assert made.exit_code == 0, made.output
    record = read_provenance((tmp_path / "out.png").read_bytes())
    assert record["kind"] == "inpaint" and record["flux_variant"] == "fill" and record["size"] == [40, 32]
    assert record["feather"] == 4  # the command's default, as on the UNet families
    # --feather softens the mask's inner edge: the edge leans towards the photo, the middle is the
    # repainted face, and outside the mask the photo's own pixels stay, byte for byte.
    soft = {}
    for feather in ("0", "2"):
        made = CliRunner().invoke(app, ["inpaint", "--model", str(tmp_path / "fill"), "--image", str(tmp_path / "photo.png"),
                                        "--mask", str(tmp_path / "mask.png"), "--prompt", "a face", "--steps", "2",
                                        "--feather", feather, "--out", str(tmp_path / f"feather{feather}.png")])
        assert made.exit_code == 0, made.output
        soft[feather] = np.asarray(Image.open(tmp_path / f"feather{feather}.png")).astype(int)
    assert np.array_equal(soft["2"][~inside], photo[~inside]) and np.array_equal(soft["0"][~inside], photo[~inside])
    edge = np.zeros_like(inside)
    edge[8, 12:30] = edge[23, 12:30] = edge[8:24, 12] = edge[8:24, 29] = True
    assert np.abs(soft["2"] - photo)[edge].mean() < 0.5 * np.abs(soft["0"] - photo)[edge].mean()
    assert np.abs(soft["2"] - soft["0"])[15:17, 19:23].max() <= 2  # far from the edge: the repainted pixels


def test_a_folders_weights_hash_alike_in_bf16_and_fp32(tmp_path, monkeypatch):
    """FLUX.1's files are bf16: loaded in bf16 on a GPU or in fp32 on a CPU, they are the same model
    in every artifact's provenance (each load hashed afresh: no cache shared between them)."""
    base = build_tiny_flux()
    base.to("cpu", torch.bfloat16)
    save_flux(base, tmp_path / "flux")
    hashes = {}
    for dtype in (torch.bfloat16, None):
        monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / f"cache-{dtype}"))
        loaded = load_flux(str(tmp_path / "flux"), dtype)
        assert loaded.transformer.dtype == (dtype or torch.float32)
        hashes[dtype] = loaded.model_hash()
    assert hashes[torch.bfloat16] == hashes[None]
    # In fp32 on the CPU, every module runs in fp32 (transformers loads the text encoders in the files'
    # bf16 where diffusers widens the transformer: a dtype mismatch before).
    made = FluxGenerator(loaded, precision="fp32").generate("a portrait", steps=1)
    assert made.images[0].size == (32, 32)
