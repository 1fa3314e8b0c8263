"""An option that would do nothing, or write something other than its name says, is refused in one
line before any work (from the new-user trial: each was silently ignored)."""
from typer.testing import CliRunner

from ray_faceid.cli import app


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_an_image_named_other_than_png_is_refused(tmp_path):
    for command in (["generate", "--ref", "a.png"], ["inpaint", "--image", "a.png", "--mask", "m.png"]):
        refused = _run(*command, "--prompt", "a portrait", "--out", str(tmp_path / "face.jpg"))
        said = " ".join(refused.output.replace("│", " ").split())  # click's error box wraps the line
        assert refused.exit_code == 2 and "name it face.png" in said, refused.output
        assert not (tmp_path / "face.jpg").exists()


def test_an_identitynet_scale_without_an_identitynet_is_refused(tmp_path):
    refused = _run("generate", "--ref", "a.png", "--prompt", "a portrait", "--identitynet-scale", "0.5",
                   "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 2 and "give --identitynet FOLDER too" in refused.stderr, refused.output
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"id": "r", "prompt": "a portrait", "identities": []}\n')
    refused = _run("render", str(catalog), str(tmp_path / "out"), "--identitynet-scale", "0.5")
    assert refused.exit_code == 2 and "give --identitynet FOLDER too" in refused.stderr, refused.output
    # On FLUX, which takes no IdentityNet, even a scale of 0 is named (it was dropped silently).
    refused = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--identitynet-scale", "0",
                   "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 2 and "--identitynet-scale: not built for FLUX yet" in refused.stderr, refused.output


def test_a_flux_option_of_another_value_is_named_with_what_it_takes(tmp_path):
    refused = _run("compile", "--model", "tiny-flux", "--backend", "torch.compile", "--flux-transformer-weights", "fp4",
                   "--out", str(tmp_path))
    assert refused.exit_code == 2 and "--flux-transformer-weights is same | fp8 | fp8_matmul, not 'fp4'" in refused.stderr
    refused = _run("generate", "--model", "tiny-flux", "--prompt", "a portrait", "--backend", "tensorrt",
                   "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 2 and "--backend tensorrt: not built for FLUX yet" in refused.stderr
    assert "on --backend torch, torch.compile or onnxruntime" in refused.stderr
