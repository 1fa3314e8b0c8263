"""Weights and inputs for checking our ports of PuLID's face encoders (face/eva_clip.py,
face/face_parsing.py) against their authors' code: both sides fill the same published names from one
seeded recipe (numpy only, so the reference script runs it in another environment), and only the
reference's outputs are stored (pulid_encoders_reference.npz, written by
make_pulid_encoder_references.py)."""
import numpy as np

# A toy EVA02-CLIP vision tower with the published one's structure (64-wide heads, SwiGLU of 2.6667x,
# rotary positions from a 16 grid, hidden states entering blocks 4 to 20): 128 wide, 21 blocks, 2x2
# patches of 14 px, an 8-d embedding.
EVA_TOY = dict(image_size=28, layers=21, width=128, head_width=64, mlp_ratio=2.6667, patch_size=14, embed_dim=8)
PARSING_SIZE = 48  # the parser's input side (it brings features down 32 times)
REFERENCE = "pulid_encoders_reference.npz"


def recipe_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Each published name's values, drawn in name order: norms near 1, biases and running means small,
    running variances in [0.5, 1.5], matrices scaled by their fan-in; rotary tables and counters left out."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if "freqs_" in name or name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            values = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("cls_token", "pos_embed")):
            values = 0.5 * rng.standard_normal(shape)
        elif len(shape) == 1 and name.endswith("weight"):  # a norm's scale
            values = 1 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            values = 0.1 * rng.standard_normal(shape)
        else:
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state[name] = values.astype(np.float32)
    return state


def inputs(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"eva_images": rng.standard_normal((2, 3, EVA_TOY["image_size"], EVA_TOY["image_size"])).astype(np.float32),
            "parsing_images": rng.standard_normal((1, 3, PARSING_SIZE, PARSING_SIZE)).astype(np.float32)}
