"""Adding photos to a clustered archive: new faces join the identities they verify against, the
first run's identity names are kept, only the rest are clustered, unchanged identities keep their
pairs; and the result groups people as one clustering of everything does."""
from __future__ import annotations

import shutil

import pytest

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


@pytest.mark.shared_data
def test_adding_photos_grows_the_identities_and_keeps_their_names(ray_cluster, faces_root, tmp_path):
    archive, dst, whole = tmp_path / "archive", tmp_path / "dataset", tmp_path / "whole"
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

    # Then the rest of amy's and penny's photos, and a fourth person; sheldon gets none.
    for person in ("amy", "penny", "leonard"):
        for photo in photos[person][3 if person != "leonard" else 0:]:
            shutil.copy(photo, archive / person / photo.name)
    run_ingest(str(archive), str(dst), CONFIG, labels="folders", resume=True)
    grown = build_pairs(str(dst), labels="cluster")
    assert grown["grouping"] == "grown from the last cluster run"
    after = groups(dst)
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

    # One clustering of everything groups the same photos together.
    run_ingest(str(archive), str(whole), CONFIG, labels="folders")
    build_pairs(str(whole), labels="cluster")
    photo_of, photo_of_whole = by_image(dst), by_image(whole)
    grown_labels = {photo_of[f]: name for name, ids in after.items() for f in ids}
    whole_labels = {photo_of_whole[f]: name for name, ids in groups(whole).items() for f in ids}
    shared = sorted(set(grown_labels) & set(whole_labels))
    scores = clustering_scores([grown_labels[u] for u in shared], [whole_labels[u] for u in shared])
    assert scores["bcubed_f1"] >= 0.95, scores

    # --recluster starts over: every face grouped again.
    again = build_pairs(str(dst), labels="cluster", recluster=True)
    assert "faces kept in their identity" not in again and again["identities"] == len(groups(whole))

    # The grouping the next run grows (clusters.parquet) holds face ids: an erasure removes them too.
    from ray_faceid.data.pairs import CLUSTERS
    from ray_faceid.erasure import erase_dataset_labels

    gone = tables.read_table(f"{dst}/{CLUSTERS}").to_pylist()[0]
    erase_dataset_labels(str(dst), {gone["identity"]})
    left = tables.read_table(f"{dst}/{CLUSTERS}").to_pylist()
    assert gone["identity"] not in {r["identity"] for r in left}
    assert not set(gone["face_ids"]) & {i for r in left for i in r["face_ids"]}

