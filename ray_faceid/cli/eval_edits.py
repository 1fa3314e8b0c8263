"""`ray-faceid eval-edits`: the attribute flow's edits against the naive baseline, on held-out people."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ray_faceid.cli.common import console, print_json, user_errors


def _cell(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def report_table(report: dict) -> Table:
    table = Table(title=f"attribute edits on {report['faces_held_out']} faces of {report['people_held_out']} held-out "
                  f"people (threshold {report['threshold']:g})", title_justify="left")
    for column in ("attribute", "probe R²", "flow R²", "target", "method", "moved", "Δ probe", "Δ flow", "same: photo",
                   "same: others", "undo err"):
        table.add_column(column, justify="left" if column in ("attribute", "method") else "right")
    for name, entry in report["attributes"].items():
        first = True
        for t in entry.get("targets", []):
            for method, label in (("flow", "flow"), ("probe_direction", "baseline")):
                m = t[method]
                head = [name, _cell(entry["probe_r2"], "{:.2f}"), _cell(entry["flow_r2"], "{:.2f}")] if first else [""] * 3
                table.add_row(*head, f"{t['target']:g}", label, _cell(m["moved_mean"]),
                              _cell(m["probe_change_mean"], "{:+.3f}"), _cell(m["flow_change_mean"], "{:+.3f}"),
                              _cell(m["same_person_original"], "{:.0%}"), _cell(m["same_person_others"], "{:.0%}"),
                              _cell(m["undo_max_error"], "{:.1e}"))
                first = False
        if not entry.get("targets"):
            table.add_row(name, _cell(entry["probe_r2"], "{:.2f}"), _cell(entry["flow_r2"], "{:.2f}"), *[""] * 8)
    return table


def eval_edits(
    dataset: str = typer.Argument(..., help="An ingest output after `ray-faceid pairs` (faces with identity labels)."),
    flow: str = typer.Option(..., "--flow", help="The attribute flow to measure (train --method flow)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure attribute edits on real embeddings of held-out people, with the linear-probe baseline."""
    from ray_faceid.eval.edits import evaluate_edits

    with user_errors():
        report = evaluate_edits(dataset, flow)
    if as_json:
        print_json(report)
        return
    # Ten columns do not fit 80: let the table run wider rather than cut its numbers.
    Console(width=max(console.width, 120)).print(report_table(report))
    console.print("baseline: the same change along a linear probe's direction; moved: L2 in the encoder's units; "
                  "Δ: mean change of the attribute as the probe / the flow reads it; same: share still the same "
                  "person (to the photo itself / median to the person's other photos)")
    unedited = report["unedited"]["same_person_others"]
    console.print(f"unedited embeddings: same person as their other photos {_cell(unedited, '{:.0%}')}")
    if report["flow_saw_held_out_people"]:
        console.print("[yellow]the flow was trained on every person of this dataset: its figures are optimistic[/yellow]")
    for name, entry in report["attributes"].items():
        if entry["note"]:
            console.print(f"{name}: {entry['note']}")
