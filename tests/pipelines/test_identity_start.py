"""The step a person's identity starts at (PuLID-FLUX's start_step, on every family): the steps before
it run as without the person, the rest as with them; rows of other start steps share a batch, each
the image made alone; compiled, it is an input (no recompile); out of range, one line."""
import numpy as np
import pytest

from ray_faceid.errors import BadInput
from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition
from tests.pipelines.test_pulid_flux import files, generator, tokens  # noqa: F401 - a fixture: tiny-flux, PuLID's file

STEPS = 3


def pixels(result, k=0) -> np.ndarray:
    return np.asarray(result.images[k]).astype(int)


def test_flux_identity_starts_at_its_step_and_rows_of_other_starts_share_a_batch(files):  # noqa: F811
    gen = generator(files)
    ann = IdentityCondition("ann", tokens(1))
    made = {start: gen.generate("a portrait", [ann], seed=3, steps=STEPS, width=32, height=32, identity_start=start)
            for start in (0, 1, 2)}
    nobody = pixels(gen.generate("a portrait", [], seed=3, steps=STEPS, width=32, height=32))
    assert np.array_equal(pixels(made[0]), pixels(gen.generate("a portrait", [ann], seed=3, steps=STEPS, width=32,
                                                               height=32)))
    # Later, less of the person: each start its own image, between the person's and nobody's.
    distance = {start: np.abs(pixels(made[start]) - nobody).mean() for start in made}
    assert distance[0] > distance[1] > distance[2] > 0
    assert made[2].provenance[0]["identity_start"] == 2 and "identity_start" not in made[0].provenance[0]
    together = gen.generate_items([GenerationItem("a portrait", [ann], "", 3, start) for start in (2, 0)], STEPS,
                                  width=32, height=32)
    assert np.abs(pixels(together, 0) - pixels(made[2])).max() <= 1
    assert np.abs(pixels(together, 1) - pixels(made[0])).max() <= 1
    with pytest.raises(BadInput, match="identity start 3 is past the last of 3 steps: give a step from 0 to 2"):
        gen.generate("a portrait", [ann], steps=STEPS, width=32, height=32, identity_start=STEPS)


def test_flux_identity_start_is_an_input_of_the_compiled_transformer(files):  # noqa: F811
    import torch
    from torch._dynamo.utils import counters

    compiled, eager = generator(files, "torch.compile"), generator(files)
    ann = IdentityCondition("ann", tokens(1))
    compiled.generate("a portrait", [ann], seed=3, steps=STEPS, width=32, height=32)  # compiled here
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        late = compiled.generate("a portrait", [ann], seed=3, steps=STEPS, width=32, height=32, identity_start=2)
    assert counters["stats"]["unique_graphs"] == graphs
    want = eager.generate("a portrait", [ann], seed=3, steps=STEPS, width=32, height=32, identity_start=2)
    assert np.abs(pixels(late) - pixels(want)).max() <= 1


def test_unet_identity_starts_at_its_step(tiny_base, spec128):
    from ray_faceid.identity.adapter import IdentityAdapter
    from ray_faceid.pipelines.generate import IdentityPipeline

    pipe = IdentityPipeline(tiny_base, IdentityAdapter.for_unet(tiny_base.unet, spec128))
    person = IdentityCondition("ann", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    made = {start: pixels(pipe.generate("a portrait", [person], seed=2, steps=STEPS, identity_start=start))
            for start in (0, 1, 2)}
    nobody = pixels(pipe.generate("a portrait", [IdentityCondition("ann", person.embeddings, scale=0.0)], seed=2,
                                  steps=STEPS))
    distance = {start: np.abs(made[start] - nobody).mean() for start in made}
    assert distance[0] > distance[1] > distance[2] > 0
    together = pipe.generate_items([GenerationItem("a portrait", [person], "", 2, start) for start in (1, 0)], STEPS)
    assert np.abs(pixels(together, 0) - made[1]).max() <= 1 and np.abs(pixels(together, 1) - made[0]).max() <= 1
