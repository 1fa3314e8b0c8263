"""Write pulid_encoders_reference.npz: the outputs of PuLID's EVA-CLIP code and facexlib's BiSeNet on
the recipe's weights and inputs (pulid_encoder_recipe.py), with the names and shapes of their
weights. Their code needs timm (so torchvision), einops and a torch other than the project's pinned
one, so it runs in a separate environment, e.g.:

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch torchvision timm einops ftfy regex
    git clone https://github.com/ToTheBeginning/PuLID /tmp/PuLID
    git clone https://github.com/xinntao/facexlib /tmp/facexlib
    /tmp/ref/bin/python tests/face/make_pulid_encoder_references.py /tmp/PuLID /tmp/facexlib

(only facexlib's parsing/bisenet.py and parsing/resnet.py are imported: they need torch alone)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from pulid_encoder_recipe import EVA_TOY, REFERENCE, inputs, recipe_state  # noqa: E402


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _filled(module: torch.nn.Module, seed: int) -> dict:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = recipe_state(shapes, seed)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return shapes


def main(pulid: str, facexlib: str) -> None:
    os.environ["RoPE"] = "1"  # as EVA-CLIP's factory sets it for a rotary model
    sys.path.insert(0, pulid)
    from eva_clip.model import _build_vision_tower

    toy = dict(EVA_TOY)
    embed_dim = toy.pop("embed_dim")
    eva = _build_vision_tower(embed_dim, dict(toy, eva_model_name="eva-clip-l-14-336", xattn=True, fusedLN=True,
                                              rope=True, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True,
                                              subln=True, drop_path_rate=0)).eval()
    eva_shapes = _filled(eva, seed=1)
    _module(Path(facexlib) / "facexlib" / "parsing" / "resnet.py", "resnet")
    source = (Path(facexlib) / "facexlib" / "parsing" / "bisenet.py").read_text().replace("from .resnet", "from resnet")
    bisenet_path = Path("/tmp/bisenet_reference.py")
    bisenet_path.write_text(source)
    parser = _module(bisenet_path, "bisenet_reference").BiSeNet(num_class=19).eval()
    parser_shapes = _filled(parser, seed=2)
    given = inputs()
    with torch.no_grad():
        embedding, hidden = eva(torch.from_numpy(given["eva_images"]), return_all_features=False, return_hidden=True,
                                shuffle=False)
        scores = parser(torch.from_numpy(given["parsing_images"]))[0]
    np.savez_compressed(HERE / REFERENCE, eva_embedding=embedding.numpy(), eva_hidden=torch.stack(hidden).numpy(),
                        parsing_scores=scores.numpy(),
                        eva_shapes=json.dumps({k: list(v) for k, v in eva_shapes.items()}),
                        parsing_shapes=json.dumps({k: list(v) for k, v in parser_shapes.items()}),
                        made_with=f"torch {torch.__version__}")
    print(f"wrote {HERE / REFERENCE}: EVA embedding {tuple(embedding.shape)}, {len(hidden)} hidden states, "
          f"parsing scores {tuple(scores.shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
