"""The documented deployment commands, run as an operator runs them: Ray's own `serve run` CLI
loads `deployments.app:build_app` with the YAML's `args` on the test cluster (serve.yaml, and the
application inside the KubeRay RayService, GPU-annotated generator included, on an SDXL-class base),
then the app answers /healthz, an enrollment and a generation over HTTP on loopback."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ops-token-0123456789abcdef"
# Where things live differs between the local file and a cluster's; the rest is the operator's as written.
LOCATIONS = {"model", "adapter", "registry", "backend"}


def serve_config(source: str) -> dict:
    data = yaml.safe_load((ROOT / "deployments" / source).read_text())
    if data.get("kind") == "RayService":
        data = yaml.safe_load(data["spec"]["serveConfigV2"])
    return data


def wait_healthy(url: str, seconds: float) -> None:
    """Until /healthz answers; a deployment Serve gave up on fails at once with Serve's own message."""
    from ray import serve

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        app = serve.status().applications.get("faceid")
        if app is not None and app.status == "DEPLOY_FAILED":
            pytest.fail(f"Serve could not deploy the application: {app.message[-1500:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url}/healthz never answered 200 within {seconds:.0f} s")


def serve_run(data: dict, config: Path, tokens: str, ray_cluster) -> None:
    """Write `data` to `config` and run Ray's own `serve run --non-blocking` on it against the test
    cluster; the tokens reach the application's builder through its runtime_env (Serve builds it there)."""
    data["applications"][0]["runtime_env"] = {"env_vars": {"RAY_FACEID_API_TOKENS": tokens}}
    config.write_text(yaml.safe_dump(data))
    serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    done = subprocess.run([serve_cli, "run", "--non-blocking", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


# The cluster's application also runs an SDXL-class base: one Serve app each (minutes on 2 cores).
@pytest.mark.parametrize("source, model", [("serve.yaml", None), ("kuberay.yaml", "tiny-sdxl")])
def test_serve_run_of_the_documented_config_serves(source, model, ray_cluster, tmp_path, loopback_port, sample_photos):
    from ray import serve

    local = serve_config("serve.yaml")["applications"][0]["args"]
    data = serve_config(source)
    port = loopback_port()
    data["http_options"] = {"host": "127.0.0.1", "port": port}
    args = data["applications"][0]["args"]
    for key in LOCATIONS:  # as the local file has it (absent there: the config's default)
        args.pop(key, None)
        if key in local:
            args[key] = local[key]
    args["registry"] = str(tmp_path / "registry")
    if model:  # an SDXL-class base behind the same application (its model is a location), served as a
        args["model"] = model  # few-step model is: the deployment's own steps, guidance and sampler
        args.update(steps=2, guidance=1.0, scheduler="lcm")
    try:
        serve_run(data, tmp_path / source, f"ops:{TOKEN}", ray_cluster)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 240)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            photo = sample_photos["Tom_Hanks_54745.png"].read_bytes()
            enrolled = client.post("/v1/identities", files=[("photos", ("hanks.png", photo, "image/png"))],
                                   data={"consent": "consent-form-42", "name": "hanks"})
            assert enrolled.status_code == 201, enrolled.text
            asked = {} if model else {"steps": 2}  # a request that names no steps, guidance or sampler
            made = client.post("/v1/generate", json={"prompt": "a portrait photo", "width": 64, "height": 64,
                                                     "identities": [{"id": enrolled.json()["id"]}], **asked})
            assert made.status_code == 200, made.text
            provenance = made.json()["images"][0]["provenance"]
            sampled = (provenance["steps"], provenance["guidance"], provenance["scheduler"]["class"])
            assert sampled == ((2, 1.0, "LCMScheduler") if model else (2, 5.0, "DDIMScheduler")), sampled
            # the person as enrolled: their id, and their name (the id sat under "name")
            assert provenance["identities"][0]["id"] == enrolled.json()["id"]
            assert provenance["identities"][0]["name"] == "hanks"
            assert provenance["base_family"] == ("sdxl" if model == "tiny-sdxl" else "sd1")
    finally:
        serve.shutdown()


def test_serve_run_of_a_bad_config_fails_once_in_one_line(ray_cluster, tmp_path, loopback_port):
    """A token under 16 characters: Serve's build fails once with ray_faceid's one line (it was
    retried four times, each an 85-line traceback), and the status says what to change."""
    from ray import serve

    data = serve_config("serve.yaml")
    data["http_options"] = {"host": "127.0.0.1", "port": loopback_port()}
    data["applications"][0]["args"]["registry"] = str(tmp_path / "registry")
    try:
        serve_run(data, tmp_path / "serve.yaml", "ops:short", ray_cluster)
        deadline, app = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            app = serve.status().applications.get("faceid")
            if app is not None and app.status == "DEPLOY_FAILED":
                break
            time.sleep(0.5)
        assert app is not None and app.status == "DEPLOY_FAILED", app
        message = app.message.strip()  # Serve's "Deploying app 'faceid' failed with exception:", then ours
        assert "Traceback" not in message and len(message.splitlines()) <= 2, message
        assert "token of >= 16 chars" in message.splitlines()[-1] and "'ops'" in message
    finally:
        serve.shutdown()
