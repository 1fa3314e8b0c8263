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
    with pytest.raises(BadInput, match="modle: Extra inputs are not permitted") as typo:  # one line, the key named
        build_app({**args, "modle": "typo"})
    assert "\n" not in str(typo.value)


def test_kuberay_rayservice_serves_the_same_application_as_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "deployments" / "kuberay.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    local = yaml.safe_load((ROOT / "deployments" / "serve.yaml").read_text())
    (app,), (local_app,) = serve_config["applications"], local["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in local_app.items() if k != "args"}
    # Only where things live, GPU placement and the GPU engine may differ from the local file.
    differing = {k for k in set(app["args"]) | set(local_app["args"]) if app["args"].get(k) != local_app["args"].get(k)}
    assert differing <= {"model", "adapter", "registry", "generator_gpus", "encoder_gpus", "backend"}
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == __import__("ray").__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1" and app["args"]["generator_gpus"] == 1
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1


def test_kuberay_rayjob_runs_a_real_cli_command():
    from typer.testing import CliRunner

    from ray_faceid.cli import app

    job = yaml.safe_load((ROOT / "deployments" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__
    command = job["spec"]["entrypoint"].split()
    assert command[0] == "ray-faceid"
    # The entry point's sub-command and flags exist (help parses them; nothing runs).
    result = CliRunner().invoke(app, [command[1], "--help"])
    assert result.exit_code == 0 and all(flag in result.stdout for flag in command if flag.startswith("--"))
