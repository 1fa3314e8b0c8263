"""Operations configs validate against the schemas Ray itself ships."""
import json
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_cluster_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((files("ray.autoscaler") / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no work
    assert {"gpu_worker", "cpu_worker"} <= set(types) and types["gpu_worker"]["min_workers"] == 0
    broken = dict(config, idle_timeout_minutes="ten")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_serve_yaml_matches_rays_serve_schema_and_builds(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((ROOT / "deployments" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(data)
    from deployments.app import build_app
    from ray_faceid.errors import BadInput

    args = data["applications"][0]["args"]
    monkeypatch.delenv("RAY_FACEID_API_TOKENS", raising=False)
    with pytest.raises(BadInput, match="never runs open"):
        build_app(args)
    monkeypatch.setenv("RAY_FACEID_API_TOKENS", "ops:ops-token-0123456789abcdef")
    app = build_app(args)
    assert type(app).__name__ == "Application"
    with pytest.raises(Exception, match="extra"):
        build_app({**args, "modle": "typo"})
