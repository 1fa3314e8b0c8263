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


def test_demo_runs_the_whole_story(sample_photos, ray_cluster, tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert re.search(r"t1\.jpg\s+│\s+6\s", result.stdout)  # one row per photo
    # Only a photo of one person alone is enrolled: never a crop of the six-face t1.jpg.
    assert "enrolled tom_hanks: id_" in result.stdout and "t1_person" not in result.stdout
    assert "one person enrolled" in result.stdout
    assert len(result.stdout.splitlines()) < 120  # it was ~420 lines
    assert "untrained: its images are noise" in result.stdout and "API stopped" in result.stdout
    # The commands to try next run as printed, outside the virtualenv too.
    command = re.search(r"^\s+(\S+) identities list --registry " + re.escape(str(tmp_path / "demo" / "registry")),
                        result.stdout, re.M)
    assert command and Path(command.group(1)).is_file(), result.stdout[-1500:]
    assert (tmp_path / "demo" / "single.png").is_file() and (tmp_path / "demo" / "dataset" / "faces.parquet").is_file()
    # Step 4: the catalog render (single, two-person and inpaint rows) and its evaluation.
    import pyarrow.parquet as pq

    manifest = pq.read_table(tmp_path / "demo" / "rendered" / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest if r["status"] == "ok") == ["inpaint", "single-smile"]
    assert (tmp_path / "demo" / "rendered" / "contact_sheet.png").is_file()
    assert "encoders: conditioning = dlib_resnet" in result.stdout


def test_demo_on_a_folder_of_the_users_people(faces_root, ray_cluster, tmp_path):
    """--photos DIR (make demo PHOTOS=DIR): every stage uses the folder's people, enrolled by folder name."""
    import shutil

    import pyarrow.parquet as pq

    for person in ("amy", "biden"):  # three photos each: the story is the same with thirty
        (tmp_path / "mine" / person).mkdir(parents=True)
        for photo in sorted((faces_root / person).iterdir())[:3]:
            shutil.copy(photo, tmp_path / "mine" / person / photo.name)
    (tmp_path / "mine" / "party").mkdir()  # group photos: not one person
    for name in ("face-api_bbt1.jpg", "face-api_bbt2.jpg"):
        shutil.copy(faces_root / "group" / name, tmp_path / "mine" / "party" / name)
    result = runner.invoke(app, ["demo", "--photos", str(tmp_path / "mine"), "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    from ray_faceid.config import IngestConfig

    given = len([p for p in (tmp_path / "mine" / "amy").iterdir() if p.suffix.lower() in IngestConfig().extensions])
    assert re.search(rf"enrolled amy: id_\S+ \(\d+ of {given} photos used\)", result.stdout), result.stdout
    assert "enrolled biden: id_" in result.stdout and "tom_hanks" not in result.stdout
    said = " ".join(result.stdout.split())
    assert re.search(r"not enrolled party: .*(group photos|shows one face alone)", said), said[-2000:]
    manifest = pq.read_table(tmp_path / "demo" / "rendered" / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest if r["status"] == "ok") == ["inpaint", "single-smile", "two-people"]
    assert {json.loads(r["provenance"])["identities"][0]["name"] for r in manifest} <= {"amy", "biden"}


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


def test_faces_analyze_fits_80_columns_and_wide_shows_every_column(sample_photos):
    """Tables used to be cut at 80 columns ("x0,y0,…", "sharpne…")."""
    result = CliRunner().invoke(app, ["faces", "analyze", str(sample_photos["t1.jpg"])], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "t1.jpg: 6 face(s)" in result.stdout and "quality" in result.stdout
    wide = CliRunner().invoke(app, ["faces", "analyze", str(sample_photos["t1.jpg"]), "--wide"], terminal_width=200)
    assert all(col in wide.stdout for col in ("x0,y0,x1,y1", "roll", "sharpness", "mouth", "eyes"))
