"""Our ports of PuLID-FLUX's face encoders against their authors' code: EVA02-CLIP's vision tower (as
PuLID ships EVA-CLIP) and facexlib's BiSeNet face parser, on a toy configuration of the published
structure with the same seeded weights on both sides (pulid_encoder_recipe.py). Their code needs
timm, torchvision and another torch: its outputs were written by make_pulid_encoder_references.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.face.pulid_encoder_recipe import EVA_TOY, REFERENCE, inputs, recipe_state

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def reference():
    return np.load(HERE / REFERENCE)


def _published(state: dict, prefix: str = "") -> dict:
    return {prefix + k: torch.from_numpy(v) for k, v in state.items()}


def test_the_eva_clip_tower_loads_its_published_names_and_gives_eva_clips_outputs(reference, tmp_path):
    from ray_faceid.face.eva_clip import HIDDEN_AT, load_eva_clip

    shapes = json.loads(str(reference["eva_shapes"]))
    # Saved as EVA-CLIP publishes it: the whole CLIP's state dict, the tower's under visual.*, its
    # rotary tables in it too, and a text tower that is not read.
    checkpoint = {**_published(recipe_state(shapes, seed=1), "visual."),
                  **{f"visual.{k}": torch.zeros(v) for k, v in shapes.items() if "freqs_" in k},
                  "text.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())}
    torch.save(checkpoint, tmp_path / "EVA02_CLIP_toy.pt")
    tower = load_eva_clip(str(tmp_path / "EVA02_CLIP_toy.pt"))
    assert tower.config.heads == EVA_TOY["width"] // EVA_TOY["head_width"] and tower.image_size == EVA_TOY["image_size"]
    with torch.no_grad():
        embedding, hidden = tower(torch.from_numpy(inputs()["eva_images"]))
    assert len(hidden) == len(HIDDEN_AT) == len(reference["eva_hidden"])
    np.testing.assert_allclose(embedding.numpy(), reference["eva_embedding"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(torch.stack(hidden).numpy(), reference["eva_hidden"], rtol=1e-4, atol=1e-4)


def test_the_face_parser_loads_facexlibs_names_and_gives_its_classes(reference, tmp_path):
    from ray_faceid.face.face_parsing import load_face_parsing

    shapes = json.loads(str(reference["parsing_shapes"]))
    state = _published(recipe_state(shapes, seed=2))
    state.update({k: torch.zeros((), dtype=torch.long) for k in shapes if k.endswith("num_batches_tracked")})
    torch.save(state, tmp_path / "parsing_bisenet.pth")
    parser = load_face_parsing(str(tmp_path / "parsing_bisenet.pth"))
    with torch.no_grad():
        scores = parser(torch.from_numpy(inputs()["parsing_images"]))
    np.testing.assert_allclose(scores.numpy(), reference["parsing_scores"], rtol=1e-4, atol=1e-4)
    assert (scores.argmax(1).numpy() == reference["parsing_scores"].argmax(1)).mean() > 0.999


def test_a_file_of_other_names_is_refused_in_one_line(reference, tmp_path):
    from ray_faceid.errors import UnsupportedModel
    from ray_faceid.face.eva_clip import load_eva_clip
    from ray_faceid.face.face_parsing import load_face_parsing

    shapes = json.loads(str(reference["eva_shapes"]))
    state = _published(recipe_state(shapes, seed=1), "visual.")
    state["visual.blocks.3.attn.qkv.weight"] = state.pop("visual.blocks.3.attn.q_proj.weight")  # EVA01's layout
    torch.save(state, tmp_path / "eva01.pt")
    with pytest.raises(UnsupportedModel, match="not EVA02-CLIP's vision tower in its published names"):
        load_eva_clip(str(tmp_path / "eva01.pt"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UnsupportedModel, match="not facexlib's BiSeNet face parser"):
        load_face_parsing(str(tmp_path / "other.pth"))
    (tmp_path / "damaged.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1")  # a pointer, not weights
    for load, path in ((load_eva_clip, "damaged.pt"), (load_face_parsing, "damaged.pt")):
        with pytest.raises(UnsupportedModel, match="not a readable"):
            load(str(tmp_path / path))
