"""`ray-faceid stand-ins DIR`: tiny files in every published identity layout; each generate command
it prints runs as printed (a photo of the user's in place of PHOTO) and makes an image whose
provenance names the published kind it read."""
import shlex

from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.pipelines.provenance import read_provenance

KINDS = ["IP-Adapter-FaceID: FaceID", "IP-Adapter-FaceID: FaceID", "IP-Adapter-FaceID: FaceID-PlusV2",
         "IP-Adapter-FaceID: FaceID-Portrait", "InstantID", "FLUX IP-Adapter", "FLUX IP-Adapter"]


def test_every_printed_command_makes_an_image_of_its_published_kind(tmp_path, sample_photos):
    runner = CliRunner()
    written = runner.invoke(app, ["stand-ins", str(tmp_path / "files")])
    assert written.exit_code == 0, written.output
    commands = [line.strip() for line in written.output.splitlines() if line.strip().startswith("ray-faceid generate")]
    assert len(commands) == len(KINDS)
    for k, (command, kind) in enumerate(zip(commands, KINDS)):
        out = tmp_path / f"out{k}.png"
        argv = shlex.split(command.replace("PHOTO", str(sample_photos["Tom_Hanks_54745.png"])))[1:]
        argv[argv.index("--out") + 1] = str(out)
        made = runner.invoke(app, argv)
        assert made.exit_code == 0, (command, made.output)
        published = read_provenance(out.read_bytes())["adapter_published"]
        assert f"{published['kind']}: {published['variant']}".startswith(kind), (command, published)
    again = runner.invoke(app, ["stand-ins", str(tmp_path / "files")])  # never written over
    assert again.exit_code != 0 and "not an empty folder" in again.output
