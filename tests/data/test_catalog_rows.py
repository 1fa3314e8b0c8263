"""What a catalog row may ask for, checked row by row, and an inpaint row's own feather."""
import json

import numpy as np
import pytest
from PIL import Image

from ray_faceid.config import RenderConfig
from ray_faceid.data.catalog import parse_row
from ray_faceid.errors import BadInput
from tests.pipelines.test_flux_identity import files  # noqa: F401 - a fixture: tiny-flux

CONFIG = RenderConfig(steps=2, size="32x32", workers=1, batch_size=4)
INPAINT = {"id": "r", "prompt": "a wall", "image": "photo.png", "mask": "mask.png"}


@pytest.mark.parametrize("row, said", [
    ({**INPAINT, "identities": ["amy", "bob"]}, "an inpaint row takes one identity at most"),
    ({"id": "r", "prompt": "x", "feather": 2}, "feather: for inpaint rows (image and mask)"),
    ({"id": "r", "prompt": "x", "identity_start": 2}, "identity_start: the row names nobody"),
    ({"id": "r", "prompt": "x", "image": "photo.png"}, "an inpaint row needs both image and mask"),
])
def test_rows_asking_for_what_they_cannot_have_are_refused_in_plain_words(row, said):
    with pytest.raises(BadInput) as refused:
        parse_row(json.dumps(row), 0)
    assert said in refused.value.message and "Value error" not in refused.value.message


def test_a_person_is_named_by_id_or_name_as_in_an_api_request():
    by_name = parse_row(json.dumps({"id": "r", "prompt": "x", "identities": [{"name": "ann", "scale": 0.5}]}), 0)
    by_id = parse_row(json.dumps({"id": "r", "prompt": "x", "identities": [{"id": "ann", "scale": 0.5}]}), 0)
    assert by_name.key_fields() == by_id.key_fields()  # the registry resolves either
    with pytest.raises(BadInput, match="id or name, not both"):
        parse_row(json.dumps({"id": "r", "prompt": "x", "identities": [{"id": "a", "name": "ann"}]}), 0)


def test_an_inpaint_row_is_keyed_by_the_feather_it_renders_with_and_a_generate_row_by_none(tmp_path):
    """The job's --feather re-renders the inpaint rows that take it, not every row; a row's own
    feather keys it whatever the job's; `true_cfg: 1` is a row without it."""
    from ray_faceid.data.render_rows import Renderer

    def keys(job_feather: float) -> dict:
        renderer = Renderer(CONFIG.model_copy(update={"feather": job_feather}), "tiny", None,
                            str(tmp_path / "registry"), "default", str(tmp_path / "out"))
        rows = {"generate": {"id": "g", "prompt": "x"}, "inpaint": INPAINT, "own": {**INPAINT, "feather": 2},
                "cfg1": {"id": "g", "prompt": "x", "true_cfg": 1}}
        return {k: renderer.key(parse_row(json.dumps(row), 0), ["photo", "mask"]) for k, row in rows.items()}

    four, eight, two = keys(4.0), keys(8.0), keys(2.0)
    assert four["generate"] == eight["generate"] == four["cfg1"]
    assert four["inpaint"] != eight["inpaint"] and four["own"] == eight["own"] == two["inpaint"]


def test_an_inpaint_row_renders_without_a_person_and_with_its_own_feather(tmp_path):
    """A prompt alone repaints the mask (as a generate row renders a prompt alone); `feather: 0` is a
    hard edge where the job's 4 px blend."""
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_rows import Renderer

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((48, 48), np.uint8)
    mask[8:40, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({**INPAINT, "id": "soft"}) + "\n" + json.dumps({**INPAINT, "id": "hard", "feather": 0}))
    renderer = Renderer(CONFIG, "tiny", None, str(tmp_path / "registry"), "default", str(tmp_path / "out"),
                        catalog=str(catalog))
    soft, hard = renderer.render_batch(read_catalog(str(catalog)), [0, 1])
    assert soft["status"] == hard["status"] == "ok", (soft["error"], hard["error"])
    assert [json.loads(r["provenance"])["feather"] for r in (soft, hard)] == [4.0, 0.0]
    a, b = (np.asarray(Image.open(r["output_uri"])).astype(int) for r in (soft, hard))
    inside = mask > 0
    assert np.array_equal(a[~inside], b[~inside])  # the photo's own pixels outside the mask, either way
    assert np.abs(a[inside] - b[inside]).max() > 8  # the edge's 4 px blend, or none


def test_render_takes_the_jobs_feather_from_the_command_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ray_faceid.data.render as render_job
    from ray_faceid.cli import app

    asked = {}
    monkeypatch.setattr(render_job, "run_render", lambda *args, **kwargs: asked.update(config=args[5]) or {"rows": 0})
    CliRunner().invoke(app, ["render", "catalog.jsonl", str(tmp_path), "--feather", "9"])
    assert asked["config"].feather == 9.0


def test_a_flux_row_with_a_negative_prompt_renders_through_true_cfg(files, tmp_path):  # noqa: F811
    """`negative_prompt` with `true_cfg` on FLUX: the image generate makes with --negative-prompt and
    --true-cfg, alone or batched; a negative prompt without true CFG, true CFG without one, or true
    CFG on a UNet base is that row's error."""
    from ray_faceid.data.catalog import read_catalog
    from ray_faceid.data.render_flux import FluxRenderer
    from ray_faceid.data.render_rows import Renderer
    from ray_faceid.pipelines.flux import load_flux
    from ray_faceid.pipelines.flux_sampling import FluxGenerator

    rows = [{"id": "away", "prompt": "a beach", "negative_prompt": "people", "true_cfg": 2.5, "seed": 4},
            {"id": "away-too", "prompt": "a beach", "negative_prompt": "sand", "true_cfg": 2.5, "seed": 5},
            {"id": "plain", "prompt": "a beach", "seed": 4},
            {"id": "ignored", "prompt": "a beach", "negative_prompt": "people", "seed": 4},
            {"id": "nothing-to-avoid", "prompt": "a beach", "true_cfg": 2.5, "seed": 4}]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = read_catalog(str(catalog))
    generator = FluxGenerator(load_flux(str(files / "flux")))
    for batch in (1, 2):
        renderer = FluxRenderer(CONFIG.model_copy(update={"unet_batch": batch}), str(files / "flux"), None,
                                str(tmp_path / "registry"), "default", str(tmp_path / f"out{batch}"))
        made = {r["id"]: r for r in renderer.render_batch(texts, list(range(len(texts))))}
        assert [made[r["id"]]["status"] for r in rows] == ["ok"] * 3 + ["error"] * 2, made
        assert "true_cfg" in made["ignored"]["error"] and "negative_prompt" in made["nothing-to-avoid"]["error"]
        for row_id, negative, seed in (("away", "people", 4), ("away-too", "sand", 5)):
            want = generator.generate("a beach", [], seed, 2, None, 32, 32, negative_prompt=negative,
                                      true_cfg=2.5).images[0]
            got = np.asarray(Image.open(made[row_id]["output_uri"])).astype(int)
            assert np.abs(got - np.asarray(want).astype(int)).max() <= 1
            assert json.loads(made[row_id]["provenance"])["true_cfg"] == 2.5
        assert made["away"]["key"] != made["plain"]["key"]
    unet = Renderer(CONFIG, "tiny", None, str(tmp_path / "registry"), "default", str(tmp_path / "unet"))
    (refused,) = unet.render_batch(texts[:1], [0])
    assert refused["status"] == "error" and "true_cfg: for FLUX bases" in refused["error"]


@pytest.mark.parametrize("row, said", [
    ({"id": "r", "promt": "x"}, "promt: not a field of a row (did you mean prompt?)"),
    ({"id": "r", "prompt": "x", "identities": [{"id": "a", "scael": 1}]},
     "identities.0.scael: not a field of a person (did you mean scale?)"),
    ({"id": "r", "prompt": "x", "size": [64, 64]}, 'size: give it as text "WxH", e.g. "512x512"'),
    ({"id": "r", "prompt": "x", "identities": ["a", "b", "c", "d", "e"]}, "identities: at most 4 people"),
    ({"id": "r", "prompt": "x", "feather": 2}, "catalog row r: feather: for inpaint rows"),
])
def test_row_errors_say_what_to_write(row, said):
    with pytest.raises(BadInput) as refused:
        parse_row(json.dumps(row), 0)
    assert said in refused.value.message, refused.value.message
