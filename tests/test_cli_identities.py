"""`ray-faceid identities`: enroll with per-photo reasons, list, show, delete (the registry on disk)."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app

runner = CliRunner()


def test_enroll_list_show_delete(tmp_path, sample_photos):
    reg = ["--registry", str(tmp_path / "reg"), "--tenant", "acme"]
    blank = tmp_path / "blank.png"
    Image.new("RGB", (150, 150), "white").save(blank)
    result = runner.invoke(app, ["identities", "enroll", str(sample_photos["Tom_Hanks_54745.png"]),
                                 str(sample_photos["t1.jpg"]), str(blank), "--consent", "form-7", "--name", "tom", *reg])
    assert result.exit_code == 0, result.output
    assert "6 faces: send photos of this person alone" in result.stdout
    assert "blank.png: no face found" in result.stdout
    ident = result.stdout.split("enrolled ")[1].split()[0]
    assert "(1 of 3 photos used)" in result.stdout
    listed = json.loads(runner.invoke(app, ["identities", "list", "--json", *reg]).stdout)
    assert [m["id"] for m in listed] == [ident] and listed[0]["consent"] == "form-7"
    assert runner.invoke(app, ["identities", "list", "--json", "--registry", str(tmp_path / "reg"),
                               "--tenant", "other"]).stdout.strip() == "[]"
    # A tenant with nobody says so, and names the tenants that have people (it printed nothing).
    empty = runner.invoke(app, ["identities", "list", "--registry", str(tmp_path / "reg")])
    assert empty.exit_code == 0 and "no identities for tenant 'default'" in empty.stdout
    assert "tenants with people here: acme" in " ".join(empty.stdout.split())
    assert '"name": "tom"' in runner.invoke(app, ["identities", "show", ident, *reg]).stdout
    erased = runner.invoke(app, ["identities", "delete", ident, *reg])
    assert erased.exit_code == 0 and "tombstone" in erased.stdout
    left = [p for p in (tmp_path / "reg" / "acme").rglob("*") if p.is_file()]
    assert [p.parent.name for p in left] == ["_erased"] and ident.encode() not in left[0].read_bytes()
    gone = runner.invoke(app, ["identities", "show", ident, *reg])
    assert gone.exit_code == 2 and "was erased" in gone.stderr


def test_enroll_without_a_usable_photo_exits_2(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (150, 150), "white").save(blank)
    result = runner.invoke(app, ["identities", "enroll", str(blank), "--consent", "x", "--registry", str(tmp_path)])
    assert result.exit_code == 2 and "no usable photo" in result.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = runner.invoke(app, ["identities", "enroll", str(broken), "--consent", "x", "--registry", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.count(str(broken)) == 1, result.stderr  # was named twice


def test_enroll_dataset_enrolls_each_identity_once(tmp_path, small_dataset):
    reg = ["--registry", str(tmp_path / "reg")]
    first = runner.invoke(app, ["identities", "enroll-dataset", small_dataset, "--consent", "licence-1", *reg])
    assert first.exit_code == 0, first.output
    assert sorted(line.split(":")[0] for line in first.stdout.splitlines()) == [
        "enrolled amy", "enrolled penny", "enrolled sheldon"]
    listed = json.loads(runner.invoke(app, ["identities", "list", "--json", *reg]).stdout)
    assert sorted(m["name"] for m in listed) == ["amy", "penny", "sheldon"]
    shown = runner.invoke(app, ["identities", "list", *reg]).stdout.splitlines()
    assert [line.split()[1] for line in shown] == ["amy", "penny", "sheldon"]  # by name, as people look them up
    assert all(1 <= m["faces_used"] <= 10 and (tmp_path / "reg" / "default" / m["id"] / "references" / "0.png").is_file()
               for m in listed)
    again = runner.invoke(app, ["identities", "enroll-dataset", small_dataset, "--consent", "licence-1", *reg])
    assert again.stdout.count("already enrolled from this dataset") == 3
    assert len(json.loads(runner.invoke(app, ["identities", "list", "--json", *reg]).stdout)) == 3


def test_people_by_name_unique_names_and_a_missing_registry(tmp_path, sample_photos):
    reg = ["--registry", str(tmp_path / "reg")]
    hanks = str(sample_photos["Tom_Hanks_54745.png"])
    first = runner.invoke(app, ["identities", "enroll", hanks, "--consent", "f", "--name", "tom", *reg])
    assert first.exit_code == 0, first.output
    ident = first.stdout.split("enrolled ")[1].split()[0]
    taken = runner.invoke(app, ["identities", "enroll", hanks, "--consent", "f", "--name", "tom", *reg])
    assert taken.exit_code == 2 and f"taken by {ident}" in taken.stderr and "--name-exists" in taken.stderr
    renamed = runner.invoke(app, ["identities", "enroll", hanks, "--consent", "f", "--name", "tom", "--name-exists",
                                  "rename", *reg])
    assert renamed.exit_code == 0 and "as 'tom-2'" in renamed.stdout
    assert json.loads(runner.invoke(app, ["identities", "show", "tom", *reg]).stdout)["id"] == ident
    typo = runner.invoke(app, ["identities", "show", "tomm", *reg])
    assert typo.exit_code == 2 and "did you mean tom" in typo.stderr
    # generate takes enrolled people by name, with their stored embeddings (no photo needed)
    out = tmp_path / "tom.png"
    made = runner.invoke(app, ["generate", "--identity", "tom", "--prompt", "a portrait", "--out", str(out), *reg])
    assert made.exit_code == 0, made.output
    from ray_faceid.pipelines.provenance import read_provenance

    assert read_provenance(out.read_bytes())["identities"][0]["name"] == "tom"
    assert runner.invoke(app, ["identities", "delete", "tom-2", *reg]).exit_code == 0
    # tom-2 was the same face: erased, it stays refused under any name until they consent again.
    refused = runner.invoke(app, ["identities", "enroll", hanks, "--consent", "f2", "--name", "tom", "--name-exists",
                                  "replace", *reg])
    assert refused.exit_code == 2 and "matches a person erased" in refused.stderr
    replaced = runner.invoke(app, ["identities", "enroll", hanks, "--consent", "f2", "--reconsent", "f3", "--name",
                                   "tom", "--name-exists", "replace", *reg])
    assert replaced.exit_code == 0, replaced.output
    new = json.loads(runner.invoke(app, ["identities", "show", "tom", *reg]).stdout)["id"]
    assert new != ident and runner.invoke(app, ["identities", "show", ident, *reg]).exit_code == 2
    missing = runner.invoke(app, ["identities", "list", "--registry", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no identity registry at" in missing.stderr


def test_a_name_held_by_two_identities_asks_for_an_id(tmp_path, spec128):
    """Registries from before names were unique may hold one name twice: the name is then refused,
    with the ids to choose from, never resolved to one of them at random."""
    import numpy as np

    from ray_faceid.errors import BadInput
    from ray_faceid.registry import Registry

    registry = Registry(str(tmp_path))
    crop = np.zeros((8, 8, 3), np.uint8)
    made = [registry.create("t", name, "consent", np.ones((1, 128)), np.ones(1), spec128, [crop], [])
            for name in ("ann", "ann-old")]
    meta_file = tmp_path / "t" / made[1]["id"] / "meta.json"
    meta_file.write_text(meta_file.read_text().replace('"ann-old"', '"ann"'))  # as an older registry could
    with pytest.raises(BadInput, match="2 identities are called 'ann'") as refused:
        registry.resolve("t", "ann")
    assert all(m["id"] in refused.value.message for m in made)
    assert registry.resolve("t", made[0]["id"]) == made[0]["id"]


def test_the_insightface_stack_without_its_pack_is_refused_before_any_photo_is_read(tmp_path, sample_photos):
    """enroll and inpaint take the face stack a published adapter needs; asked for insightface without
    a pack folder, one line says which files to give."""
    photo = str(sample_photos["Tom_Hanks_54745.png"])
    commands = [["identities", "enroll", photo, "--consent", "form-1", "--registry", str(tmp_path / "r")],
                ["inpaint", "--image", photo, "--mask", photo, "--ref", photo, "--prompt", "a face", "--out",
                 str(tmp_path / "o.png")]]
    for command in commands:
        result = runner.invoke(app, [*command, "--face-backend", "insightface"])
        assert result.exit_code == 2 and "needs --insightface-root PACK" in result.stderr, (command, result.output)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o.png").exists()
