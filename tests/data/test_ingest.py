"""The Ray Data ingest job on real photos plus broken files, on the session's local Ray cluster."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from ray_faceid import storage
from ray_faceid.config import DetectionConfig, FaceConfig, IngestConfig
from ray_faceid.data import tables
from ray_faceid.data.ingest import run_ingest
from ray_faceid.data.pairs import build_pairs
from ray_faceid.errors import BadInput

PEOPLE = ["obama", "biden", "amy", "sheldon", "allyson_felix", "john_simm", "kit_harington"]
LOOSE = ["howard", "raj"]
CONFIG = IngestConfig(
    workers=2, batch_size=4, crop_size=128, num_gpus_per_worker=0,
    face=FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)),
)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, faces_root):
    src = tmp_path_factory.mktemp("archive")
    for person in PEOPLE:
        shutil.copytree(faces_root / person, src / person)
    shutil.copytree(faces_root / "nonface", src / "nonface")
    (src / "group").mkdir()
    shutil.copy(faces_root / "group" / "face_recognition_two_people.jpg", src / "group")
    broken = src / "broken"
    broken.mkdir()
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "notes.jpg").write_text("not a photo at all")
    (broken / "truncated.jpg").write_bytes((faces_root / "obama" / "obama.jpg").read_bytes()[:300])
    shutil.copy(faces_root / "obama" / "obama.jpg", src / "obama" / "obama_copy.jpg")  # byte-identical
    (src / "readme.txt").write_text("ignored: not an image extension")
    # Loose photos of two other people, directly under the archive: not a person named after it.
    for person in LOOSE:
        first = sorted(p for p in (faces_root / person).iterdir() if p.suffix.lower() in CONFIG.extensions)[0]
        shutil.copy(first, src / f"loose_{person}{first.suffix}")
    return src


@pytest.fixture(scope="module")
def ingested(ray_cluster, archive, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dataset")
    summary = run_ingest(str(archive), str(dst), CONFIG, labels="folders")
    return dst, summary


def listed(archive):
    return sorted(str(p) for p in archive.rglob("*") if p.suffix.lower() in CONFIG.extensions)


def test_every_listed_file_has_exactly_one_row(archive, ingested):
    dst, summary = ingested
    images = pq.read_table(dst / "images.parquet").to_pylist()
    assert sorted(r["uri"] for r in images) == listed(archive)
    assert summary["files"] == len(images)
    by_name = {r["uri"].rsplit("/", 2)[-2] + "/" + r["uri"].rsplit("/", 1)[-1]: r for r in images}
    assert by_name["broken/zero.jpg"]["status"] == "bad_image" and "empty file" in by_name["broken/zero.jpg"]["message"]
    assert by_name["broken/notes.jpg"]["status"] == "bad_image"
    assert by_name["broken/truncated.jpg"]["status"] == "bad_image"
    assert all(r["status"] == "no_face" for k, r in by_name.items() if k.startswith("nonface/"))
    assert by_name["group/face_recognition_two_people.jpg"]["n_faces"] == 2
    assert by_name["obama/obama_copy.jpg"]["duplicate_of"].endswith("obama/obama.jpg")
    assert summary["byte_identical_duplicates"] == 1
    # The summary names the first files that gave no face, with why (it used to give counts only).
    shown = {r["uri"].rsplit("/", 2)[-2] + "/" + r["uri"].rsplit("/", 1)[-1]: r for r in summary["not_used"]}
    assert 0 < len(shown) <= 10 and all(r["status"] != "ok" for r in shown.values())
    assert "empty file" in shown["broken/zero.jpg"]["reason"]  # files in listing order: broken/ first


def test_faces_table_and_crops(ingested):
    dst, summary = ingested
    faces = pq.read_table(dst / "faces.parquet").to_pylist()
    assert summary["faces"] == len(faces)
    assert not any(f["image_uri"].endswith("obama_copy.jpg") for f in faces)  # recorded once
    face = faces[0]
    assert len(face["embedding"]) == 128 and face["encoder"].startswith("dlib_resnet/128/")
    crop = storage.read_bytes(face["crop_uri"])
    from ray_faceid.face.decode import decode_image

    assert decode_image(crop).shape == (128, 128, 3)
    assert json.loads((dst / "summary.json").read_text())["status_counts"]["bad_image"] == 3


def test_folder_identities_and_pairs(ingested):
    dst, _ = ingested
    result = build_pairs(str(dst), "folders")
    identities = pq.read_table(dst / "identities.parquet").to_pylist()
    assert sorted(r["identity"] for r in identities) == sorted(PEOPLE)  # group/ photo is not an identity
    faces = {f["face_id"]: f for f in pq.read_table(dst / "faces.parquet").to_pylist()}
    loose = [f for f in faces.values() if "/loose_" in f["image_uri"]]
    assert len(loose) == len(LOOSE) and all(f["label"] is None for f in loose)  # never the archive's name
    pairs = pq.read_table(dst / "pairs.parquet").to_pylist()
    assert result["pairs"] == len(pairs) > 0
    for p in pairs:
        assert p["source_face_id"] != p["target_face_id"]
        assert faces[p["source_face_id"]]["label"] == faces[p["target_face_id"]]["label"] == p["identity"]
        assert p["caption"].startswith("a photo of a person")


def test_cluster_labels_are_pure_and_scored_against_the_folders(ingested):
    dst, _ = ingested
    result = build_pairs(str(dst), "cluster", evaluate_clustering=True)
    scores = json.loads((dst / "summary.json").read_text())["clustering"]
    assert scores["purity"] >= 0.97 and scores["bcubed_f1"] >= 0.9, scores
    assert result["clustering purity"] == scores["purity"]
    rows = pq.read_table(dst / "identities.parquet").to_pylist()
    assert all(r["centre_distance_max"] >= r["centre_distance_mean"] >= 0 for r in rows)
    faces = {f["face_id"]: f for f in pq.read_table(dst / "faces.parquet").to_pylist()}
    clusters = pq.read_table(dst / "identities.parquet").to_pylist()
    labelled = [[faces[i]["label"] for i in c["face_ids"] if faces[i]["label"] in PEOPLE] for c in clusters]
    total = sum(len(c) for c in labelled)
    purity = sum(max(c.count(x) for x in set(c)) for c in labelled if c) / total
    assert purity >= 0.9, purity


def test_resume_after_a_crash_gives_the_same_tables(ray_cluster, archive, ingested, tmp_path):
    dst, _ = ingested
    crashed = tmp_path / "crashed"
    shutil.copytree(dst, crashed)
    # The crash: half the committed batches never made it, and the final tables were never built.
    parts = sorted((crashed / tables.RAW_DIR).rglob("*.parquet"))
    for part in parts[: len(parts) // 2]:
        part.unlink()
    for name in ("images.parquet", "faces.parquet", "summary.json"):
        (crashed / name).unlink()
    with pytest.raises(Exception, match="pass --resume"):
        run_ingest(str(archive), str(crashed), CONFIG)
    # Resuming with another face stack would mix embeddings that cannot be compared.
    other = CONFIG.model_copy(update={"face": CONFIG.face.model_copy(update={"landmarks": "dlib68"})})
    with pytest.raises(BadInput, match="face.landmarks was 'dlib5', now 'dlib68'"):
        run_ingest(str(archive), str(crashed), other, resume=True)
    summary = run_ingest(str(archive), str(crashed), CONFIG, resume=True)
    assert 0 < summary["analysed_this_run"] < summary["files"]

    def table(root, name, drop):
        rows = pq.read_table(root / name).to_pylist()
        for r in rows:
            for k in drop:
                r.pop(k, None)
            if "crop_uri" in r:
                r["crop_uri"] = r["crop_uri"].rsplit("/crops/", 1)[-1]
        return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))

    assert table(crashed, "images.parquet", ["faces"]) == table(dst, "images.parquet", ["faces"])
    assert table(crashed, "faces.parquet", []) == table(dst, "faces.parquet", [])


@pytest.mark.parametrize("root", ["/data/archive", "/data/archive/", "memory://bucket/archive"])
def test_a_loose_photo_has_no_folder_label(root):
    base = root.rstrip("/")
    assert tables.folder_label(f"{base}/loose.jpg", root) is None
    assert tables.folder_label(f"{base}/amy/amy1.jpg", root) == "amy"


def test_the_listing_root_is_written_like_the_listed_files(tmp_path):
    (tmp_path / "amy").mkdir()
    (tmp_path / "amy" / "a.jpg").write_bytes(b"x")
    (tmp_path / "loose.jpg").write_bytes(b"x")
    root = storage.listing_root(str(tmp_path))
    files = list(storage.list_files(str(tmp_path), (".jpg",)))
    assert [tables.folder_label(f, root) for f in files] == ["amy", None]
    assert storage.listing_root(str(tmp_path / "loose.jpg")) == root  # a single file: its folder


def test_clusters_that_are_not_cohesive_make_no_pairs_unless_asked(ingested):
    from ray_faceid.errors import BadInput

    dst, _ = ingested
    merged = build_pairs(str(dst), "cluster", cut_share=3.0)  # a cut far past the threshold merges people
    assert merged["flagged (not cohesive)"] >= 1 and merged["pairs"] == 0
    assert build_pairs(str(dst), "cluster", cut_share=3.0, include_flagged=True)["pairs"] > 0
    with pytest.raises(BadInput, match="add --labels cluster"):
        build_pairs(str(dst), "folders", evaluate_clustering=True)
    assert build_pairs(str(dst), evaluate_clustering=True)["labels"] == "cluster"  # implied when not given
    build_pairs(str(dst), "cluster")  # leave the default tables for the other tests


def test_the_cli_with_its_defaults_records_every_face_of_a_group_photo(ray_cluster, sample_photos, tmp_path):
    """`ray-faceid ingest SRC DST` as a new user runs it: t1.jpg's six people are six faces."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    (tmp_path / "archive" / "party").mkdir(parents=True)
    shutil.copy(sample_photos["t1.jpg"], tmp_path / "archive" / "party" / "t1.jpg")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "archive"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "out" / "faces.parquet").num_rows == 6


def test_folders_that_are_not_one_person_are_flagged_neither_paired_nor_enrolled(ray_cluster, faces_root, tmp_path):
    """A folder of group photos (with one portrait among them) and a folder of two different people
    are named with why, and neither gets pairs nor an enrollment; a real person's folder does."""
    from ray_faceid.enrollment import enroll_dataset
    from ray_faceid.registry import Registry

    src = tmp_path / "archive"
    shutil.copytree(faces_root / "amy", src / "amy")
    (src / "party").mkdir()
    for name in ("face-api_bbt1.jpg", "face-api_bbt2.jpg", "face-api_bbt3.jpg"):
        shutil.copy(faces_root / "group" / name, src / "party" / name)
    shutil.copy(sorted((faces_root / "obama").iterdir())[0], src / "party" / "portrait.jpg")
    (src / "mixed").mkdir()
    shutil.copy(sorted((faces_root / "biden").iterdir())[0], src / "mixed" / "a.jpg")
    shutil.copy(sorted((faces_root / "allyson_felix").iterdir())[0], src / "mixed" / "b.jpg")
    dst = tmp_path / "dataset"
    run_ingest(str(src), str(dst), CONFIG, labels="folders")
    result = build_pairs(str(dst), "folders")
    assert set(result["flagged"]) == {"party", "mixed"}
    assert "group photos" in result["flagged"]["party"] and "verifies" in result["flagged"]["mixed"]
    paired = {p["identity"] for p in pq.read_table(dst / "pairs.parquet").to_pylist()}
    assert paired == {"amy"}
    enrolled = enroll_dataset(Registry(str(tmp_path / "registry")), "default", str(dst), consent="licence (test)")
    assert set(enrolled["enrolled"]) == {"amy"}
    assert enrolled["skipped"]["party"].startswith("flagged: ")
