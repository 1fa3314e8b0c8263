"""A resumed run must train on what it started with: base weights, training table, start adapter."""
import pytest

from ray_faceid.config import TrainConfig
from ray_faceid.errors import BadInput
from ray_faceid.pipelines.model_ref import resolve_model
from ray_faceid.pipelines.models import build_tiny, save_base
from ray_faceid.train.runs import prepare_run

START = {"base model": "aaaa", "dataset": "bbbb", "start adapter": None}


@pytest.mark.parametrize("changed", ["base model", "dataset", "start adapter"])
def test_a_resume_with_other_inputs_is_refused_naming_them(tmp_path, changed):
    prepare_run(str(tmp_path), "adapter", TrainConfig(), resume=False, inputs=START)
    with pytest.raises(BadInput, match=f"other inputs: {changed} \\("):
        prepare_run(str(tmp_path), "adapter", TrainConfig(), resume=True, inputs={**START, changed: "cccc"})
    prepare_run(str(tmp_path), "adapter", TrainConfig(), resume=True, inputs=START)  # the same: resumes


def test_a_base_is_fingerprinted_by_its_weights_not_its_path(tmp_path):
    save_base(build_tiny(seed=0), tmp_path / "a")
    save_base(build_tiny(seed=0), tmp_path / "copy")
    save_base(build_tiny(seed=1), tmp_path / "other")
    a, copy, other = (resolve_model(str(tmp_path / n)).fingerprint() for n in ("a", "copy", "other"))
    assert a == copy and a != other
