"""Adding photos to a clustered archive: new faces join the identities they verify against, the
first run's identity names are kept, only the rest are clustered, unchanged identities keep their
pairs; and the result groups people as one clustering of everything does. Group photos among them:
no identity, grown or fresh, holds two faces of one photo, and no pair joins two."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from ray_faceid.config import DetectionConfig, FaceConfig, IngestConfig
from ray_faceid.data import tables
from ray_faceid.data.ingest import run_ingest
from ray_faceid.data.pairs import IDENTITIES, PAIRS, build_pairs
from ray_faceid.eval.clustering import clustering_scores

CONFIG = IngestConfig(workers=2, batch_size=4, crop_size=64, num_gpus_per_worker=0,
                      face=FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)))


def groups(dst) -> dict[str, set[str]]:
    rows = tables.read_table(f"{dst}/{IDENTITIES}").to_pylist()
    return {r["identity"]: set(r["face_ids"]) for r in rows}


def by_image(dst) -> dict[str, str]:
    """face id -> the photo it came from (ids are stable across runs; names differ between datasets)."""
    return {r["face_id"]: r["image_uri"] for r in tables.read_table(f"{dst}/{tables.FACES}").to_pylist()}


# 2-6 faces each, none of the four people above (sheldon's identity must stay untouched): strangers
# in small faces, and Obama and Biden together twice (one person across photos, never within one).
GROUP_PHOTOS = ("dlib_2008_001009.jpg", "dlib_2008_001322.jpg", "dlib_2008_002079.jpg",
                "face_recognition_obama_and_biden.jpg", "face_recognition_two_people.jpg",
                "face_recognition_kit_with_rose.jpg")


def assert_one_photo_one_person(dst) -> None:
    photo = by_image(dst)
    for name, ids in groups(dst).items():
        assert len({photo[f] for f in ids}) == len(ids), (name, sorted(photo[f] for f in ids))
    for pair in tables.read_table(f"{dst}/{PAIRS}").to_pylist():
        assert photo[pair["source_face_id"]] != photo[pair["target_face_id"]], pair["identity"]


@pytest.mark.shared_data
def test_adding_photos_grows_the_identities_and_keeps_their_names(ray_cluster, faces_root, tmp_path):
    archive, dst = tmp_path / "archive", tmp_path / "dataset"
    people = ("amy", "penny", "sheldon", "leonard")
    for person in people:
        (archive / person).mkdir(parents=True)
    photos = {p: sorted((faces_root / p).iterdir()) for p in people}
    for person in people[:3]:  # first: three people, three photos each
        for photo in photos[person][:3]:
            shutil.copy(photo, archive / person / photo.name)
    run_ingest(str(archive), str(dst), CONFIG, labels="folders")
    first = build_pairs(str(dst), labels="cluster")
    before = groups(dst)
    pairs_before = tables.read_table(f"{dst}/{PAIRS}").to_pylist()
    assert first["identities"] >= 3

    # Then the rest of amy's and penny's photos, a fourth person and group photos; sheldon gets none.
    for person in ("amy", "penny", "leonard"):
        for photo in photos[person][3 if person != "leonard" else 0:]:
            shutil.copy(photo, archive / person / photo.name)
    (archive / "group").mkdir()
    for name in GROUP_PHOTOS:  # at two smaller sizes, as archives hold them: small faces that look alike
        with Image.open(faces_root / "group" / name) as photo:
            for scale in (0.5, 0.35):
                photo.convert("RGB").resize((int(photo.width * scale), int(photo.height * scale)), Image.BILINEAR) \
                    .save(archive / "group" / f"{Path(name).stem}_{int(scale * 100)}.jpg", quality=70)
    run_ingest(str(archive), str(dst), CONFIG, labels="folders", resume=True)
    grown = build_pairs(str(dst), labels="cluster")
    assert grown["grouping"] == "grown from the last cluster run"
    after = groups(dst)
    group_faces = [u for u in by_image(dst).values() if "/group/" in u]
    assert len(group_faces) >= 10  # the group photos' faces are in the grouping
    assert_one_photo_one_person(dst)
    assert grown["faces kept in their identity"] == sum(len(ids) for ids in before.values())
    assert grown["new faces joining an identity"] >= 1 and grown["new identities"] >= 1
    merged = 0
    for name, ids in before.items():  # a first-run identity keeps its name, or joined an earlier one whole
        home = [n for n, grown_ids in after.items() if ids <= grown_ids]
        assert len(home) == 1 and home[0] <= name, (name, after)
        merged += home[0] != name
    assert merged == grown["identities merged into an earlier one"]
    # Untouched identities (sheldon's) kept their pairs, row for row.
    pairs_after = tables.read_table(f"{dst}/{PAIRS}").to_pylist()
    untouched = [n for n in before if after.get(n) == before[n]]
    assert untouched
    for name in untouched:
        kept = [p for p in pairs_after if p["identity"] == name]
        assert kept and kept == [p for p in pairs_before if p["identity"] == name]
    # `ingest` runs pairs with its own (folder) labels; the next cluster run still grows this grouping.
    build_pairs(str(dst))
    assert build_pairs(str(dst), labels="cluster")["grouping"] == "grown from the last cluster run"
    assert groups(dst) == after

    # --recluster starts over: one clustering of every face, as a fresh dataset of the same faces gets
    # (its tables copied without any grouping; resuming an ingest gives the same tables, test_ingest.py),
    # groups the same photos together.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in (tables.FACES, tables.IMAGES, tables.SUMMARY):
        shutil.copy(dst / name, fresh / name)
    build_pairs(str(fresh), labels="cluster")
    again = build_pairs(str(dst), labels="cluster", recluster=True)
    whole = groups(dst)
    assert "faces kept in their identity" not in again and again["identities"] == len(groups(fresh))
    assert sorted(map(sorted, whole.values())) == sorted(map(sorted, groups(fresh).values()))
    assert_one_photo_one_person(dst)
    grown_labels = {f: name for name, ids in after.items() for f in ids}
    whole_labels = {f: name for name, ids in whole.items() for f in ids}
    shared = sorted(set(grown_labels) & set(whole_labels))
    scores = clustering_scores([grown_labels[u] for u in shared], [whole_labels[u] for u in shared])
    assert scores["bcubed_f1"] >= 0.95, scores

    # A looser cut (the encoder's own threshold) links a small group photo's faces to each other:
    # they are still kept apart.
    build_pairs(str(dst), labels="cluster", recluster=True, cut_share=1.0)
    assert_one_photo_one_person(dst)
    # --evaluate-clustering counts it over every face, group photos included.
    scored = build_pairs(str(dst), evaluate_clustering=True, cut_share=1.0)
    assert scored["clustering identities_with_two_faces_of_one_photo"] == 0

    # The grouping the next run grows (clusters.parquet) holds face ids: an erasure removes them too.
    from ray_faceid.data.pairs import CLUSTERS
    from ray_faceid.erasure import erase_dataset_labels

    gone = tables.read_table(f"{dst}/{CLUSTERS}").to_pylist()[0]
    erase_dataset_labels(str(dst), {gone["identity"]})
    left = tables.read_table(f"{dst}/{CLUSTERS}").to_pylist()
    assert gone["identity"] not in {r["identity"] for r in left}
    assert not set(gone["face_ids"]) & {i for r in left for i in r["face_ids"]}

