"""Attribute edits on real embeddings: the attribute flow against the linear-probe baseline, on
people the flow never saw, through the commands a user runs:

    ray-faceid ingest PEOPLE DATASET --landmarks dlib68   (folder labels; 68 points measure the smile,
                                                          mouth and eyes; 5 points only the head pose)
    ray-faceid train DATASET --method flow --out FLOW ...
    ray-faceid eval-edits DATASET --flow FLOW --json

PEOPLE: the identity folders of ../shared/data/faces (or --faces DIR), copied into a scratch
folder (group and non-face photos are not one person each).

    python benchmarks/attribute_edits.py [--faces DIR] [--steps N] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

NOT_PEOPLE = {"group", "nonface", "original_pairs"}
CLI = [str(Path(sys.executable).parent / "ray-faceid")]  # the installed command, as a user runs it


def run(*args: str) -> str:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  {' '.join(args[:1])}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return done.stdout


def rows(result: dict) -> list[str]:
    out = []
    for name, entry in result["attributes"].items():
        r2 = " | ".join("-" if entry[k] is None else f"{entry[k]:.2f}" for k in ("probe_r2", "flow_r2"))
        if not entry.get("targets"):
            out.append(f"| {name} | {r2} | - | - | - | - | - | - | - | - |")
        for t in entry.get("targets", []):
            for method, label in (("flow", "flow"), ("probe_direction", "baseline")):
                m = t[method]
                others = "-" if m["same_person_others"] is None else f"{m['same_person_others']:.0%}"
                out.append(f"| {name} | {r2} | {t['target']:g} | {label} | {m['moved_mean']:.3f} | "
                           f"{m['probe_change_mean']:+.3f} | {m['flow_change_mean']:+.3f} | "
                           f"{m['same_person_original']:.0%} | {others} | {m['undo_max_error']:.1e} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))
    parser.add_argument("--steps", type=int, default=600, help="Flow training steps.")
    parser.add_argument("--landmarks", default="dlib68", help="dlib68 (labels every attribute) or dlib5.")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    faces = Path(args.faces)
    if not faces.is_dir():
        sys.exit(f"no labelled photos at {faces}: pass --faces DIR (one folder per person)")
    with tempfile.TemporaryDirectory() as scratch:
        people, dataset, flow = Path(scratch, "people"), Path(scratch, "dataset"), Path(scratch, "flow")
        people.mkdir()
        for folder in sorted(p for p in faces.iterdir() if p.is_dir() and p.name not in NOT_PEOPLE):
            shutil.copytree(folder, people / folder.name)  # the archive lister does not follow links
        started = time.perf_counter()
        run("ingest", str(people), str(dataset), "--landmarks", args.landmarks)
        training = json.loads(run("train", str(dataset), "--method", "flow", "--out", str(flow), "--steps",
                                  str(args.steps), "--batch-size", "32", "--lr", "1e-3", "--workers", "1", "--json"))
        result = json.loads(run("eval-edits", str(dataset), "--flow", str(flow), "--json"))
        seconds = time.perf_counter() - started
    unedited = result["unedited"]["same_person_others"]
    lines = [
        f"### attribute_edits — {time.strftime('%Y-%m-%d')} — {machine_line()}", "",
        f"{args.faces}, `--landmarks {args.landmarks}`: flow trained on {result['people_train']} people "
        f"({args.steps} steps, batch 32, lr 1e-3, "
        f"eval loss {training['eval_loss_start']:.3f} -> {training['eval_loss_end']:.3f}); measured on "
        f"{result['faces_held_out']} faces of {result['people_held_out']} held-out people; encoder {result['encoder']}, "
        f"same-person threshold {result['threshold']:g}; unedited faces are the same person as their other photos "
        f"{'-' if unedited is None else f'{unedited:.0%}'}; {seconds:.0f} s in all.", "",
        "Baseline: the same requested change along a linear probe's direction (ridge on within-person variation). "
        "moved: mean L2 in the encoder's units; Δ probe / Δ flow: mean change of the attribute as the probe / the "
        "flow reads it (attribute units: fractions, degrees); flow R²: the flow's coordinate as a reading of the "
        "measured attribute on the held-out faces; same: share still the same person, to the photo "
        "itself / median to the person's other photos; undo err: max |edit then undo - original|.", "",
        "| attribute | probe R² | flow R² | target | method | moved | Δ probe | Δ flow | same: photo | same: others "
        "| undo err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows(result), "",
        *[f"- {name}: {entry['note']}" for name, entry in result["attributes"].items() if entry["note"]],
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
