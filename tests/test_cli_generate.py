"""`ray-faceid generate` / `inpaint` end to end on tiny components with real reference photos."""
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.pipelines.provenance import read_provenance

runner = CliRunner()
FAST = ["--size", "64x64", "--steps", "2"]


def test_generate_one_and_two_identities(tmp_path, sample_photos):
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    out = tmp_path / "one.png"
    result = runner.invoke(app, ["generate", "--ref", hanks, "--prompt", "a portrait", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    record = read_provenance(out.read_bytes())
    assert record["untrained_base"] and record["adapter_trained_steps"] == 0
    two, one_of_six = tmp_path / "two.png", tmp_path / "one_of_six.png"
    Image.open(sample_photos["t1.jpg"]).crop((20, 240, 230, 440)).save(one_of_six)  # one face of the group photo
    result = runner.invoke(app, ["generate", "--identity", f"a={hanks}", "--identity", f"b={one_of_six}",
                                 "--region", "a=0,0,0.5,1", "--prompt", "two people", "--out", str(two), *FAST])
    assert result.exit_code == 0, result.output
    assert [i["name"] for i in read_provenance(two.read_bytes())["identities"]] == ["a", "b"]


def test_generate_refuses_a_reference_without_a_face(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 120), "white").save(blank)
    result = runner.invoke(app, ["generate", "--ref", str(blank), "--prompt", "x", "--out", str(tmp_path / "o.png"), *FAST])
    assert result.exit_code == 2
    assert "blank.png: no face found" in result.stderr
    result = runner.invoke(app, ["generate", "--ref", str(blank), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                                 "--size", "64by64"])
    assert result.exit_code == 2 and "--size must look like 512x512" in result.stderr


def test_a_group_photo_as_a_reference_is_refused_not_read_as_its_largest_face(tmp_path, sample_photos):
    """Whose face? The largest of six of much the same size was taken without a word (enroll refuses it)."""
    group = str(sample_photos["t1.jpg"])
    for command in (["generate", "--ref", group, *FAST], ["inpaint", "--ref", group, "--image", group, "--mask", group]):
        result = runner.invoke(app, [*command, "--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "1"])
        assert result.exit_code == 2, result.output
        said = " ".join(result.stderr.split())
        assert "t1.jpg: 6 faces" in said and "alone" in said, said


def test_inpaint_keeps_the_outside(tmp_path, sample_photos):
    image = np.asarray(Image.open(sample_photos["Tom_Hanks_54745.png"]).convert("RGB"))
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[30:80, 20:90] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["inpaint", "--image", str(sample_photos["Tom_Hanks_54745.png"]), "--mask",
                                 str(tmp_path / "mask.png"), "--ref", str(sample_photos["Tom_Hanks_54745.png"]),
                                 "--prompt", "a face", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # what it will do, before minutes of steps on a real base
    assert f"a {image.shape[1]}x{image.shape[0]} photo, its masked face repainted at up to 32 px, 2 steps of" in said
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(got[mask == 0], image[mask == 0])


def test_generate_with_attribute_edits_and_their_refusals(tmp_path, sample_photos, default_encoder_flow):
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    base = ["generate", "--ref", hanks, "--prompt", "a portrait", "--out", str(tmp_path / "e.png"), *FAST]
    flow = default_encoder_flow
    result = runner.invoke(app, [*base, "--flow", flow, "--edit", "smile=+0.8,yaw=-20"])
    assert result.exit_code == 0, result.output
    record = read_provenance((tmp_path / "e.png").read_bytes())
    assert record["identities"][0]["edits"] == {"smile": 0.8, "yaw": -20.0} and record["flow"].startswith("sha256:")
    result = runner.invoke(app, [*base, "--flow", flow, "--edit", "beard=1"])
    assert result.exit_code == 2 and "valid: smile 0..1, mouth_open 0..1, eyes_open 0..1, yaw -90..90" in result.stderr
    result = runner.invoke(app, [*base, "--edit", "smile=0.5"])
    assert result.exit_code == 2 and "--edit needs --flow" in result.stderr
    result = runner.invoke(app, [*base, "--imr", flow])  # a flow is not an IMR
    assert result.exit_code == 2 and "holds a 'attribute_flow' module, not a 'imr'" in result.stderr


def test_generate_defaults_to_the_models_own_size_and_steps(tmp_path, sample_photos):
    """At the defaults a new user runs, the tiny base used to render 512x512 in 30 steps: hours on a CPU."""
    out = tmp_path / "default.png"
    result = runner.invoke(app, ["generate", "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--prompt",
                                 "a portrait", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = read_provenance(out.read_bytes())
    assert record["size"] == [32, 32] and record["steps"] == 4
    assert "32x32, 4 steps" in result.stderr and "denoise steps: 4/4" in result.stderr  # progress, not a terminal


def test_a_bad_reference_fails_before_any_model_loads(tmp_path, monkeypatch):
    import ray_faceid.pipelines.models as models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the references were checked")

    monkeypatch.setattr(models, "load_base", must_not_load)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = runner.invoke(app, ["generate", "--ref", str(tmp_path / "broken.jpg"), "--prompt", "x", "--out",
                                 str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "broken.jpg" in result.stderr


def test_a_backend_that_is_not_installed_fails_before_the_model_loads(tmp_path, sample_photos):
    import importlib.util

    import pytest

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = runner.invoke(app, ["generate", "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--prompt", "x",
                                 "--backend", "tensorrt", "--out", str(tmp_path / "o.png"), *FAST])
    assert result.exit_code == 2 and "pip install 'ray_faceid[tensorrt]'" in result.output
    assert "untrained base model" not in result.output  # the model was never loaded


def test_ctrl_c_says_the_command_was_interrupted_and_exits_130(sample_photos, tmp_path):
    """Ctrl-C during denoising: one line saying so (it exited 130 silently), no traceback."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    command = [str(Path(sys.executable).with_name("ray-faceid")), "generate", "--prompt", "a photo",
               "--ref", str(sample_photos["Tom_Hanks_54745.png"]), "--steps", "200", "--size", "256x256",
               "--out", str(tmp_path / "x.png")]
    # As from a terminal: SIGINT handled (pytest-xdist's workers ignore it, and children inherit that).
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in run.stderr:  # the line printed just before denoising starts
        seen.append(line)
        if "steps of" in line:
            break
    run.send_signal(signal.SIGINT)
    _, rest = run.communicate(timeout=120)
    said = "".join(seen) + rest
    assert run.returncode == 130, said
    assert "interrupted" in rest and "Traceback" not in said, said
    assert not (tmp_path / "x.png").exists()


def test_a_size_the_model_cannot_make_is_refused_with_the_nearest_it_can(tmp_path):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    for model, size, said in (("tiny", "63x64", "got 63x64: try 64x64"),
                              ("tiny-flux", "30x66", "not 30x66: try 32x68")):
        person = ["--face-embedding", str(tmp_path / "emb.npy")] if model == "tiny" else []
        refused = runner.invoke(app, ["generate", "--model", model, *person, "--prompt", "x", "--size", size,
                                      "--steps", "1", "--out", str(tmp_path / "o.png")])
        assert refused.exit_code == 2 and said in " ".join(refused.stderr.split()), refused.output


def test_a_person_given_twice_or_two_people_to_inpaint_are_refused(tmp_path, sample_photos):
    """Each was silently the last one given: one person's first photos, or inpaint's first person, dropped."""
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    twice = runner.invoke(app, ["generate", "--identity", f"amy={hanks}", "--identity", f"amy={hanks}", "--prompt", "x",
                                "--out", str(tmp_path / "o.png"), *FAST])
    assert twice.exit_code == 2 and "--identity amy given twice" in " ".join(twice.stderr.split()), twice.output
    two = runner.invoke(app, ["inpaint", "--identity", f"a={hanks}", "--identity", f"b={hanks}", "--image", hanks,
                              "--mask", hanks, "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert two.exit_code == 2 and "inpaint repaints one person" in " ".join(two.stderr.split()), two.output


def test_a_group_photo_is_refused_by_the_flux_adapter_train_made_too(sample_photos):
    """It reads photos through the face stack, which kept only the largest face."""
    import pytest

    from ray_faceid.cli.generate_flux import flux_people
    from ray_faceid.errors import BadInput
    from ray_faceid.face.analyzer import FaceAnalyzer

    with pytest.raises(BadInput, match="t1.jpg: 6 faces"):
        flux_people({"a": [str(sample_photos["t1.jpg"])]}, {}, None, "cpu", face_encoder=FaceAnalyzer().spec)


def test_reference_photos_of_two_people_are_said_not_averaged_silently(tmp_path, sample_photos, caplog):
    hanks, other = str(sample_photos["Tom_Hanks_54745.png"]), tmp_path / "one_of_six.png"
    Image.open(sample_photos["t1.jpg"]).crop((20, 240, 230, 440)).save(other)
    with caplog.at_level("WARNING"):
        made = runner.invoke(app, ["generate", "--ref", hanks, "--ref", str(other), "--prompt", "x",
                                   "--out", str(tmp_path / "o.png"), *FAST])
    assert made.exit_code == 0, made.output
    said = " ".join(caplog.text.split())
    assert "Tom_Hanks_54745.png and" in said and "one_of_six.png may not show one person" in said, said
    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.pipelines.references import _say_strangers

    caplog.clear()  # one stray photo among three: named once, not once per pair
    ann, stray = np.eye(128, dtype=np.float32)[0], np.eye(128, dtype=np.float32)[1]
    with caplog.at_level("WARNING"):
        _say_strangers(FaceAnalyzer(), ["a1", "a2", "x"], [ann, ann, stray])
    assert len(caplog.records) == 1 and "x may not show the person of a1, a2" in caplog.text, caplog.text


def test_cheap_mistakes_are_refused_before_any_model_loads(tmp_path, sample_photos, monkeypatch):
    """A region outside the image, an identity start past the steps given, a mask of another size or
    an empty one: each one line, before the model (minutes on a real base) loads."""
    import ray_faceid.pipelines.flux as flux
    import ray_faceid.pipelines.models as models

    def no_loading(*_, **__):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(models, "load_base", no_loading)
    monkeypatch.setattr(flux, "load_flux", no_loading)
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    blank, small = tmp_path / "blank.png", tmp_path / "small.png"
    Image.new("L", Image.open(hanks).size, 0).save(blank)
    Image.new("L", (16, 16), 255).save(small)
    for command, said in (
            (["generate", "--identity", f"a={hanks}", "--region", "a=0.5,0,0.2,1"], "0 <= x0 < x1 <= 1"),
            (["generate", "--ref", hanks, "--steps", "3", "--identity-start", "3"], "past the last of 3 steps"),
            (["inpaint", "--ref", hanks, "--image", hanks, "--mask", str(small)], "they must match"),
            (["inpaint", "--ref", hanks, "--image", hanks, "--mask", str(blank)], "mask is empty"),
            (["inpaint", "--model", "tiny-flux-fill", "--image", hanks, "--mask", str(blank)], "mask is empty")):
        refused = runner.invoke(app, [*command, "--prompt", "x", "--out", str(tmp_path / "o.png")])
        assert refused.exit_code == 2 and said in " ".join(refused.stderr.split()), refused.output
