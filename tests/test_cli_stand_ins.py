"""`ray-faceid stand-ins DIR`: tiny files in every published identity layout; each generate command
it prints runs as printed (a photo of the user's in place of PHOTO) and makes an image whose
provenance names the published kind it read."""
import importlib.util
import shlex

from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.pipelines.provenance import read_provenance

KINDS = [("IP-Adapter-FaceID", "FaceID"), ("IP-Adapter-FaceID", "FaceID"),
         ("IP-Adapter-FaceID", "FaceID-PlusV2, shortcut"), ("IP-Adapter-FaceID", "FaceID-Portrait, tokens per photo"),
         ("InstantID", "InstantID, with its IdentityNet"), ("FLUX IP-Adapter", "XLabs"), ("FLUX IP-Adapter", "XLabs"),
         ("PuLID-FLUX", "IDFormer, 2 ID cross-attentions")]


def test_every_printed_command_makes_an_image_of_its_published_kind(tmp_path, sample_photos):
    runner = CliRunner()
    folder = tmp_path / "my files [v1]"  # printed as a shell reads it: spaces and brackets kept
    written = runner.invoke(app, ["stand-ins", str(folder)])
    assert written.exit_code == 0, written.output
    printed = [line.strip() for line in written.output.splitlines() if line.strip().startswith("ray-faceid ")]
    commands = [c for c in printed if c.startswith("ray-faceid generate") and "NAME" not in c]
    assert len(commands) == len(KINDS)
    outs = {shlex.split(c)[shlex.split(c).index("--out") + 1] for c in commands}
    assert len(outs) == len(commands)  # each command its own image: run one after another, none overwritten
    for k, (command, kind) in enumerate(zip(commands, KINDS)):
        out = tmp_path / f"out{k}.png"
        argv = shlex.split(command.replace("PHOTO", str(sample_photos["Tom_Hanks_54745.png"])))[1:]
        argv[argv.index("--out") + 1] = str(out)
        made = runner.invoke(app, argv)
        assert made.exit_code == 0, (command, made.output)
        published = read_provenance(out.read_bytes())["adapter_published"]
        assert (published["kind"], published["variant"]) == kind, (command, published)
    again = runner.invoke(app, ["stand-ins", str(folder)])  # never written over
    assert again.exit_code == 2 and "not an empty folder" in again.output
    (tmp_path / "a_file").write_text("x")
    blocked = runner.invoke(app, ["stand-ins", str(tmp_path / "a_file" / "files")])
    assert blocked.exit_code == 2 and "cannot write there" in blocked.stderr and "Traceback" not in blocked.output
    # A person enrolled with the default (dlib) stack, then the printed embed and generate, as printed
    # (the tiny recogniser is written where the onnx extra is installed).
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        return
    registry = str(tmp_path / "registry")
    enrolled = runner.invoke(app, ["identities", "enroll", str(sample_photos["Tom_Hanks_54745.png"]), "--consent",
                                   "form-1", "--name", "tom", "--registry", registry])
    assert enrolled.exit_code == 0, enrolled.output
    named = [c for c in printed if "NAME" in c]
    assert [shlex.split(c)[1] for c in named] == ["identities", "generate"]
    for command in named:
        argv = shlex.split(command.replace("NAME", "tom"))[1:] + ["--registry", registry]
        if "--out" in argv:
            argv[argv.index("--out") + 1] = str(tmp_path / "tom.png")
        ran = runner.invoke(app, argv)
        assert ran.exit_code == 0, (command, ran.output)
    assert read_provenance((tmp_path / "tom.png").read_bytes())["adapter_published"]["kind"] == "IP-Adapter-FaceID"
