"""Erasing a person from a dataset grouped by clustering: the cluster that took her faces goes with
its centre, the other faces it gave her (a group photo's), and their pairs; other people stay."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_faceid.data import tables
from ray_faceid.erasure import CLUSTERS, IDENTITIES, PAIRS, erase_dataset_labels


def test_her_cluster_its_centre_and_the_faces_it_gave_her_are_erased(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {face: rng.normal(size=8).astype(np.float32) for face in ("amy1", "amy2", "group1", "bob1", "group2")}
    labels = {"amy1": "amy", "amy2": "amy", "group1": "group", "bob1": "bob", "group2": "group"}
    faces = [{"face_id": f, "image_uri": f"/photos/{f}.jpg", "face_index": 0, "label": labels[f],
              "embedding": v.tolist()} for f, v in vectors.items()]
    tables.write_table(str(tmp_path / tables.FACES), pa.Table.from_pylist(faces, schema=tables.FACE_SCHEMA))
    centre = np.mean([vectors[f] for f in ("amy1", "amy2", "group1")], axis=0)
    clusters = [{"identity": "cluster_0", "face_ids": ["amy1", "amy2", "group1"], "embedding": centre.tolist()},
                {"identity": "cluster_1", "face_ids": ["bob1", "group2"],
                 "embedding": np.mean([vectors["bob1"], vectors["group2"]], axis=0).tolist()}]
    tables.write_table(str(tmp_path / IDENTITIES), pa.Table.from_pylist(clusters))
    tables.write_table(str(tmp_path / CLUSTERS), pa.Table.from_pylist([
        {"identity": c["identity"], "face_ids": c["face_ids"]} for c in clusters]))
    tables.write_table(str(tmp_path / PAIRS), pa.Table.from_pylist([
        {"identity": "cluster_0", "source_face_id": "group1", "target_face_id": "amy1"},
        {"identity": "cluster_1", "source_face_id": "bob1", "target_face_id": "group2"}]))

    report = erase_dataset_labels(str(tmp_path), {"amy"})

    assert report["faces"] == 3 and report["pairs"] == 1
    assert [r["face_id"] for r in tables.read_table(str(tmp_path / tables.FACES)).to_pylist()] == ["bob1", "group2"]
    for grouping in (IDENTITIES, CLUSTERS):
        assert [r["identity"] for r in tables.read_table(str(tmp_path / grouping)).to_pylist()] == ["cluster_1"]
    assert [p["identity"] for p in tables.read_table(str(tmp_path / PAIRS)).to_pylist()] == ["cluster_1"]
    gone = [vectors["amy1"], vectors["amy2"], vectors["group1"], centre]
    for path in tmp_path.glob("*.parquet"):  # neither her embeddings nor her cluster's centre, as bytes or cells
        data = path.read_bytes()
        assert not any(v.tobytes()[:16] in data for v in gone), path.name
        cells = [np.asarray(r["embedding"], np.float32) for r in pq.read_table(io.BytesIO(data)).to_pylist()
                 if r.get("embedding") is not None]
        assert not any(np.allclose(c, v, atol=1e-6) for c in cells for v in gone), path.name
