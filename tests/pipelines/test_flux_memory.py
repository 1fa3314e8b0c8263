"""How a FLUX replica holds the model (pipelines/flux_memory.py): the memory FLUX.1-dev's published
architecture needs in bf16, with its text encoders on the CPU and with fp8 transformer weights; a
model that does not fit is one line naming what lowers it, when a Serve config is read; fp8 weights
and CPU text encoders make (nearly) the same image."""
import numpy as np
import pytest
import torch

from ray_faceid.errors import BadInput
from ray_faceid.pipelines import flux_memory
from ray_faceid.pipelines.flux import build_tiny_flux, flux_dev_modules, save_flux
from ray_faceid.pipelines.flux_sampling import FluxGenerator
from tests.identity.test_face_plus import image_encoder_folder  # noqa: F401 - a fixture: a tiny CLIP, 16-d embeds
from tests.pipelines.test_flux_identity import files  # noqa: F401 - a fixture: tiny-flux and its FLUX IP-Adapter

GB = 1e9


@pytest.fixture(scope="module")
def dev_shapes():
    """FLUX.1-dev's tensors' names and shapes, built on the meta device (no memory)."""
    return {name: flux_memory.module_shapes(module) for name, module in flux_dev_modules("meta").items()}


def test_flux_dev_needs_what_its_parameters_say_and_each_setting_lowers_it(dev_shapes):
    full = flux_memory.plan_from_shapes(dev_shapes, "bf16")
    assert 23.5 * GB < full.components["transformer"] < 24.1 * GB  # 11.9B parameters, 2 bytes each
    assert 9.3 * GB < full.components["text_encoder_2"] < 9.8 * GB  # T5-XXL's encoder, 4.8B
    assert 33 * GB < full.gpu_bytes < 34.5 * GB
    offloaded = flux_memory.plan_from_shapes(dev_shapes, "bf16", text_encoders="cpu")
    assert offloaded.gpu_bytes == full.gpu_bytes - full.components["text_encoder"] - full.components["text_encoder_2"]
    small = flux_memory.plan_from_shapes(dev_shapes, "bf16", text_encoders="cpu", transformer_weights="fp8")
    assert 11.8 * GB < small.components["transformer"] < 12.3 * GB  # a byte a weight, the norms and biases in bf16
    assert small.hidden == 3072 and small.widest_linear == 3072 * 6 * 3072  # the dual-stream blocks' modulation
    # A 16 GB card: with both settings, one image at a time (a Serve batch of 16 adds ~7 GB of activations).
    assert small.for_calls(1, 1024, 1024).needed_bytes < 16 * GB < small.for_calls(16, 1024, 1024).needed_bytes
    assert 6.5 * GB < small.for_calls(16, 1024, 1024).activations < 8 * GB
    with pytest.raises(BadInput, match="has 24.0 GB: set flux_text_encoders: cpu and flux_transformer_weights: fp8"):
        flux_memory.check_fits(full, int(24 * GB), "a GPU")
    flux_memory.check_fits(offloaded, int(80 * GB), "a GPU")
    with pytest.raises(BadInput, match="use a GPU with more memory"):
        flux_memory.check_fits(small, int(8 * GB), "a GPU")
    # fp8_matmul holds what fp8 does (its scales in float32): the hint names only what is left to set.
    multiplying = flux_memory.plan_from_shapes(dev_shapes, "bf16", transformer_weights="fp8_matmul")
    assert 0 < multiplying.components["transformer"] - small.components["transformer"] < 0.01 * GB
    # Its largest transient is one layer's input scaled and narrowed (the single-stream blocks' 5 x 3072
    # wide output projection, bf16 then float8) instead of one widened weight.
    assert multiplying.widest_input == 5 * 3072
    added = multiplying.for_calls(16, 1024, 1024).activations - small.for_calls(16, 1024, 1024).activations
    assert added == 16 * (512 + 64 * 64) * 5 * 3072 * 3 - small.widest_linear * 2
    with pytest.raises(BadInput, match="has 20.0 GB: set flux_text_encoders: cpu$"):
        flux_memory.check_fits(multiplying, int(20 * GB), "a GPU")


def test_a_folder_is_sized_from_its_headers(tmp_path):
    base = build_tiny_flux()
    save_flux(base, tmp_path / "flux")
    for options in ({}, {"text_encoders": "cpu", "transformer_weights": "fp8"}):
        from_files = flux_memory.plan_of_folder(tmp_path / "flux", "fp32", **options)
        assert from_files.components == flux_memory.plan_of_base(base, "fp32", **options).components


def test_a_serve_config_that_cannot_fit_its_gpu_is_refused_when_read(files, image_encoder_folder,  # noqa: F811
                                                                     monkeypatch):
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig

    monkeypatch.setattr(flux_memory, "HEADROOM", 1e6)  # the tiny model's few MB made to not fit 1 GB
    config = ServeConfig(model="tiny-flux", adapter=str(files / "ip_adapter.safetensors"),
                         image_encoder=str(image_encoder_folder), api_tokens={"acme": "acme-token-0123456789"},
                         generator_gpus=1, generator_gpu_memory_gb=1)
    with pytest.raises(BadInput, match="generator_gpu_memory_gb 1 x generator_gpus 1 has 1.0 GB: set "
                                       "flux_text_encoders: cpu and flux_transformer_weights: fp8"):
        resolve_config(config)
    monkeypatch.setattr(flux_memory, "HEADROOM", 1.15)
    resolve_config(config)  # it fits
    with pytest.raises(BadInput, match="set generator_gpus too"):  # on no GPU: nothing it could check
        resolve_config(config.model_copy(update={"generator_gpus": 0}))
    with pytest.raises(BadInput, match="set both adapter and image_encoder"):  # the API renders people
        resolve_config(config.model_copy(update={"adapter": None, "image_encoder": None}))
    with pytest.raises(BadInput, match="flux_transformer_weights: for FLUX models"):
        resolve_config(config.model_copy(update={"model": "tiny", "generator_gpu_memory_gb": None,
                                                 "flux_transformer_weights": "fp8"}))


def test_fp8_weights_and_cpu_text_encoders_make_nearly_the_image_of_bf16():
    def made(**options):
        generator = FluxGenerator(build_tiny_flux(), precision="bf16", **options)
        result = generator.generate("a portrait photo", seed=1, steps=4)
        return generator, np.asarray(result.images[0]).astype(int), result.provenance[0]

    _, wide, _ = made()
    generator, narrow, record = made(transformer_weights="fp8", text_encoders="cpu")
    linear = [m for m in generator.base.transformer.modules() if isinstance(m, flux_memory.Float8Linear)]
    assert linear and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in linear)
    assert not any(type(m) is torch.nn.Linear for m in generator.base.transformer.modules())
    assert record["transformer_weights"] == "fp8"
    # fp8 against bf16 differs about as much as bf16 against fp32 (measured: 4 and 5 of 255 at most).
    assert np.abs(narrow - wide).max() <= 8 and np.abs(narrow - wide).mean() < 2
    # fp8_matmul rounds the activations too (measured: 4 of 255 at most, mean 0.86).
    generator, multiplied, record = made(transformer_weights="fp8_matmul")
    linear = [m for m in generator.base.transformer.modules() if isinstance(m, flux_memory.Float8Linear)]
    assert linear and all(m.matmul for m in linear) and record["transformer_weights"] == "fp8_matmul"
    assert np.abs(multiplied - wide).max() <= 8 and np.abs(multiplied - wide).mean() < 2
    assert (multiplied != narrow).any()


def test_fp8_matmul_multiplies_in_float8_with_each_token_scaled_on_its_own():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = flux_memory.Float8Linear(linear, matmul=True)
    assert layer.matmul and layer.scale.dtype == torch.float32
    x = torch.randn(2, 5, 64)
    x[0, 0] *= 1000  # one token far larger than the rest
    exact = linear(x).detach()
    product = layer(x)
    assert product.shape == exact.shape and product.dtype == x.dtype
    # Each token's error is float8's (a few %) of its own size, the small tokens' too: with one scale
    # for all of them, the large token's would round the others' activations to nothing.
    error = (product - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert error.max() < 0.08
    # The activations really are rounded to float8: the product differs from fp8 weights alone.
    widened = flux_memory.Float8Linear(linear)(x)
    assert not widened.allclose(product)
    # A layer whose sides the float8 kernels do not take widens its weight instead.
    assert not flux_memory.Float8Linear(torch.nn.Linear(64, 24), matmul=True).matmul
    # In fp16 a quiet token's scale would round to 0 (and 0/0 is NaN): every token stays finite.
    half = flux_memory.Float8Linear(linear.half(), matmul=True)
    quiet = torch.stack([torch.zeros(64), torch.full((64,), 1e-6), torch.randn(64)]).half()
    assert torch.isfinite(half(quiet)).all()


def test_fp8_matmul_where_float8_products_do_not_run_is_one_line(monkeypatch):
    flux_memory.check_fp8(torch.device("cpu"), "torch", "fp8_matmul")  # they run here

    def unsupported(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration.\nFor RowWise scaling, ...")

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)  # as an older GPU or torch answers
    with pytest.raises(BadInput, match=r"float8 products scaled per row do not run on cpu with torch .* \(Invalid "
                                       r"scaling configuration.\): use fp8"):
        flux_memory.check_fp8(torch.device("cpu"), "torch", "fp8_matmul")
    flux_memory.check_fp8(torch.device("cpu"), "torch", "fp8")  # fp8 weights widen: no float8 product


def test_a_replica_on_part_of_a_gpu_counts_on_its_share(files, image_encoder_folder, monkeypatch):  # noqa: F811
    """Replicas placed on one GPU start together and each sees it all free: a replica of
    generator_gpus 0.5 checks its plan against half the card, not the whole of it."""
    from deployments.flux_generator import fits_this_gpu
    from ray_faceid.config import ServeConfig
    from ray_faceid.pipelines.model_ref import resolve_model

    config = ServeConfig(model="tiny-flux", adapter=str(files / "ip_adapter.safetensors"),
                         image_encoder=str(image_encoder_folder), api_tokens={"acme": "acme-token-0123456789"},
                         generator_gpus=1)
    plan = flux_memory.replica_plan(resolve_model("tiny-flux", flux=True), "fp32", "same", "same",
                                    config.generator_batch_size * config.limits.max_images, [], config.adapter,
                                    config.image_encoder)
    card = int(plan.needed_bytes * 1.5)  # the whole card fits the plan, half of it does not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (card, card))
    assert fits_this_gpu(config, "fp32") == plan.line()
    with pytest.raises(BadInput, match="generator_gpus 0.5"):
        fits_this_gpu(config.model_copy(update={"generator_gpus": 0.5}), "fp32")


def test_a_fill_replica_is_planned_at_the_largest_photo_it_repaints():
    """FLUX.1 Fill repaints each photo at its own size, up to 2 MP: a replica or render actor given no
    size plans for that, not for the native 1024 px (half the activations)."""
    from ray_faceid.pipelines.model_ref import resolve_model

    fill = flux_memory.replica_plan(resolve_model("tiny-flux-fill", flux=True), "fp32", "same", "same", 1, [])
    assert fill.calls == "1 images at 1448x1448"
    given = flux_memory.replica_plan(resolve_model("tiny-flux-fill", flux=True), "fp32", "same", "same", 1, [(64, 48)])
    assert given.calls == "1 images at 64x48"  # inpaint plans the size it repaints at
