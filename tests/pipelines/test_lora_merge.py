"""`ray-faceid merge-lora`: a few-step LoRA fused into a user's base gives, with the scheduler the
merge sets, the image diffusers gives with that LoRA loaded and that scheduler; a LoRA that fits no
layer of the base, or a folder that is not new, is refused in one line."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.errors import UnsupportedModel
from ray_faceid.pipelines.generate import IdentityPipeline
from ray_faceid.pipelines.lora_merge import diffusers_pipeline
from ray_faceid.pipelines.models import build_tiny, load_base
from ray_faceid.pipelines.schedulers import Sampler

pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT (the `lora` extra)")
SIZE = dict(width=32, height=32)


def save_like_a_user(family: str, folder) -> None:
    """The tiny base saved as diffusers' own pipeline saves a model (not marked as our smoke base)."""
    diffusers_pipeline(build_tiny(family=family)).save_pretrained(folder)


def save_lora(family: str, path, seed: int = 0) -> None:
    """A LoRA over the UNet's attention, saved by diffusers in its own layout (as LCM-LoRA ships)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_tiny(family=family).unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = {k: 3.0 * v for k, v in get_peft_model_state_dict(unet).items()}  # strong enough to show in 4 steps
    saver = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    saver.save_lora_weights(str(path.parent), unet_lora_layers=layers, weight_name=path.name)


def diffusers_image(family: str, folder, lora, scale: float) -> np.ndarray:
    """diffusers' own path: the base folder, the LoRA loaded (not fused) at its scale, LCM, 4 steps, guidance 1."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = kind.from_pretrained(folder)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="fast")
    pipe.set_adapters(["fast"], adapter_weights=[scale])
    image = pipe("a portrait", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(7),
                 output_type="np", **SIZE).images[0]
    return np.round(image * 255).astype(int)


def ours(folder) -> np.ndarray:
    """The merged folder with nothing asked: its own sampler, steps and guidance."""
    got = IdentityPipeline(load_base(str(folder))).generate("a portrait", [], seed=7, **SIZE)
    assert (got.provenance[0]["steps"], got.provenance[0]["guidance"]) == (4, 1.0)
    return np.asarray(got.images[0]).astype(int)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_merged_few_step_lora_gives_diffusers_own_image_with_its_scheduler(tmp_path, family):
    base, lora, out = tmp_path / "base", tmp_path / "loras" / "lcm-lora.safetensors", tmp_path / "fast"
    save_like_a_user(family, base)
    lora.parent.mkdir()
    save_lora(family, lora)
    done = CliRunner().invoke(app, ["merge-lora", "--model", str(base), "--lora", str(lora), "--lora-scale", "0.8",
                                    "--scheduler", "lcm", "--steps", "4", "--guidance", "1", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "sampler LCMScheduler, 4 steps, guidance 1;" in " ".join(done.output.split())
    merged = load_base(str(out))
    assert type(merged.scheduler).__name__ == "LCMScheduler"  # the folder's own: every path samples with it
    record = json.loads((out / "model_index.json").read_text())["_ray_faceid_merged"]
    assert record["loras"][0]["file"] == "lcm-lora.safetensors" and record["loras"][0]["scale"] == 0.8
    assert record["base_weights"] == load_base(str(base)).model_hash()
    assert "lcm-lora.safetensors@" in merged.model_id
    got = ours(out)
    assert np.abs(got - diffusers_image(family, base, lora, 0.8)).max() <= 1
    # merged again (another LoRA on the fast model), its own steps and guidance stay unless new ones are given
    again = CliRunner().invoke(app, ["merge-lora", "--model", str(out), "--lora", str(lora), "--lora-scale", "0.1",
                                     "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert load_base(str(tmp_path / "again")).sampling == {"steps": 4, "guidance": 1.0}
    # the LoRA reaches the image: the base alone, with the same sampler, is another image
    plain = IdentityPipeline(load_base(str(base))).generate("a portrait", [], seed=7, steps=4, guidance=1.0,
                                                            sampler=Sampler.parse("lcm"), **SIZE)
    assert np.abs(got - np.asarray(plain.images[0]).astype(int)).max() > 2


def test_a_lora_of_another_family_or_a_used_folder_is_refused_in_one_line(tmp_path):
    base, lora = tmp_path / "base", tmp_path / "loras" / "sdxl-lora.safetensors"
    save_like_a_user("sd1", base)
    lora.parent.mkdir()
    save_lora("sdxl", lora)
    out = tmp_path / "merged"
    refused = CliRunner().invoke(app, ["merge-lora", "--model", str(base), "--lora", str(lora), "--out", str(out)])
    assert refused.exit_code == 2 and f"LoRA {lora}" in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "merged.partial").exists()
    taken = CliRunner().invoke(app, ["merge-lora", "--model", str(base), "--lora", str(lora), "--out", str(base)])
    assert taken.exit_code == 2 and "is not an empty folder" in taken.stderr
    (tmp_path / "a-file").write_text("mine")  # a file, a URI, a scale of 0: one line each, before any work
    for extra, says in ((["--out", str(tmp_path / "a-file")], "is not an empty folder"),
                        (["--out", "s3://bucket/merged"], "a local folder"),
                        (["--out", str(out), "--lora-scale", "0"], "--lora-scale 0 changes nothing")):
        refused = CliRunner().invoke(app, ["merge-lora", "--model", str(base), "--lora", str(lora), *extra])
        assert refused.exit_code == 2 and says in refused.stderr, refused.output
    assert (tmp_path / "a-file").read_text() == "mine" and not list(tmp_path.glob(".merged.merge-*"))
    # A folder's own sampling defaults, edited by hand out of range, are named when it loads.
    index = base / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | {"_ray_faceid_sampling": {"steps": 0}}))
    with pytest.raises(UnsupportedModel, match="_ray_faceid_sampling must be"):
        load_base(str(base))
