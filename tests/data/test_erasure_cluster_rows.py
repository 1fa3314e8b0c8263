"""Erasing a person from a dataset grouped by clustering: the cluster that took her faces goes with
its centre, the other faces it gave her (a group photo's), and their pairs; other people stay,
also where an older grouping links them to her; an erasure stopped at any step finishes the same."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_faceid.data import tables
from ray_faceid.erasure import CLUSTERS, IDENTITIES, PAIRS, erase_dataset_labels, erase_identity
from ray_faceid.errors import Erased
from ray_faceid.registry import Registry

from .test_erasure_faults import steps


def dataset(root):
    """Amy's two photos and a group photo's face clustered with her (cluster_0); Bob with another
    group face (cluster_1); an older grouping (clusters.parquet) that put Bob with Cy (cluster_9)."""
    tmp_path = root
    rng = np.random.default_rng(0)
    vectors = {face: rng.normal(size=8).astype(np.float32)
               for face in ("amy1", "amy2", "group1", "bob1", "group2", "cy1")}
    labels = {"amy1": "amy", "amy2": "amy", "group1": "group", "bob1": "bob", "group2": "group", "cy1": "cy"}
    faces = [{"face_id": f, "image_uri": f"/photos/{f}.jpg", "face_index": 0, "label": labels[f],
              "embedding": v.tolist()} for f, v in vectors.items()]
    tables.write_table(str(tmp_path / tables.FACES), pa.Table.from_pylist(faces, schema=tables.FACE_SCHEMA))
    centre = np.mean([vectors[f] for f in ("amy1", "amy2", "group1")], axis=0)
    clusters = [{"identity": "cluster_0", "face_ids": ["amy1", "amy2", "group1"], "embedding": centre.tolist()},
                {"identity": "cluster_1", "face_ids": ["bob1", "group2"],
                 "embedding": np.mean([vectors["bob1"], vectors["group2"]], axis=0).tolist()}]
    tables.write_table(str(tmp_path / IDENTITIES), pa.Table.from_pylist(clusters))
    tables.write_table(str(tmp_path / CLUSTERS), pa.Table.from_pylist([
        {"identity": c["identity"], "face_ids": c["face_ids"]} for c in clusters]
        + [{"identity": "cluster_9", "face_ids": ["bob1", "cy1"]}]))
    tables.write_table(str(tmp_path / PAIRS), pa.Table.from_pylist([
        {"identity": "cluster_0", "source_face_id": "group1", "target_face_id": "amy1"},
        {"identity": "cluster_1", "source_face_id": "bob1", "target_face_id": "group2"}]))
    return vectors, [vectors["amy1"], vectors["amy2"], vectors["group1"], centre]


def left_of(tmp_path, gone):
    """What the dataset holds after Amy's erasure: the rest, and no trace of her."""
    assert [r["face_id"] for r in tables.read_table(str(tmp_path / tables.FACES)).to_pylist()] == ["bob1", "group2",
                                                                                                    "cy1"]
    assert [r["identity"] for r in tables.read_table(str(tmp_path / IDENTITIES)).to_pylist()] == ["cluster_1"]
    assert [r["identity"] for r in tables.read_table(str(tmp_path / CLUSTERS)).to_pylist()] == ["cluster_1",
                                                                                                 "cluster_9"]
    assert [p["identity"] for p in tables.read_table(str(tmp_path / PAIRS)).to_pylist()] == ["cluster_1"]
    for path in tmp_path.glob("*.parquet"):  # neither her embeddings nor her cluster's centre, as bytes or cells
        data = path.read_bytes()
        assert not any(v.tobytes()[:16] in data for v in gone), path.name
        cells = [np.asarray(r["embedding"], np.float32) for r in pq.read_table(io.BytesIO(data)).to_pylist()
                 if r.get("embedding") is not None]
        assert not any(np.allclose(c, v, atol=1e-6) for c in cells for v in gone), path.name


def test_her_cluster_its_centre_and_the_faces_it_gave_her_are_erased(tmp_path):
    _, gone = dataset(tmp_path)
    report = erase_dataset_labels(str(tmp_path), {"amy"})
    assert report["faces"] == 3 and report["pairs"] == 1
    left_of(tmp_path, gone)  # Bob and Cy stay: an older grouping joining them is not hers


@pytest.mark.parametrize("fail_at", range(12))
def test_a_dataset_erasure_stopped_at_any_step_finishes_the_same(tmp_path, monkeypatch, spec128, fail_at):
    data = tmp_path / "dataset"
    data.mkdir()
    vectors, gone = dataset(data)
    registry = Registry(str(tmp_path / "registry"))
    registry.create("t", "amy", "form-amy", np.stack([vectors["amy1"], vectors["amy2"]]).repeat(16, axis=1),
                    np.ones(2, np.float32), spec128, [np.zeros((8, 8, 3), np.uint8)], [],
                    source={"dataset": str(data), "identity": "amy"})
    seen = steps(monkeypatch, fail_at)
    try:
        erase_identity(registry, "t", "amy")
        finished = True
    except OSError:
        finished = False
    monkeypatch.undo()
    if finished:
        assert fail_at >= len(seen)
        with pytest.raises(Erased):
            erase_identity(registry, "t", "amy")
    else:
        erase_identity(registry, "t", "amy")
    left_of(data, gone)
