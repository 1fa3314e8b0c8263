"""The identity controls of generate and inpaint: `--strength`, each person's identity strength
(PuLID-FLUX's id_weight, an IP-Adapter's scale), as catalog rows and API requests set it: 0 gives the
image without the person, another value another image; `--identity-start`, the step it starts at
(PuLID-FLUX's start_step). Both recorded in the image's provenance."""
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.pipelines.provenance import read_provenance
from tests.pipelines.test_pulid_flux import files, tokens  # noqa: F401 - a fixture: tiny-flux and PuLID's file


def _made(tmp_path, name: str, *args: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"{name}.png"
    result = CliRunner().invoke(app, [*args, "--prompt", "a portrait", "--steps", "2", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out)).astype(int), read_provenance(out.read_bytes())


def test_strength_sets_each_persons_identity_on_flux(files, tmp_path):  # noqa: F811
    np.save(tmp_path / "ann.npy", tokens(1)[None])
    common = ["generate", "--model", str(files / "flux"), "--adapter", str(files / "pulid_flux_v0.9.1.safetensors")]
    nobody, _ = _made(tmp_path, "nobody", *common)
    full, record = _made(tmp_path, "full", *common, "--face-embedding", str(tmp_path / "ann.npy"))
    none, _ = _made(tmp_path, "none", *common, "--face-embedding", str(tmp_path / "ann.npy"), "--strength", "0")
    half, half_record = _made(tmp_path, "half", *common, "--face-embedding", str(tmp_path / "ann.npy"), "--strength",
                              "person=0.5")
    assert np.array_equal(none, nobody) and np.abs(full - nobody).max() > 8
    assert np.abs(half - full).max() > 2 and np.abs(half - nobody).max() > 2
    assert record["identities"][0]["scale"] == 1.0 and half_record["identities"][0]["scale"] == 0.5


def test_strength_reaches_a_unet_image_and_bad_values_are_refused(tmp_path):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    common = ["generate", "--model", "tiny", "--face-embedding", str(tmp_path / "emb.npy")]
    full, _ = _made(tmp_path, "full", *common)
    weak, record = _made(tmp_path, "weak", *common, "--strength", "0.25")
    assert np.abs(full - weak).max() > 2 and record["identities"][0]["scale"] == 0.25
    for value, said in (("bob=0.5", "--strength for unknown identity 'bob'"), ("5", "from 0 to 4"),
                        ("much", "expected S or NAME=S"), ("=0.5", "expected S or NAME=S")):
        refused = CliRunner().invoke(app, [*common, "--prompt", "a portrait", "--strength", value, "--out",
                                           str(tmp_path / "x.png")])
        assert refused.exit_code == 2 and said in " ".join(refused.stderr.split()), refused.output


def test_identity_start_from_the_command_line(files, tmp_path):  # noqa: F811
    np.save(tmp_path / "ann.npy", tokens(1)[None])
    common = ["generate", "--model", str(files / "flux"), "--adapter", str(files / "pulid_flux_v0.9.1.safetensors"),
              "--face-embedding", str(tmp_path / "ann.npy")]
    first, _ = _made(tmp_path, "first", *common)
    late, record = _made(tmp_path, "late", *common, "--identity-start", "1")
    assert np.abs(first - late).max() > 2 and record["identity_start"] == 1
    refused = CliRunner().invoke(app, [*common, "--prompt", "a portrait", "--steps", "2", "--identity-start", "2",
                                       "--out", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "start 2 is past the last of 2 steps" in " ".join(refused.stderr.split()), refused.output


def test_identity_controls_without_anyone_to_act_on_are_refused(tmp_path):
    for flags in (["--strength", "0.5"], ["--identity-start", "1"]):
        refused = CliRunner().invoke(app, ["generate", "--model", "tiny-flux", "--prompt", "a beach", *flags, "--out",
                                           str(tmp_path / "x.png")])
        assert refused.exit_code == 2 and f"{flags[0]}: for the people in the image" in refused.stderr, refused.output


def test_strengths_given_twice_are_refused_and_a_bare_one_is_everyone_elses(tmp_path):
    """A repeated name was silently its last value; a bare S after NAME=S overwrote NAME's."""
    from ray_faceid.cli.generate import _strengths
    from ray_faceid.errors import BadInput

    people = {"ann": "a.jpg", "bob": "b.jpg"}
    assert _strengths(["ann=0.5", "1.5"], people) == _strengths(["1.5", "ann=0.5"], people) == {"ann": 0.5, "bob": 1.5}
    for twice, said in ((["ann=0.5", "ann=0.7"], "--strength for ann given twice"),
                        (["0.5", "0.7"], "--strength S given twice")):
        try:
            _strengths(twice, people)
        except BadInput as exc:
            assert said in exc.message
        else:
            raise AssertionError(f"{twice} was taken")
