"""Erasing a person: after `identities delete`, no store the system wrote holds their id or their
embeddings, other people are untouched, and a scheduled `enroll-dataset` does not bring them back."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.config import RenderConfig
from ray_faceid.data.render import run_render
from ray_faceid.enrollment import enroll_dataset
from ray_faceid.eval.run import evaluate
from ray_faceid.registry import Registry

CONFIG = RenderConfig(steps=2, size="32x32", workers=1, batch_size=4)


def vectors_in(value, dim: int):
    """Every list of `dim` numbers inside a table cell (lists, or JSON text holding them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        if len(value) == dim and all(isinstance(v, (int, float)) for v in value):
            yield np.asarray(value, np.float32)
        else:
            for item in value:
                yield from vectors_in(item, dim)


def traces(roots: list[Path], identity: str, embeddings: np.ndarray) -> list[str]:
    """Files under `roots` whose bytes (or decoded tables) hold the id or one of the embeddings."""
    found = []
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if identity.encode() in data or identity in str(path):
                found.append(f"{path}: the id")
            if any(e.tobytes()[:32] in data for e in embeddings):
                found.append(f"{path}: embedding bytes")
            if path.suffix == ".parquet":
                for row in pq.read_table(io.BytesIO(data)).to_pylist():
                    for cell in row.values():
                        if any(np.allclose(v, e, atol=1e-5) for v in vectors_in(cell, embeddings.shape[1]) for e in embeddings):
                            found.append(f"{path}: an embedding in a table")
            if path.suffix == ".npz":
                arrays = np.load(io.BytesIO(data))
                if any(np.allclose(v, e, atol=1e-5) for k in arrays.files for v in np.atleast_2d(arrays[k])
                       if v.shape[-1:] == embeddings.shape[1:] for e in embeddings):
                    found.append(f"{path}: an embedding in an array")
    return found


@pytest.fixture(scope="module")
def world(ray_cluster, faces_root, tmp_path_factory):
    """A dataset of three people, a registry enrolled from it, a render of three rows and two evals."""
    from ray_faceid.config import DetectionConfig, FaceConfig, IngestConfig
    from ray_faceid.data.ingest import run_ingest
    from ray_faceid.data.pairs import build_pairs

    root = tmp_path_factory.mktemp("erasure")
    for person in ("amy", "penny", "sheldon"):
        shutil.copytree(faces_root / person, root / "archive" / person)
    dataset = root / "dataset"
    run_ingest(str(root / "archive"), str(dataset), IngestConfig(
        workers=2, batch_size=4, crop_size=64, num_gpus_per_worker=0,
        face=FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False))), labels="folders")
    build_pairs(str(dataset))
    registry = Registry(str(root / "registry"))
    ids = enroll_dataset(registry, "default", str(dataset), consent="dataset licence (test)")["enrolled"]
    rows = [{"id": "amy-beach", "identities": [ids["amy"]], "prompt": "a person at the beach", "seed": 1},
            {"id": "penny-beach", "identities": ["penny"], "prompt": "a person at the beach", "seed": 2},
            {"id": "both", "identities": ["amy", ids["penny"]], "prompt": "two people", "seed": 3}]
    (root / "catalog.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_render(str(root / "catalog.jsonl"), str(root / "rendered"), "tiny", registry.store, config=CONFIG)
    evaluate(str(root / "rendered"), registry)
    evaluate(str(root / "rendered"), registry, out=str(root / "evals"))
    return root, registry, ids


def test_delete_removes_the_person_from_every_store(world, small_dataset):
    root, registry, ids = world
    amy = ids["amy"]
    embeddings = registry.embeddings("default", amy)[0]
    dataset_vectors = np.array([f["embedding"] for f in pq.read_table(root / "dataset" / "faces.parquet").to_pylist()
                                if f["label"] == "amy"], np.float32)
    everything = np.concatenate([embeddings, dataset_vectors])
    stores = [root / "registry", root / "rendered", root / "evals", root / "dataset"]  # not the archive: the operator's
    assert traces(stores, amy, everything), "the check must see the person before the erasure"

    result = CliRunner().invoke(app, ["identities", "delete", "amy", "--registry", registry.store, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    where = {Path(r["where"]).name: r for r in report["removed"]}
    assert where["rendered"]["rows"] == 2 and where["dataset"]["faces"] == len(dataset_vectors)
    assert "evals" in where and amy in {Path(r["where"]).name for r in report["removed"]}

    assert traces(stores, amy, everything) == []
    # Penny is untouched: her row, image, registry entry and dataset faces remain.
    manifest = {r["id"]: r for r in pq.read_table(root / "rendered" / "manifest.parquet").to_pylist()}
    assert set(manifest) == {"penny-beach"} and Path(manifest["penny-beach"]["output_uri"]).is_file()
    assert registry.get("default", ids["penny"])["name"] == "penny"
    labels = {f["label"] for f in pq.read_table(root / "dataset" / "faces.parquet").to_pylist()}
    assert labels == {"penny", "sheldon"}

    # A scheduled re-run over the archive's dataset (amy is still in it) does not bring her back ...
    again = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")
    assert "erased" in again["skipped"]["amy"] and registry.named("default", "amy") == []
    # ... unless the operator records her new consent.
    back = enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)",
                          reconsent={"amy": "consent form 2026-12"})
    assert registry.get("default", back["enrolled"]["amy"])["consent"] == "consent form 2026-12"


def test_erasing_from_a_copied_dataset_deletes_the_copys_crops_not_the_originals(small_dataset, tmp_path):
    """A copied dataset's tables still name the original's crop paths."""
    from ray_faceid.erasure import erase_dataset_labels

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    faces = pq.read_table(copy / "faces.parquet").to_pylist()
    crops = [f["crop_uri"] for f in faces if f["label"] == "penny" and f.get("crop_uri")]
    assert crops and all(c.startswith(small_dataset) for c in crops)
    own = [copy / Path(c).relative_to(small_dataset) for c in crops]
    assert all(p.is_file() for p in own)
    erase_dataset_labels(str(copy), {"penny"})
    assert all(Path(c).is_file() for c in crops)  # the original keeps its crops
    assert not any(p.exists() for p in own)  # the copy loses its own
