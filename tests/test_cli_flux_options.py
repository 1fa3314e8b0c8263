"""FLUX options a new user gets wrong are refused in one line that names the flag and what it takes,
before Ray starts or a model loads; and `compile` says what it builds (from the new-user trial of
FLUX's ONNX Runtime backend and step cache)."""
import pytest
from typer.testing import CliRunner

from ray_faceid.cli import app


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _said(result) -> str:
    return " ".join(result.output.replace("│", " ").split())  # click's error box wraps the line


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "catalog.jsonl"
    path.write_text('{"id": "r", "prompt": "a portrait", "identities": []}\n')
    return path


def test_render_refuses_what_flux_does_not_run_before_ray_starts(tmp_path, catalog):
    """Each was a Ray Data actor's traceback after the cluster started (exit 1)."""
    for options, said in ((["--backend", "onnxruntime", "--precision", "fp16"], "runs FLUX's transformer in fp32"),
                          (["--imr", str(tmp_path / "imr")], "--imr: not built for FLUX yet"),
                          (["--backend", "tensorrt"], "--backend: not built for FLUX yet")):
        refused = _run("render", str(catalog), str(tmp_path / "out"), "--model", "tiny-flux", "--registry",
                       str(tmp_path / "registry"), *options)
        assert refused.exit_code == 2 and said in refused.stderr, refused.output
        assert "Traceback" not in refused.output and "ray" not in refused.stderr.lower(), refused.output
        assert not (tmp_path / "out").exists()  # nothing written, nothing recorded for a job that never ran


def test_a_step_cache_out_of_range_names_the_flag(tmp_path, catalog):
    for command in (["generate", "--prompt", "a portrait", "--out", str(tmp_path / "x.png")],
                    ["render", str(catalog), str(tmp_path / "out"), "--registry", str(tmp_path / "registry")]):
        refused = _run(*command, "--model", "tiny-flux", "--step-cache", "2")
        assert refused.exit_code == 2 and "--step-cache" in _said(refused), refused.output


def test_onnx_named_as_a_backend_on_flux_points_to_onnxruntime(tmp_path):
    refused = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--backend", "onnx",
                   "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 2 and "--backend onnxruntime" in refused.stderr, refused.output


def test_a_backend_name_that_is_none_is_refused_as_it_is_parsed(tmp_path, catalog):
    """Before, `--backend foo` said "not built for FLUX yet" on FLUX and nothing about it on a UNet."""
    for command in (["generate", "--model", "tiny", "--prompt", "a portrait", "--out", str(tmp_path / "x.png")],
                    ["generate", "--model", "tiny-flux", "--prompt", "a portrait", "--out", str(tmp_path / "x.png")],
                    ["inpaint", "--model", "tiny-flux-fill", "--image", str(catalog), "--mask", str(catalog), "--prompt",
                     "a face", "--out", str(tmp_path / "x.png")],
                    ["render", str(catalog), str(tmp_path / "out"), "--registry", str(tmp_path / "registry")]):
        refused = _run(*command, "--backend", "foo")
        said = _said(refused)
        assert refused.exit_code == 2 and "--backend" in said and "'foo'" in said and "torch.compile" in said, said
        assert "not built for FLUX" not in said


def test_render_refuses_a_job_size_flux_cannot_make_before_ray_starts(tmp_path, catalog):
    for size, said in (("3000", "size must look like 512x512"), ("30x30", "multiples of 4 up to 4096, not 30x30: try 32x32")):
        refused = _run("render", str(catalog), str(tmp_path / "out"), "--model", "tiny-flux", "--registry",
                       str(tmp_path / "registry"), "--size", size)
        assert refused.exit_code == 2 and said in _said(refused), refused.output
        assert not (tmp_path / "out").exists()


def test_render_on_flux_without_an_adapter_refuses_rows_that_name_people_before_ray_starts(tmp_path):
    catalog = tmp_path / "people.jsonl"
    catalog.write_text('{"id": "a", "prompt": "a beach"}\n{"id": "b", "prompt": "a portrait", "identities": ["ann"]}\n')
    refused = _run("render", str(catalog), str(tmp_path / "out"), "--model", "tiny-flux", "--registry",
                   str(tmp_path / "registry"))
    said = _said(refused)
    assert refused.exit_code == 2 and "1 row names people (b)" in said and "--adapter" in said, said
    assert not (tmp_path / "out").exists()


def test_compile_onnx_on_flux_at_another_precision_says_fp32_only(tmp_path):
    refused = _run("compile", "--model", "tiny-flux", "--backend", "onnx", "--precision", "fp16", "--out",
                   str(tmp_path))
    assert refused.exit_code == 2 and "fp32" in refused.stderr and "tensorrt" not in refused.stderr, refused.output


def test_compile_without_an_adapter_on_flux_says_its_graph_has_no_identity(tmp_path, caplog):
    built = _run("compile", "--model", "tiny-flux", "--backend", "onnx", "--out", str(tmp_path / "engines"))
    assert built.exit_code == 0, built.output
    said = _said(built)
    assert "no identity" in said and "identity adapter installed" not in said, said
    assert "stored: 1" in said and not [r for r in caplog.records if "ahead" in r.getMessage()]  # it is the compile


def test_compile_builds_the_step_cache_parts_only_for_flux_on_torch_compile(tmp_path):
    built = _run("compile", "--model", "tiny-flux", "--step-cache", "--batch", "1", "--size", "32x32", "--out",
                 str(tmp_path / "engines"))
    assert built.exit_code == 0, built.output
    assert "compiled 1 batch bucket of the step cache's two parts of FLUX's transformer" in _said(built)
    for model, backend in (("tiny", "onnx"), ("tiny-flux", "onnx")):
        refused = _run("compile", "--model", model, "--backend", backend, "--step-cache", "--out", str(tmp_path))
        assert refused.exit_code == 2 and "--step-cache compiles FLUX's transformer in two parts" in refused.stderr


def test_a_step_cache_given_as_on_is_refused_not_read_as_one():
    """`flux_step_cache: true` in a config read as the threshold 1.0: nearly every step reused."""
    from pydantic import ValidationError

    from ray_faceid.config import RenderConfig, ServeConfig

    for config in (ServeConfig, RenderConfig):
        with pytest.raises(ValidationError, match="not true or false"):
            config(flux_step_cache=True)
        assert config(flux_step_cache="0.1").flux_step_cache == 0.1  # `serve run app key=value` passes text


def test_serve_names_the_flux_options_a_unet_base_does_not_take():
    from deployments.app import resolve_config
    from ray_faceid.config import ServeConfig
    from ray_faceid.errors import BadInput

    with pytest.raises(BadInput) as refused:
        resolve_config(ServeConfig(model="tiny", flux_step_cache=0.1, api_tokens={"acme": "acme-token-0123456789abc"}))
    assert str(refused.value.message) == "flux_step_cache: for FLUX models; tiny is not one"


def test_inpaint_on_flux_refuses_an_option_naming_what_inpaint_takes(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
    refused = _run("inpaint", "--model", "tiny-flux-fill", "--image", str(tmp_path / "photo.png"), "--mask",
                   str(tmp_path / "photo.png"), "--prompt", "a face", "--scheduler", "euler", "--out",
                   str(tmp_path / "x.png"))
    said = _said(refused)
    assert refused.exit_code == 2 and "--scheduler: not built for FLUX yet" in said and "--feather" in said, said
    assert "--size" not in said and "--region" not in said  # generate's, which inpaint has not


def test_generate_holds_flux_as_a_serve_replica_can(tmp_path):
    """--flux-transformer-weights and --flux-text-encoders on the command line, as a Serve config's
    flux_transformer_weights / flux_text_encoders: nearly the image of the default, saying what made it."""
    import numpy as np
    from PIL import Image

    made = {}
    for name, options in (("default", []), ("narrow", ["--flux-transformer-weights", "fp8_matmul",
                                                       "--flux-text-encoders", "cpu"])):
        done = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--out", str(tmp_path / f"{name}.png"),
                    *options)
        assert done.exit_code == 0, done.output
        made[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert "on cpu, fp8 matmul transformer weights, text encoders on the cpu" in done.stderr  # the run's first line
    assert 0 < np.abs(made["narrow"] - made["default"]).max() <= 8
    shown = _run("provenance", str(tmp_path / "narrow.png"))
    assert "fp8_matmul transformer weights" in _said(shown), shown.output


def test_flux_memory_options_are_refused_where_they_cannot_run(tmp_path, catalog):
    for command, said in (
            (["generate", "--model", "tiny", "--prompt", "a portrait", "--out", str(tmp_path / "x.png")],
             "--flux-transformer-weights fp8: for FLUX bases; tiny is a UNet family"),
            (["render", str(catalog), str(tmp_path / "out"), "--model", "tiny", "--registry", str(tmp_path / "r")],
             "--flux-transformer-weights fp8: for FLUX bases; tiny is a UNet family"),
            (["generate", "--model", "tiny-flux", "--backend", "onnxruntime", "--prompt", "a portrait", "--out",
              str(tmp_path / "x.png")], "--flux-transformer-weights fp8 is for backend torch or torch.compile: ONNX "
             "Runtime runs FLUX's transformer graph in fp32"),
            (["render", str(catalog), str(tmp_path / "out"), "--model", "tiny-flux", "--backend", "onnxruntime",
              "--registry", str(tmp_path / "r")], "--flux-transformer-weights fp8 is for backend torch or "
             "torch.compile: ONNX Runtime runs FLUX's transformer graph in fp32")):
        refused = _run(*command, "--flux-transformer-weights", "fp8")
        assert refused.exit_code == 2 and said in _said(refused), refused.output
        assert "Traceback" not in refused.output
        assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()
    refused = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--out", str(tmp_path / "x.png"),
                   "--flux-text-encoders", "disk")
    assert refused.exit_code == 2 and "one of same, cpu; not 'disk'" in _said(refused), refused.output


def test_true_cfg_beside_the_step_cache_names_both_flags(tmp_path):
    refused = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--out", str(tmp_path / "x.png"),
                   "--true-cfg", "3", "--negative-prompt", "blurry", "--step-cache", "0.5")
    assert refused.exit_code == 2 and "--true-cfg and --step-cache: not both" in _said(refused), refused.output


def test_a_flux_run_that_cannot_fit_its_gpu_says_which_options_lower_it(monkeypatch):
    """On a GPU the plan is checked against its free memory before the base loads (no GPU here: the
    check is called as the command calls it on one, with the GPU's free memory given)."""
    import torch

    from ray_faceid.cli.generate_flux import _check_memory
    from ray_faceid.errors import BadInput
    from ray_faceid.pipelines.model_ref import resolve_model

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (10**5, 10**10))
    ref = resolve_model("tiny-flux", flux=True)
    with pytest.raises(BadInput, match="this GPU's free memory has 0.1 MB: set --flux-text-encoders cpu and "
                                       "--flux-transformer-weights fp8$"):
        _check_memory(ref, {}, "cuda", "torch", None, None, 0.0, None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (10**10, 10**10))
    _check_memory(ref, {"text_encoders": "cpu", "transformer_weights": "fp8"}, "cuda", "torch", None, None, 0.0, (64, 64))


def test_generate_compiled_builds_its_size_through_the_engine_cache(tmp_path, monkeypatch):
    """`generate --backend torch.compile` warms its one size as a Serve replica does (from `compile`'s
    artifacts where the engine cache has them, its CUDA graphs captured on a GPU): the image is eager's."""
    import numpy as np
    from PIL import Image

    from ray_faceid.pipelines.flux_sampling import FluxGenerator

    warmed, warm_up = [], FluxGenerator.warm_up
    monkeypatch.setattr(FluxGenerator, "warm_up", lambda self, sizes, most: warmed.append((self.backend, sizes, most))
                        or warm_up(self, sizes, most))
    monkeypatch.setenv("RAY_FACEID_CACHE", str(tmp_path / "cache"))
    for backend in ("torch", "torch.compile"):
        done = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--size", "32x48", "--backend", backend,
                    "--out", str(tmp_path / f"{backend}.png"))
        assert done.exit_code == 0, done.output
    assert warmed == [("torch", [(32, 48)], 1), ("torch.compile", [(32, 48)], 1)]
    assert "torch.compile: building FLUX's transformer for 32x48" in done.stderr and "denoise steps: 1/1" not in done.stderr
    eager, compiled = (np.asarray(Image.open(tmp_path / f"{b}.png")).astype(int) for b in ("torch", "torch.compile"))
    assert np.abs(eager - compiled).max() <= 1


def test_inpaint_plans_the_size_fill_repaints_at(tmp_path, monkeypatch):
    """A photo over FLUX.1 Fill's pixel budget is repainted reduced: its memory is planned at that size,
    not the photo's (a 16 GB GPU was refused for a run that fits)."""
    import numpy as np
    from PIL import Image

    from ray_faceid.cli import generate_flux
    from ray_faceid.errors import BadInput

    planned = []

    def check_memory(ref, memory, device, backend, adapter, image_encoder, step_cache, size):
        planned.append(size)
        raise BadInput("planned")  # nothing else needed: no model loads

    monkeypatch.setattr(generate_flux, "_check_memory", check_memory)
    Image.new("RGB", (2400, 1200), "gray").save(tmp_path / "photo.png")
    mask = np.zeros((1200, 2400), np.uint8)
    mask[400:800, 800:1600] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    refused = _run("inpaint", "--model", "tiny-flux-fill", "--image", str(tmp_path / "photo.png"), "--mask",
                   str(tmp_path / "mask.png"), "--prompt", "a face", "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 2 and "planned" in refused.stderr, refused.output
    (width, height), = planned
    assert width * height <= 2 * 1024 * 1024 and abs(width / height - 2) < 0.01
