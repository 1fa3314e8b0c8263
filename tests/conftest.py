"""Shared fixtures: the real photo set (skipped cleanly where absent) and one analyzer per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two pytest-xdist workers on two cores, each with torch's OpenMP pool of one thread per core, spin
# against each other: the identity and pipeline tests took 2.5x as long. Each worker gets its share
# of the cores (set before torch is imported; Ray workers and CLI subprocesses inherit it).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# The registry secret lives outside every store (ray_faceid/registry_secret.py): one for the whole
# session, set before Ray starts so its workers and the CLI subprocesses read the same one.
if not os.environ.get("RAY_FACEID_REGISTRY_SECRET_FILE"):
    import secrets
    import tempfile

    _secret = Path(tempfile.mkdtemp(prefix="ray_faceid_secret_")) / "registry-secret"
    _secret.write_text(secrets.token_urlsafe(48))
    os.environ["RAY_FACEID_REGISTRY_SECRET_FILE"] = str(_secret)

# torch.compile's code generation is minutes per graph on CPU. The tests of paths through the
# compiled engine (render, Serve, SDXL, published adapters) check our graph: buffers, buckets, live
# identity, no recompiles; they trace it with Dynamo's `eager` backend (the same Dynamo graph and
# guards, run as traced: no AOT pass, no kernels; `aot_eager` takes twice as long per trace). The
# tests marked by the `inductor` fixture compile with Inductor itself (AOT pass and kernels; once per
# session: one shared shape). Set before Ray starts so Serve replicas and CLI subprocesses inherit
# it; override to run all on Inductor.
os.environ.setdefault("RAY_FACEID_TORCH_COMPILE_BACKEND", "eager")


def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers, each handed whole modules (`--dist loadscope`,
    in this order: `--no-loadscope-reorder`, else xdist orders modules by their number of tests), so a
    module's fixtures are built once; the slowest modules go first, so neither worker is left with a
    long one at the end while the other waits."""
    def weight(item) -> int:
        return next((rank for rank, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=weight)  # stable: a module's tests keep their order


# Modules by how long they take (minutes each on 2 cores: Ray Train jobs, Serve apps, Inductor). Each
# worker starts with two (pytest-xdist), the first and third to one, the second and fourth to the
# other: the module that builds the session's `small_dataset` first, the other worker meanwhile on
# modules that do not wait for it.
SLOW_FIRST = ("tests/train/test_train_adapter.py", "tests/deployments/test_api.py", "tests/test_cli.py",
              "tests/engines/test_compiled_engine.py", "tests/train/test_personalize.py", "tests/data/test_render.py",
              "tests/engines/", "tests/deployments/test_web_page.py", "tests/deployments/test_serve_run.py",
              "tests/test_ray_job.py", "tests/train/", "tests/deployments/", "tests/face/test_dlib_resnet_torch.py",
              "tests/test_quiet.py", "tests/data/test_erasure.py", "tests/data/", "tests/pipelines/", "tests/identity/")


SHARED_FACES = Path(os.environ.get("RAY_FACEID_FACES", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"))


@pytest.fixture(scope="session")
def faces_root() -> Path:
    if not (SHARED_FACES / "pairs.csv").is_file():
        pytest.skip(f"real photo set not found at {SHARED_FACES} (set RAY_FACEID_FACES to its folder)")
    return SHARED_FACES


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, Path]:
    """insightface's bundled photos: t1.jpg (6 people) and Tom_Hanks_54745.png."""
    from ray_faceid.face.analyzer import sample_images

    found = {p.name: p for p in sample_images()}
    if "t1.jpg" not in found:
        pytest.skip("insightface sample photos not installed (pip install 'ray_faceid[insightface]')")
    return found


@pytest.fixture(scope="session")
def analyzer():
    from ray_faceid.config import DetectionConfig, FaceConfig
    from ray_faceid.face.analyzer import FaceAnalyzer

    return FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all")))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session: 2 CPUs and a fake GPU (so GPU-annotated
    deployments schedule on CPU machines), bound to loopback, in a temp dir of its own."""
    ray = pytest.importorskip("ray")
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }.items():
        os.environ[key] = value
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def inductor(monkeypatch):
    """This test compiles with Inductor, the backend that serves (and its subprocesses too)."""
    monkeypatch.setenv("RAY_FACEID_TORCH_COMPILE_BACKEND", "inductor")


@pytest.fixture(scope="session")
def tiny_base():
    from ray_faceid.pipelines.models import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def spec128():
    from ray_faceid.face.spec import EncoderSpec

    return EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)


@pytest.fixture(scope="session")
def small_dataset(ray_cluster, faces_root, tmp_path_factory) -> str:
    """An ingest output of three people (64 px crops) with identities and cross-training pairs,
    read-only for the tests. Made once per run: under pytest-xdist the first worker to need it
    ingests, under a file lock in the run's shared temp folder, and the others read the same one."""
    import shutil

    from filelock import FileLock

    from ray_faceid.config import DetectionConfig, FaceConfig, IngestConfig
    from ray_faceid.data.ingest import run_ingest
    from ray_faceid.data.pairs import build_pairs

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    src, dst, done = shared / "small_archive", shared / "small_dataset", shared / "small_dataset.done"
    with FileLock(str(shared / "small_dataset.lock")):
        if not done.exists():
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            for person in ("amy", "penny", "sheldon"):
                shutil.copytree(faces_root / person, src / person)
            config = IngestConfig(workers=2, batch_size=4, crop_size=64, num_gpus_per_worker=0,
                                  face=FaceConfig(detection=DetectionConfig(policy="all", cnn_fallback=False)))
            run_ingest(str(src), str(dst), config, labels="folders")
            build_pairs(str(dst))
            done.touch()
    return str(dst)


@pytest.fixture(scope="session")
def tiny_arcface_onnx(tmp_path_factory):
    """A small random ArcFace-shaped network (N x 3 x 112 x 112 -> N x 64), exported to ONNX."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 64),
    ).eval()
    path = tmp_path_factory.mktemp("arcface") / "tiny_arcface.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    return path


@pytest.fixture(scope="session")
def loopback_port():
    """A function giving a free TCP port on 127.0.0.1 (Serve tests listen on loopback only)."""
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return free


@pytest.fixture(scope="session")
def default_encoder_flow(tmp_path_factory) -> str:
    """A saved attribute flow for the default face stack's embeddings, away from its identity-map
    start (as a trained one is): edits through it change the tokens."""
    import torch

    from ray_faceid.face.analyzer import FaceAnalyzer
    from ray_faceid.identity.expression import EXPRESSION_KEYS
    from ray_faceid.identity.flow import AttributeFlow, save_flow

    spec = FaceAnalyzer().spec
    torch.manual_seed(0)
    flow = AttributeFlow(spec.dim, EXPRESSION_KEYS, couplings=2, hidden=32)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("flow")
    save_flow(str(folder), flow, spec.key())
    return str(folder)


@pytest.fixture(scope="session")
def perturbed_pipeline():
    """A function making a tiny-base pipeline whose identity projections differ from the text ones
    (an untrained adapter is close to a no-op), so identity changes the image."""
    def make(spec, backend: str = "torch", cache=None, device: str = "cpu", precision: str = "fp32"):
        import torch

        from ray_faceid.identity.adapter import IdentityAdapter
        from ray_faceid.pipelines.generate import IdentityPipeline
        from ray_faceid.pipelines.models import build_tiny

        base = build_tiny()
        torch.manual_seed(0)
        adapter = IdentityAdapter.for_unet(base.unet, spec)
        with torch.no_grad():
            for p in adapter.processors.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return IdentityPipeline(base, adapter, device=device, backend=backend, engine_cache=cache, precision=precision)

    return make
