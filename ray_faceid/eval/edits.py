"""How well attribute edits work on real embeddings (`ray-faceid eval-edits`), against the naive
baseline, on people the flow never saw.

For each attribute the flow holds and a few target values, over the faces of the held-out people
(data/person_split.py; the split is by person, never by photo):

- a linear probe (ridge regression on the training people's within-person variation) says whether
  the encoder carries the attribute at all: its R^2 on the held-out people's. Where it is low, no
  edit of that attribute changes anything a user would see, and the report says so;
- the flow edit sets the attribute coordinate; the baseline moves the embedding along the probe's
  direction by the requested change (target minus the face's measured value), in embedding space;
- for both: how far the embedding moved, how far the attribute moved as the probe and as the flow
  read it, whether the edited embedding is still the same person by the encoder's own threshold
  (to the original photo, and to the person's other photos: the median distance), and whether
  undoing the edit returns the original (within 1e-4);
- how well the flow's own coordinate reads the attribute on the held-out faces (flow R^2): a flow
  that learned the attribute for its training people only sets a coordinate that means little.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ray_faceid import storage
from ray_faceid.data import tables
from ray_faceid.data.pairs import IDENTITIES
from ray_faceid.data.person_split import MIN_PEOPLE, held_out_people
from ray_faceid.errors import BadInput
from ray_faceid.face.spec import EncoderSpec
from ray_faceid.identity.edits import from_flow_units, to_flow_units

# Targets per attribute, in its own units (face/attributes.py): both ends of what users ask for.
TARGETS = {"smile": (0.0, 1.0), "mouth_open": (0.0, 0.8), "eyes_open": (0.2, 1.0), "yaw": (-30.0, 30.0),
           "pitch": (-20.0, 20.0)}
CARRIED_R2 = 0.25  # below this the encoder barely holds the attribute (a probe explains < 25 % of it)
REVERSIBLE_TOL = 1e-4


def within_person(x: np.ndarray, people: list[str]) -> np.ndarray:
    """Each row minus its person's mean: what varies between one person's photos (the attribute,
    lighting, ...) without what tells people apart, which a probe over few people would latch onto."""
    out = np.array(x, np.float64)
    for name in set(people):
        rows = [i for i, p in enumerate(people) if p == name]
        out[rows] -= out[rows].mean(0)
    return out


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - predicted) ** 2).sum()) / total if total > 0 else 0.0


def fit_probe(x: np.ndarray, y: np.ndarray, people: list[str], folds: int = 5) -> np.ndarray:
    """Ridge weights on within-person variation; the strength picked by cross-validation over
    groups of people (never photos of one person on both sides)."""
    xc, yc = within_person(x, people), within_person(y[:, None], people)[:, 0]
    names = sorted(set(people))
    fold_of = {name: i % folds for i, name in enumerate(names)}
    scale = float(np.trace(xc.T @ xc)) / x.shape[1]
    best = None
    for alpha in scale * np.logspace(-3, 2, 11):
        scores = []
        for fold in range(min(folds, len(names))):
            test = np.array([fold_of[p] == fold for p in people])
            if test.all() or not test.any():
                continue
            w = ridge(xc[~test], yc[~test], alpha)
            scores.append(r_squared(yc[test], xc[test] @ w))
        score = float(np.mean(scores)) if scores else -np.inf
        if best is None or score > best[0]:
            best = (score, alpha)
    return ridge(xc, yc, best[1])


def _faces(dataset: str) -> tuple[list[dict], dict[str, str], EncoderSpec]:
    summary = json.loads(storage.read_bytes(storage.join(dataset, tables.SUMMARY)))
    if not summary.get("encoder_spec"):
        raise BadInput(f"{dataset}: the ingest found no faces")
    if not storage.exists(storage.join(dataset, IDENTITIES)):
        raise BadInput(f"{dataset} has no {IDENTITIES}: run `ray-faceid pairs {dataset}` first")
    person = {face: row["identity"] for row in tables.read_table(storage.join(dataset, IDENTITIES)).to_pylist()
              for face in row["face_ids"]}
    faces = [f for f in tables.read_table(storage.join(dataset, tables.FACES)).to_pylist() if f["face_id"] in person]
    return faces, person, EncoderSpec(**summary["encoder_spec"])


def _same_person(spec: EncoderSpec, edited: np.ndarray, original: np.ndarray, others: list[np.ndarray]) -> dict:
    """Shares of faces still the same person: to the original, and to the person's other photos."""
    to_original = spec.distance(edited, original) <= spec.threshold
    kept = [float(np.median(spec.distance(o, e))) <= spec.threshold for e, o in zip(edited, others) if len(o)]
    return {"same_person_original": float(to_original.mean()),
            "same_person_others": float(np.mean(kept)) if kept else None}


def _method_figures(spec, x, edited, undone, others, w, flow_read) -> dict:
    """One method's figures for one target: `w` is the probe's weights, `flow_read` the flow's reading."""
    return {
        "moved_mean": float(np.linalg.norm(edited - x, axis=1).mean()),
        "probe_change_mean": float(((edited - x) @ w).mean()),
        "flow_change_mean": float((flow_read(edited) - flow_read(x)).mean()),
        **_same_person(spec, edited, x, others),
        "undo_max_error": float(np.abs(undone - x).max()),
        "reversible": bool(np.abs(undone - x).max() <= REVERSIBLE_TOL),
    }


def evaluate_edits(dataset: str, flow_uri: str) -> dict:
    """The report `ray-faceid eval-edits` prints (see the module docstring)."""
    from ray_faceid.identity.flow import load_flow

    faces, person, spec = _faces(dataset)
    flow = load_flow(flow_uri, spec.key())
    people = sorted(set(person[f["face_id"]] for f in faces))
    held_out = flow.held_out_people or held_out_people(people)
    if len(people) < MIN_PEOPLE or not held_out:
        raise BadInput(f"{dataset}: {len(people)} labelled people; eval-edits holds out whole people and needs "
                       f"at least {MIN_PEOPLE}")
    test = [f for f in faces if person[f["face_id"]] in held_out]
    train = [f for f in faces if person[f["face_id"]] not in held_out]
    x_test = np.array([f["embedding"] for f in test], np.float64)
    others = [np.array([g["embedding"] for g in test if person[g["face_id"]] == person[f["face_id"]]
                        and g["face_id"] != f["face_id"]]).reshape(-1, x_test.shape[1]) for f in test]

    def encode(x: np.ndarray) -> torch.Tensor:
        return flow.encode(torch.tensor(x, dtype=torch.float32))[0]

    report = {
        "dataset": dataset, "flow": flow.weights_hash, "encoder": spec.key(), "threshold": spec.threshold,
        "people_train": len(people) - len(held_out), "people_held_out": len(held_out), "faces_held_out": len(test),
        "flow_saw_held_out_people": not flow.held_out_people,
        "unedited": _same_person(spec, x_test, x_test, others), "attributes": {},
    }
    for k, name in enumerate(flow.attributes):
        labelled = [f for f in train if f.get(name) is not None]
        scored = [f for f in test if f.get(name) is not None]
        if len(labelled) < 3 or len(scored) < 2:
            report["attributes"][name] = {
                "probe_r2": None, "flow_r2": None, "carried": False,
                "note": "too few faces with this attribute measured (smile, mouth and eye opening need 68-point "
                "landmarks: `ingest --landmarks dlib68`)"}
            continue
        w = fit_probe(np.array([f["embedding"] for f in labelled], np.float64), np.array([f[name] for f in labelled]),
                      [person[f["face_id"]] for f in labelled])
        x = np.array([f["embedding"] for f in scored], np.float64)
        y = np.array([f[name] for f in scored], np.float64)
        owners = [person[f["face_id"]] for f in scored]
        varying = within_person(y[:, None], owners)[:, 0]
        r2 = r_squared(varying, within_person(x, owners) @ w)
        carried = r2 >= CARRIED_R2
        note = None if carried else (
            f"{name} does not vary between a held-out person's photos: nothing to measure" if varying.std() < 1e-9
            else f"the encoder's embeddings barely hold {name} (probe R^2 {r2:.2f} on held-out people): "
            "an edit of it changes little a user would see")
        entry = {"probe_r2": r2, "carried": carried, "faces": len(scored), "targets": [], "note": note}
        with torch.no_grad():  # how well the flow's own coordinate reads the attribute on new people
            entry["flow_r2"] = r_squared(y, from_flow_units(name, encode(x)[:, k].double().numpy()))
        mine = [others[test.index(f)] for f in scored]

        def flow_read(e: np.ndarray, k=k, name=name) -> np.ndarray:
            return from_flow_units(name, encode(e)[:, k].double().numpy())

        with torch.no_grad():
            z = encode(x)
            for target in TARGETS.get(name, ()):
                edited, _ = flow.edit(torch.tensor(x, dtype=torch.float32), to_flow_units({name: target}))
                undone, _ = flow.edit(edited, {name: z[:, k]})
                # The baseline: from the measured value to the target along the probe's direction.
                step = (target - y) / max(float(w @ w), 1e-12)
                naive = x + step[:, None] * w[None, :]
                naive_undone = naive - step[:, None] * w[None, :]
                entry["targets"].append({
                    "target": target,
                    "flow": _method_figures(spec, x, edited.double().numpy(), undone.double().numpy(), mine, w,
                                            flow_read),
                    "probe_direction": _method_figures(spec, x, naive, naive_undone, mine, w, flow_read),
                })
        report["attributes"][name] = entry
    return report
