"""eval-edits on a small dataset built here: an attribute the embeddings carry (smile) against one
they do not (yaw), a flow trained on the training people, the baseline in the same report."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from ray_faceid.cli.app import app
from ray_faceid.data.person_split import held_out_people
from ray_faceid.errors import BadInput
from ray_faceid.eval.edits import evaluate_edits
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.expression import EXPRESSION_KEYS, code_from_attributes
from ray_faceid.identity.flow import AttributeFlow, save_flow

DIM = 16
SPEC = EncoderSpec(name="synthetic", dim=DIM, version="t", license="-", metric="euclidean", threshold=0.6)


def build_dataset(root, people: int = 10, shots: int = 8, seed: int = 0):
    """Embeddings = person centre + smile along one direction + noise; yaw is labelled but not in them."""
    rng = np.random.default_rng(seed)
    smile_axis = np.eye(DIM)[0] * 0.4
    faces, identities = [], []
    for p in range(people):
        centre = rng.normal(size=DIM) * 0.3
        ids = []
        for s in range(shots):
            smile, yaw = rng.uniform(0, 1), rng.uniform(-40, 40)
            face_id = f"p{p}_{s}"
            faces.append({"face_id": face_id, "embedding": (centre + smile * smile_axis + rng.normal(size=DIM) * 0.03).tolist(),
                          "smile": smile, "yaw": yaw, "pitch": 0.0, "mouth_open": None, "eyes_open": None})
            ids.append(face_id)
        identities.append({"identity": f"person{p}", "face_ids": ids})
    from ray_faceid.data import tables

    tables.write_table(str(root / "faces.parquet"), pa.Table.from_pylist(faces))
    tables.write_table(str(root / "identities.parquet"), pa.Table.from_pylist(identities))
    (root / "summary.json").write_text(json.dumps({"encoder_spec": SPEC.model_dump()}))
    return faces, identities


def train_flow(out, faces, identities, held_out):
    person = {f: k for k, row in enumerate(identities) if row["identity"] not in held_out for f in row["face_ids"]}
    rows = [f for f in faces if f["face_id"] in person]
    x = torch.tensor([f["embedding"] for f in rows], dtype=torch.float32)
    labels = torch.tensor([code_from_attributes(f) for f in rows], dtype=torch.float32)
    people = torch.tensor([person[f["face_id"]] for f in rows])
    torch.manual_seed(0)
    flow = AttributeFlow(DIM, EXPRESSION_KEYS, couplings=4, hidden=64)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        flow.losses(x, labels, people)["total"].backward()
        opt.step()
    save_flow(str(out), flow, SPEC.key(), {"held_out_people": held_out})


@pytest.fixture(scope="module")
def dataset_and_flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    faces, identities = build_dataset(root)
    held_out = held_out_people(row["identity"] for row in identities)
    train_flow(root / "flow", faces, identities, held_out)
    return root, held_out


def test_the_report_tells_a_carried_attribute_from_an_absent_one(dataset_and_flow):
    root, held_out = dataset_and_flow
    report = evaluate_edits(str(root), str(root / "flow"))
    assert report["people_held_out"] == len(held_out) == 2 and report["faces_held_out"] == 16
    assert report["flow_saw_held_out_people"] is False
    smile, yaw = report["attributes"]["smile"], report["attributes"]["yaw"]
    assert smile["probe_r2"] > 0.8 and smile["carried"] and smile["note"] is None
    assert yaw["probe_r2"] < 0.25 and not yaw["carried"] and "barely hold yaw" in yaw["note"]
    assert report["attributes"]["eyes_open"]["note"].startswith("too few faces with this attribute measured")
    low, high = smile["targets"]
    for method in ("flow", "probe_direction"):
        # Asking for a broad smile moves the smile up as the probe reads it, a neutral face down.
        assert high[method]["probe_change_mean"] > 0.1 > -0.1 > low[method]["probe_change_mean"]
        assert high[method]["reversible"] and high[method]["undo_max_error"] <= 1e-4
        assert 0.0 <= high[method]["same_person_original"] <= 1.0


def test_eval_edits_cli_prints_the_table_and_json(dataset_and_flow):
    root, _ = dataset_and_flow
    runner = CliRunner()
    shown = runner.invoke(app, ["eval-edits", str(root), "--flow", str(root / "flow")])
    assert shown.exit_code == 0, shown.output
    assert "baseline" in shown.output and "smile" in shown.output and "barely hold yaw" in shown.output
    as_json = runner.invoke(app, ["eval-edits", str(root), "--flow", str(root / "flow"), "--json"])
    assert json.loads(as_json.output)["attributes"]["smile"]["carried"] is True


def test_too_few_people_to_hold_any_out_is_refused(tmp_path):
    faces, identities = build_dataset(tmp_path, people=3)
    train_flow(tmp_path / "flow", faces, identities, [])
    with pytest.raises(BadInput, match="needs at least 5"):
        evaluate_edits(str(tmp_path), str(tmp_path / "flow"))
