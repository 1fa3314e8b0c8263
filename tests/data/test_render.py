"""The catalog render job on the session's local Ray cluster, and `eval` over its output."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_faceid.config import RenderConfig
from ray_faceid.data.render import run_render
from ray_faceid.enrollment import enroll_dataset
from ray_faceid.identity.personalization import delta_bytes
from ray_faceid.registry import Registry

CONFIG = RenderConfig(steps=2, size="32x32", workers=1, batch_size=4)


@pytest.fixture(scope="module")
def people(small_dataset, tmp_path_factory):
    registry = Registry(str(tmp_path_factory.mktemp("render_registry")))
    return registry, enroll_dataset(registry, "default", small_dataset, consent="dataset licence (test)")["enrolled"]


@pytest.fixture(scope="module")
def catalog(people, tmp_path_factory):
    registry, ids = people
    folder = tmp_path_factory.mktemp("catalog")
    Image.fromarray(registry.references("default", ids["amy"])[0]).resize((64, 64)).save(folder / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:32]).save(folder / "small_mask.png")
    rows = [
        {"id": "amy-beach", "identities": [ids["amy"]], "prompt": "a photo of a person at the beach", "seed": 1},
        {"id": "amy-penny", "identities": [{"id": ids["amy"], "region": [0, 0, 0.5, 1]}, ids["penny"]],
         "prompt": "two people", "seed": 2},
        # Paths relative to the catalog's folder, not to where the job or its actors run.
        {"id": "amy-inpaint", "identities": [ids["amy"]], "prompt": "a person", "image": "photo.png",
         "mask": "mask.png", "seed": 3},
        {"id": "sheldon-smile", "identities": [ids["sheldon"]], "prompt": "a person", "expression": "smile", "seed": 4},
        {"id": "stranger", "identities": ["id_doesnotexistdoesnotexist"], "prompt": "a person"},
        {"id": "bad-mask", "identities": [ids["amy"]], "prompt": "a person", "image": str(folder / "photo.png"),
         "mask": str(folder / "small_mask.png")},
        {"id": "no-prompt", "identities": [ids["amy"]]},
    ]
    path = folder / "catalog.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def rendered(catalog, people, tmp_path_factory):
    registry, _ = people
    out = tmp_path_factory.mktemp("render_out")
    return out, run_render(str(catalog), str(out), "tiny", registry.store, config=CONFIG)


def manifest(out: Path) -> dict:
    return {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_every_row_is_rendered_or_recorded_with_its_error(rendered):
    out, summary = rendered
    rows = manifest(out)
    assert summary["rows"] == 7 and summary["rendered"] == 4 and summary["failed"] == 3
    assert "not found" in rows["stranger"]["error"]
    assert "mask is 64x32, the image is 64x64" in rows["bad-mask"]["error"]
    assert "prompt" in rows["no-prompt"]["error"]
    for row_id in ("amy-beach", "amy-penny", "amy-inpaint", "sheldon-smile"):
        row = rows[row_id]
        assert row["status"] == "ok" and Path(row["output_uri"]).is_file()
        provenance = json.loads(row["provenance"])
        assert provenance["ai_generated"] and provenance["seed"] == row["seed"]
        assert len(json.loads(row["scores"])["identities"]) == len(provenance["identities"])
    assert Image.open(rows["amy-inpaint"]["output_uri"]).size == (64, 64)
    assert Image.open(rows["amy-beach"]["output_uri"]).size == (32, 32)


def test_rendering_is_deterministic(rendered, catalog, people, tmp_path):
    out, _ = rendered
    registry, _ = people
    run_render(str(catalog), str(tmp_path), "tiny", registry.store, config=CONFIG)
    first, second = manifest(out), manifest(tmp_path)
    for row_id in ("amy-beach", "amy-penny", "amy-inpaint"):
        assert first[row_id]["key"] == second[row_id]["key"]
        assert Path(first[row_id]["output_uri"]).read_bytes() == Path(second[row_id]["output_uri"]).read_bytes()


def test_rerun_renders_only_rows_whose_inputs_changed(rendered, catalog, people):
    out, _ = rendered
    registry, ids = people
    again = run_render(str(catalog), str(out), "tiny", registry.store, config=CONFIG)
    assert again["rendered"] == 0 and again["cached"] == 4 and again["failed"] == 3
    # A new per-identity adapter for amy: her single-identity rows change, the two-person row does not.
    from ray_faceid.data.render_rows import Renderer

    renderer = Renderer(CONFIG, "tiny", None, registry.store, "default", str(out))
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in renderer.pipeline.adapter.processors.state_dict().items()}
    import torch

    registry.add_adapter("default", ids["amy"], delta_bytes({k: torch.from_numpy(v).half() for k, v in delta.items()}),
                         {"kind": "personal", "base_adapter": renderer.adapter_hash, "settings": "test"})
    before = manifest(out)
    changed = run_render(str(catalog), str(out), "tiny", registry.store, config=CONFIG)
    after = manifest(out)
    assert changed["rendered"] == 2 and changed["cached"] == 2
    assert {r for r in after if after[r]["status"] == "ok" and not after[r]["cached"]} == {"amy-beach", "amy-inpaint"}
    assert after["amy-beach"]["key"] != before["amy-beach"]["key"]
    assert json.loads(after["amy-beach"]["provenance"])["identities"][0]["personal_adapter"].startswith("v_")


def test_eval_reports_both_encoders_and_writes_a_contact_sheet(rendered, people, tmp_path, tiny_arcface_onnx):
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    out, _ = rendered
    registry, _ = people
    onnx_path = tiny_arcface_onnx
    result = CliRunner().invoke(app, ["eval", str(out), "--registry", registry.store, "--second-encoder-onnx",
                                      str(onnx_path), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["encoders"]) == {"conditioning", "second"}
    for metrics in report["encoders"].values():
        assert metrics["images"] == 4 and metrics["multi_identity_images"] == 1
        assert 0 <= metrics["detection_rate"] <= 1
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert {r["id"] for r in rows} == {"amy-beach", "amy-penny", "amy-inpaint", "sheldon-smile"}
    sheet = Image.open(tmp_path / "contact_sheet.png")
    # two reference columns + the output, one row per image; under each output its id and a line per encoder
    assert sheet.size == (3 * 160, 4 * (160 + 3 * 15 + 4))


def test_batched_unet_rendering_gives_the_same_records_and_near_identical_images(rendered, catalog, people, tmp_path):
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_rows import Renderer

    out, _ = rendered
    registry, _ = people
    texts = read_catalog(str(catalog))
    batched = Renderer(CONFIG.model_copy(update={"unet_batch": 4}), "tiny", None, registry.store, "default", str(tmp_path),
                       catalog=str(catalog))
    records = {r["id"]: r for r in batched.render_batch(texts, list(range(len(texts))))}
    single = manifest(out)
    assert {k: r["status"] for k, r in records.items()} == {k: r["status"] for k, r in single.items()}
    for row_id in ("amy-penny", "sheldon-smile"):  # rows whose adapter weights did not change meanwhile
        a = np.asarray(Image.open(records[row_id]["output_uri"])).astype(int)
        b = np.asarray(Image.open(single[row_id]["output_uri"])).astype(int)
        assert np.abs(a - b).max() <= 2


def test_render_on_the_compiled_engine_keeps_one_engine_for_the_job(rendered, catalog, people, tmp_path):
    """`--backend torch.compile`: the same records and images (within 1/255) as eager, one compiled
    shape per (size, identity count) for every row of the job, none added by a second pass."""
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render import people_counts
    from ray_faceid.data.render_rows import Renderer

    out, _ = rendered
    registry, _ = people
    wanted = ("amy-beach", "amy-penny", "sheldon-smile", "stranger")
    texts = [t for t in read_catalog(str(catalog)) if any(f'"{w}"' in t for w in wanted)]
    counts = people_counts(texts)
    assert counts == (1, 2)  # the rows name one person or two (a broken row or a prompt alone: no count)
    assert people_counts(["not json", '{"prompt": "a beach"}', '{"identities": "ann"}']) == (1,)
    # 16x16: the smallest size (traced with the suite's torch.compile backend: tests/conftest.py).
    config = CONFIG.model_copy(update={"size": "16x16"})
    renderers = {backend: Renderer(config.model_copy(update={"backend": backend}), "tiny", None, registry.store,
                                   "default", str(tmp_path / backend), people_counts=counts)
                 for backend in ("torch", "torch.compile")}
    # Warmed when the actor starts (from compile's artifacts where cached): the job's size, for one
    # person and for two, the shapes its rows then use (no other is compiled below).
    assert renderers["torch.compile"].warmed["buckets"] == 2 and renderers["torch"].warmed is None
    assert len(renderers["torch.compile"].pipeline.compiled_engine().slots) == 2
    odd = Renderer(config.model_copy(update={"backend": "torch.compile", "size": "15x15"}), "tiny", None, registry.store,
                   "default", str(tmp_path / "odd"))  # a size the model cannot make: the actor starts, each row says so
    assert odd.warmed is None
    records = {backend: {r["id"]: r for r in renderer.render_batch(texts, list(range(len(texts))))}
               for backend, renderer in renderers.items()}
    compiled, eager = records["torch.compile"], records["torch"]
    single = manifest(out)
    assert {k: r["status"] for k, r in compiled.items()} == {k: single[k]["status"] for k in wanted}
    for row_id in ("amy-beach", "amy-penny", "sheldon-smile"):
        assert json.loads(compiled[row_id]["provenance"])["backend"] == "torch.compile"
        a = np.asarray(Image.open(compiled[row_id]["output_uri"])).astype(int)
        b = np.asarray(Image.open(eager[row_id]["output_uri"])).astype(int)
        assert a.shape == (16, 16, 3) and np.abs(a - b).max() <= 1, row_id
    engine = renderers["torch.compile"].pipeline.compiled_engine()
    assert len(engine.slots) == 2  # 16x16 with one identity, and with two: each warmed once for the job
    renderers["torch.compile"].render_batch(texts, list(range(len(texts))))
    assert len(engine.slots) == 2


def test_catalog_rows_ask_for_attribute_edits(people, tmp_path, default_encoder_flow):
    from ray_faceid.data.render_rows import Renderer

    registry, ids = people
    renderer = Renderer(CONFIG, "tiny", None, registry.store, "default", str(tmp_path), flow=default_encoder_flow)
    plain = {"id": "amy", "identities": [ids["amy"]], "prompt": "a person"}
    edited = renderer.render_text(json.dumps({**plain, "id": "amy-smiles", "edits": {"smile": 0.9}}), 0)
    own = renderer.render_text(json.dumps({**plain, "id": "amy-turns", "edits": {"smile": 0.9},
                                           "identities": [{"id": ids["amy"], "edits": {"yaw": 30}}]}), 1)
    bad = renderer.render_text(json.dumps({**plain, "id": "amy-beard", "edits": {"beard": 1}}), 2)
    unedited = renderer.render_text(json.dumps(plain), 3)
    assert edited["status"] == own["status"] == unedited["status"] == "ok"
    assert json.loads(edited["provenance"])["identities"][0]["edits"] == {"smile": 0.9}
    assert json.loads(own["provenance"])["identities"][0]["edits"] == {"yaw": 30.0}  # the identity's own win
    assert "edits" not in json.loads(unedited["provenance"])["identities"][0]
    assert bad["status"] == "error" and "valid: smile 0..1" in bad["error"]
    assert len({edited["key"], own["key"], unedited["key"]}) == 3
    # Without the flow the row's edits are refused; a row without edits keeps its key (and image).
    without = Renderer(CONFIG, "tiny", None, registry.store, "default", str(tmp_path / "no_flow"))
    refused = without.render_text(json.dumps({**plain, "id": "amy-smiles", "edits": {"smile": 0.9}}), 0)
    assert refused["status"] == "error" and "attribute flow" in refused["error"]
    assert without.render_text(json.dumps(plain), 3)["key"] == unedited["key"]


def test_catalog_rows_name_their_scheduler_and_are_denoised_apart(people, tmp_path):
    """A row's scheduler: rows of other schedulers never share a UNet batch (each image is the one it
    gets alone), a bad name is that row's error alone, a row without one keeps its key."""
    from ray_faceid.data.render_rows import Renderer

    registry, ids = people
    rows = [{"id": "euler-a", "identities": [ids["amy"]], "prompt": "a person", "seed": 5, "scheduler": "euler-a"},
            {"id": "own", "identities": [ids["amy"]], "prompt": "a person", "seed": 5},
            {"id": "karras", "identities": [ids["amy"]], "prompt": "a person", "seed": 5, "scheduler": "dpm++2m",
             "scheduler_config": {"use_karras_sigmas": True}},
            {"id": "nope", "identities": [ids["amy"]], "prompt": "a person", "scheduler": "nope"}]
    texts = [json.dumps(r) for r in rows]
    batched = Renderer(CONFIG.model_copy(update={"unet_batch": 4}), "tiny", None, registry.store, "default",
                       str(tmp_path / "batched"))
    together = {r["id"]: r for r in batched.render_batch(texts, list(range(len(texts))))}
    single = Renderer(CONFIG, "tiny", None, registry.store, "default", str(tmp_path / "single"))
    alone = {r["id"]: r for r in (single.render_text(t, i) for i, t in enumerate(texts))}
    assert together["nope"]["status"] == alone["nope"]["status"] == "error"
    assert "row nope: scheduler: no scheduler 'nope'" in together["nope"]["error"]
    for row_id, cls in (("euler-a", "EulerAncestralDiscreteScheduler"), ("own", "DDIMScheduler"),
                        ("karras", "DPMSolverMultistepScheduler")):
        assert json.loads(together[row_id]["provenance"])["scheduler"]["class"] == cls
        a, b = (np.asarray(Image.open(r[row_id]["output_uri"])).astype(int) for r in (together, alone))
        assert np.abs(a - b).max() <= 2, row_id
    images = {k: Image.open(together[k]["output_uri"]).tobytes() for k in ("euler-a", "own", "karras")}
    assert len(set(images.values())) == 3
    plain = {"id": "own", "identities": [ids["amy"]], "prompt": "a person", "seed": 5}
    from ray_faceid.data.catalog import CatalogRow

    assert "scheduler" not in CatalogRow.model_validate(plain).key_fields()  # keys made before schedulers stay


def test_render_exit_codes_say_whether_every_row_made_its_image(rendered, catalog, people, tmp_path):
    """Scripts trust the exit code: it used to be 0 even when every row failed."""
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    registry, _ = people
    out, _ = rendered
    runner = CliRunner()
    args = ["--registry", registry.store, "--steps", "2", "--size", "32x32", "--workers", "1"]
    some_failed = runner.invoke(app, ["render", str(catalog), str(out), *args])  # cached rows, 3 bad ones
    assert some_failed.exit_code == 3, some_failed.output
    assert "3 of 7 rows failed" in some_failed.stderr and "failed stranger: not_found" in some_failed.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n[1, 2]\n")
    unreadable = runner.invoke(app, ["render", str(broken), str(tmp_path / "out"), *args])
    assert unreadable.exit_code == 2 and "no row of" in unreadable.stderr
    nothing = runner.invoke(app, ["eval", str(tmp_path / "out"), "--registry", registry.store])
    assert nothing.exit_code == 2 and "no generated images to evaluate" in nothing.stderr  # was "images 0", exit 0
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(line for line in catalog.read_text().splitlines()
                              if json.loads(line)["id"] in ("amy-beach", "sheldon-smile")) + "\n")
    assert runner.invoke(app, ["render", str(good), str(out), *args]).exit_code == 0



def test_a_rerun_with_every_row_done_starts_no_cluster(people, tmp_path, monkeypatch):
    """Nothing to do is known from the inputs before Ray starts: the re-run takes seconds, not 20-30."""
    import time

    from ray_faceid.data import cluster

    registry, ids = people
    rows = [{"id": "amy", "identities": [ids["amy"]], "prompt": "a portrait", "seed": 1},
            {"id": "two", "identities": ["amy", "penny"], "prompt": "two people", "seed": 2}]  # ids or names
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Relative paths, as a user types them: the actors run where the cluster was started (before this chdir).
    cluster.init_ray(None)
    monkeypatch.chdir(tmp_path)
    first = run_render("catalog.jsonl", "out", "tiny", registry.store, config=CONFIG)
    assert first["rendered"] == 2 and (tmp_path / "out" / "manifest.parquet").is_file()
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
    class StartedRay(Exception):
        pass

    def init_ray(*args, **kwargs):
        raise StartedRay  # a run that starts its cluster: what follows is the render the other tests check

    monkeypatch.setattr(cluster, "init_ray", init_ray)
    began = time.perf_counter()
    again = run_render(str(catalog), str(tmp_path / "out"), "tiny", registry.store, config=CONFIG)
    assert time.perf_counter() - began < 20  # not the minutes a job takes, and no cluster started
    assert again["rendered"] == 0 and again["cached"] == 2 and again["failed"] == 0
    assert again["rows_per_s"] is None  # no rate for a run that rendered nothing (it said 0.0)
    with pytest.raises(StartedRay):  # another precision: other images (the rows' keys say it once resolved)
        run_render(str(catalog), str(tmp_path / "out"), "tiny", registry.store,
                   config=CONFIG.model_copy(update={"precision": "bf16"}))
    registry.update("default", ids["penny"], lambda meta: None)  # penny's record changed: look again
    with pytest.raises(StartedRay):
        run_render(str(catalog), str(tmp_path / "out"), "tiny", registry.store, config=CONFIG)


def test_eval_scores_with_sface_as_the_second_recogniser_by_default(rendered, people, tmp_path):
    from typer.testing import CliRunner

    from ray_faceid.cli import app
    from ray_faceid.face.backends.sface_encoder import sface_available

    if sface_available():
        pytest.skip(f"SFace not installed: {sface_available()}")
    out, _ = rendered
    registry, _ = people
    result = CliRunner().invoke(app, ["eval", str(out), "--registry", registry.store, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    encoders = report["encoders"]
    rows = manifest(out)  # as the module's earlier tests left it
    made = sum(r["status"] == "ok" for r in rows.values())
    assert made and encoders["second"]["spec"].startswith("sface/128/")
    assert encoders["second"]["images"] == encoders["conditioning"]["images"] == made
    assert report["render"] == {"failed_rows": len(rows) - made, "untrained_base": True}
    alone = CliRunner().invoke(app, ["eval", str(out), "--registry", registry.store, "--out", str(tmp_path / "one"),
                                     "--json", "--no-second"])
    assert set(json.loads(alone.stdout)["encoders"]) == {"conditioning"}
    table = CliRunner().invoke(app, ["eval", str(out), "--registry", registry.store, "--out", str(tmp_path / "t")])
    assert "second recogniser: SFace" in table.output and "untrained smoke-test base" in table.output
    failed_line = f"{len(rows) - made} catalog rows failed in the render and are not scored"
    assert (failed_line in table.output) == (len(rows) > made)


def test_a_person_erased_while_a_render_job_runs_is_not_rendered_again(tmp_path, sample_photos):
    """The renderer keeps each person it loaded for the job's rows: erased meanwhile, their later rows
    fail (Erased) and the renderer drops its copy; other people's rows go on."""
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.erasure import erase_identity
    from ray_faceid.face.analyzer import FaceAnalyzer

    registry = Registry(str(tmp_path / "registry"))
    analyzer = FaceAnalyzer(CONFIG.face)
    for name, photo in (("ann", "Tom_Hanks_54745.png"), ("bob", "t1.jpg")):
        face = analyzer.analyze(analyzer.load(sample_photos[photo]))[0]
        registry.create("default", name, f"form-{name}", face.embedding[None], np.ones(1, np.float32), analyzer.spec,
                        [np.zeros((256, 256, 3), np.uint8)], [])
    renderer = Renderer(CONFIG, "tiny", None, registry.store, "default", str(tmp_path / "out"))
    row = {"prompt": "a portrait", "seed": 1}
    first = renderer.render_batch([json.dumps({**row, "id": "ann-1", "identities": ["ann"]})], [0])[0]
    assert first["status"] == "ok", first
    erase_identity(registry, "default", registry.resolve("default", "ann"))
    later = renderer.render_batch([json.dumps({**row, "id": "ann-2", "identities": ["ann"]}),
                                   json.dumps({**row, "id": "bob-1", "identities": ["bob"]})], [1, 2])
    assert later[0]["status"] == "error" and "erased" in later[0]["error"], later[0]
    assert later[1]["status"] == "ok" and "ann" not in renderer.identities
