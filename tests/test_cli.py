"""The `ray-faceid` command as a user runs it: output, JSON, and exit code 2 for unusable input."""
import json
import re
from pathlib import Path

from typer.testing import CliRunner

from ray_faceid.cli import app

runner = CliRunner()


def test_analyze_json_reports_the_six_faces(sample_photos):
    result = runner.invoke(app, ["faces", "analyze", str(sample_photos["t1.jpg"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["encoder"]["dim"] == 128
    assert len(report["images"][0]["faces"]) == 6


def test_analyze_bad_file_exits_2_with_the_reason_and_keeps_the_good_ones(tmp_path, sample_photos):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = runner.invoke(app, ["faces", "analyze", str(broken), str(sample_photos["Tom_Hanks_54745.png"]), "--json"])
    assert result.exit_code == 2
    images = json.loads(result.stdout)["images"]
    assert images[0]["code"] == "bad_image" and "broken.jpg" in images[0]["error"]
    assert len(images[1]["faces"]) == 1


def test_verify_prints_accuracy_for_a_pairs_file(tmp_path, faces_root):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "image_a,image_b,same\n"
        "obama/obama.jpg,obama/obama2.jpg,1\n"
        "obama/obama.jpg,biden/biden.jpg,0\n"
        "obama/obama.jpg,nonface/face-api_white.png,0\n"
    )
    result = runner.invoke(app, ["faces", "verify", "--pairs", str(pairs), "--root", str(faces_root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pairs"] == 3
    assert report["no_face_pairs"] == 1  # counted wrong
    assert report["accuracy"] == 2 / 3
    assert report["images_without_face"] == ["nonface/face-api_white.png"]


def test_verify_bad_pairs_file_exits_2(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b\nx,y\n")
    result = runner.invoke(app, ["faces", "verify", "--pairs", str(pairs), "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "lacks column(s)" in result.stderr
    result = runner.invoke(app, ["faces", "verify", "--pairs", str(tmp_path / "none.csv"), "--root", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def _demo_people(tmp_path, request) -> dict[str, int]:
    """A user's folder of people for the demo: two from the shared photo set (two photos each) where
    it is present, else Tom Hanks from insightface's photos; and a folder of group photos (not one
    person). Returns the photos given per person."""
    import shutil

    from tests.conftest import SHARED_FACES

    people = {}
    if (SHARED_FACES / "pairs.csv").is_file():
        for person in ("amy", "biden"):
            (tmp_path / "mine" / person).mkdir(parents=True)
            for photo in sorted((SHARED_FACES / person).iterdir())[:2]:
                shutil.copy(photo, tmp_path / "mine" / person / photo.name)
            people[person] = 2
        groups = [SHARED_FACES / "group" / "face-api_bbt1.jpg"]
    else:
        sample_photos = request.getfixturevalue("sample_photos")  # only here: --photos needs no insightface
        (tmp_path / "mine" / "tom_hanks").mkdir(parents=True)
        shutil.copy(sample_photos["Tom_Hanks_54745.png"], tmp_path / "mine" / "tom_hanks")
        people["tom_hanks"] = 1
        groups = [sample_photos["t1.jpg"]]
    (tmp_path / "mine" / "party").mkdir()
    for photo in groups:
        shutil.copy(photo, tmp_path / "mine" / "party" / photo.name)
    return people


def test_demo_runs_the_whole_story_on_a_folder_of_the_users_people(request, ray_cluster, tmp_path):
    """The demo's story, once (it takes minutes): --photos DIR (make demo PHOTOS=DIR), every stage on the
    folder's people, enrolled by folder name; a folder of group photos is analysed, never enrolled.
    The default run is this story on insightface's photos (test_the_default_demo_...)."""
    import pyarrow.parquet as pq

    people = _demo_people(tmp_path, request)
    result = runner.invoke(app, ["demo", "--photos", str(tmp_path / "mine"), "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())
    for group in (tmp_path / "mine" / "party").iterdir():  # one row per photo, with its faces
        assert re.search(re.escape(group.name) + r"\s+│\s+([2-9]|\d\d)\s", result.stdout), result.stdout[:3000]
    for person, given in people.items():
        assert re.search(rf"enrolled {person}: id_\S+ \(\d+ of {given} photos used\)", result.stdout), result.stdout
    assert re.search(r"not enrolled party: .*(group photos|shows one face alone)", said), said[-2000:]
    if "tom_hanks" not in people:  # the folder's people only, never the default story's
        assert "tom_hanks" not in result.stdout
    else:  # one person: the two-person image says why it is missing
        assert "one person enrolled" in result.stdout
    assert len(result.stdout.splitlines()) < 120  # it was ~420 lines
    assert "untrained: its images are noise" in result.stdout and "API stopped" in result.stdout
    # The commands to try next run as printed, outside the virtualenv too.
    command = re.search(r"^\s+(\S+) identities list --registry " + re.escape(str(tmp_path / "demo" / "registry")),
                        result.stdout, re.M)
    assert command and Path(command.group(1)).is_file(), result.stdout[-1500:]
    assert (tmp_path / "demo" / "single.png").is_file() and (tmp_path / "demo" / "dataset" / "faces.parquet").is_file()
    # Step 4: the catalog render (single, two-person where there are two, and inpaint rows) and its evaluation.
    manifest = pq.read_table(tmp_path / "demo" / "rendered" / "manifest.parquet").to_pylist()
    rows = ["inpaint", "single-smile"] + (["two-people"] if len(people) > 1 else [])
    assert sorted(r["id"] for r in manifest if r["status"] == "ok") == rows
    assert {json.loads(r["provenance"])["identities"][0]["name"] for r in manifest} <= set(people)
    assert (tmp_path / "demo" / "rendered" / "contact_sheet.png").is_file()
    assert "encoders: conditioning = dlib_resnet" in result.stdout


def test_the_default_demo_tells_the_story_of_tom_hanks_alone(sample_photos):
    """`make demo` without PHOTOS: insightface's photos, Tom Hanks enrolled from his photo alone,
    never a crop of the six-face t1.jpg (it is analysed in stage 1)."""
    from ray_faceid.cli.demo import sample_story

    folder, people, inpaint_photo = sample_story([str(p) for p in sample_photos.values()])
    assert Path(folder) == sample_photos["t1.jpg"].parent
    assert list(people) == ["tom_hanks"] and people["tom_hanks"] == [sample_photos["Tom_Hanks_54745.png"].read_bytes()]
    assert Path(inpaint_photo).name == "Tom_Hanks_54745.png"


def test_the_demo_through_make_names_makes_variable_for_a_busy_port(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("MAKELEVEL", "1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["demo", "--port", str(port), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pick another with PORT=" in result.stderr


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--registry", str(tmp_path)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # Without --port, the file's http_options.port: what `serve run` of the same file listens on.
    import yaml

    from deployments.local import DEFAULT_YAML

    data = yaml.safe_load(DEFAULT_YAML.read_text())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data["http_options"] = {"host": "127.0.0.1", "port": port}
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "serve.yaml"), "--registry", str(tmp_path)])
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr
    for bad in ("abc", 70000, 0, [1]):  # one line naming the setting, never a traceback
        data["http_options"] = {"port": bad} if bad != [1] else bad
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "serve.yaml"), "--registry", str(tmp_path)])
        assert result.exit_code == 2 and "http_options.port must be a port number 1-65535" in result.stderr, bad


def test_faces_analyze_fits_80_columns_and_wide_shows_every_column(sample_photos):
    """Tables used to be cut at 80 columns ("x0,y0,…", "sharpne…")."""
    result = CliRunner().invoke(app, ["faces", "analyze", str(sample_photos["t1.jpg"])], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "t1.jpg: 6 face(s)" in result.stdout and "quality" in result.stdout
    wide = CliRunner().invoke(app, ["faces", "analyze", str(sample_photos["t1.jpg"]), "--wide"], terminal_width=200)
    assert all(col in wide.stdout for col in ("x0,y0,x1,y1", "roll", "sharpness", "mouth", "eyes"))
