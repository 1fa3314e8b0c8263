"""FLUX's compiled transformer on static buffers (CUDA graphs on CUDA): a call copies its tensors in,
so people, strengths, regions and a person's own adapter are data of one captured shape, and the
image is the compiled transformer's."""
import numpy as np
import pytest
import torch

from ray_faceid.identity.flux_adapter import load_flux_adapter
from ray_faceid.pipelines.flux import load_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from ray_faceid.pipelines.generate import IdentityCondition
from tests.pipelines.test_flux_identity import SIZE, embedding, files  # noqa: F401 - files: a fixture


def generator(files, device="cpu", **kwargs) -> FluxGenerator:  # noqa: F811
    base = load_flux(str(files / "flux"))
    adapter = load_flux_adapter(str(files / "ip_adapter.safetensors"), base.transformer)
    return FluxGenerator(base, adapter, device=device, backend="torch.compile", **kwargs)


def image(gen, people, seed=3) -> np.ndarray:
    result = gen.generate("a portrait", people, seed=seed, steps=2, width=SIZE, height=SIZE)
    return np.asarray(result.images[0]).astype(int)


def test_static_buffers_take_each_calls_people(files):  # noqa: F811
    """On the CPU (nothing to capture) the buffers' path runs as on CUDA: each call's people copied
    into one shape's inputs."""
    from ray_faceid.engines.flux_cuda_graphs import GraphedTransformer

    buffered = generator(files, cuda_graphs=True)
    assert isinstance(buffered.denoiser, GraphedTransformer) and not buffered.denoiser.capture
    plain = generator(files)
    assert not isinstance(plain.denoiser, GraphedTransformer)  # the default on the CPU
    two = [IdentityCondition("a", embedding(1), region=(0.0, 0.0, 0.5, 1.0)), IdentityCondition("b", embedding(2))]
    for people in ([IdentityCondition("a", embedding(1))], two, [IdentityCondition("b", embedding(2), scale=0.5)], []):
        assert np.array_equal(image(buffered, people), image(plain, people))
    assert len(buffered.denoiser.shapes) == 1  # one bucket, one size: one shape for every call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph capture path needs CUDA")
def test_cuda_graphs_replay_new_people_as_data(files):  # noqa: F811
    graphed = generator(files, "cuda", precision="fp32")
    eager = FluxGenerator(graphed.base, graphed.adapter, device="cuda", precision="fp32")
    graphed.warm_up([(SIZE, SIZE)], 1)
    assert graphed.denoiser.graphs == 1
    for people in ([IdentityCondition("a", embedding(1))], [IdentityCondition("b", embedding(2), scale=0.5)], []):
        assert np.abs(image(graphed, people) - image(eager, people)).max() <= 1
    assert graphed.denoiser.graphs == 1
