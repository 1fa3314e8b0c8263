"""`ray-faceid provenance IMAGE...`: what made an image, read back from the record it carries; a file
without one is named in one line (exit 2), the others still shown."""
import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from ray_faceid.cli import app
from ray_faceid.pipelines.provenance import read_provenance


def test_provenance_reads_back_what_made_an_image(tmp_path):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))
    made = CliRunner().invoke(app, ["generate", "--model", "tiny", "--face-embedding", str(tmp_path / "emb.npy"),
                                    "--strength", "0.5", "--prompt", "a portrait, [blurry] [/]", "--steps", "2", "--seed", "7",
                                    "--out", str(tmp_path / "a.png")])
    assert made.exit_code == 0, made.output
    record = read_provenance((tmp_path / "a.png").read_bytes())
    shown = CliRunner().invoke(app, ["provenance", str(tmp_path / "a.png")])
    said = " ".join(shown.stdout.split())
    assert shown.exit_code == 0, shown.output
    assert record["base_model_hash"][:16] in said and "strength 0.5" in said and "7 / 2 /" in said, said
    assert "a portrait, [blurry] [/]" in said  # a prompt's brackets as written, not read as markup
    assert "UNTRAINED" in said  # no --adapter on tiny: the seeded adapter, said where an auditor looks
    as_json = CliRunner().invoke(app, ["provenance", "--json", str(tmp_path / "a.png")])
    assert json.loads(as_json.stdout) == {str(tmp_path / "a.png"): record}
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mixed = CliRunner().invoke(app, ["provenance", str(tmp_path / "plain.png"), str(tmp_path / "notes.txt"),
                                     str(tmp_path / "missing.png"), str(tmp_path / "a.png")])
    errors = " ".join(mixed.stderr.split())
    assert mixed.exit_code == 2 and "plain.png: no ray_faceid record" in errors, mixed.output
    assert "notes.txt: not an image" in errors and "missing.png: no such file" in errors
    Image.open(tmp_path / "a.png").convert("RGB").save(tmp_path / "a.jpg")
    converted = CliRunner().invoke(app, ["provenance", str(tmp_path / "a.jpg"), str(tmp_path)])
    errors = " ".join(converted.stderr.split())
    assert converted.exit_code == 2 and "a.jpg: a JPEG" in errors and f"{tmp_path}: a folder" in errors, errors
    assert "Error" not in errors  # was Python's class names: AttributeError, IsADirectoryError
    png = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])  # a half-written copy
    damaged = CliRunner().invoke(app, ["provenance", str(tmp_path / "cut.png"), str(tmp_path / "a.png")])
    assert damaged.exit_code == 2 and "cut.png: a damaged PNG" in " ".join(damaged.stderr.split()), damaged.output
    assert record["base_model_hash"][:16] in damaged.stdout
    assert record["base_model_hash"][:16] in mixed.stdout  # the readable one still shown


def test_the_step_cache_reads_as_a_sentence():
    from rich.console import Console

    from ray_faceid.cli.provenance import summary_table

    console = Console(width=200, record=True)
    console.print(summary_table("x.png", {"steps": 28, "step_cache": {"threshold": 0.08, "steps_reused": 9}}))
    assert "threshold 0.08, 9 of 28 steps reused" in console.export_text()


def test_a_rendered_image_names_its_catalog_row(tmp_path):
    """An auditor holding one PNG of a catalog run finds the row that made it."""
    from ray_faceid.config import RenderConfig
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_rows import Renderer

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"id": "beach-7", "prompt": "a beach", "seed": 2}) + "\n")
    renderer = Renderer(RenderConfig(steps=2, size="32x32"), "tiny", None, str(tmp_path / "registry"), "default",
                        str(tmp_path / "out"))
    (made,) = renderer.render_batch(read_catalog(str(catalog)), [0])
    record = read_provenance(open(made["output_uri"], "rb").read())
    assert record["render_row"] == "beach-7" and json.loads(made["provenance"]) == record
    shown = CliRunner().invoke(app, ["provenance", made["output_uri"]])
    assert "render row beach-7" in " ".join(shown.stdout.split()), shown.output
