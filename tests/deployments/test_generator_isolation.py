"""One request's damaged record fails that request alone: the Generator's batch preparation, with a
tenant's corrupt embeddings.npz next to another tenant's healthy request (no Serve needed: the
group runner is plain async code)."""
import asyncio
import threading

import numpy as np

from ray_faceid import storage
from ray_faceid.config import ServeConfig
from ray_faceid.face.analyzer import FaceAnalyzer
from ray_faceid.registry import Registry


def enroll(registry, tenant, name):
    rng = np.random.default_rng(len(name))
    spec = FaceAnalyzer().spec
    return registry.create(tenant, name, "consent-1", rng.normal(size=(1, spec.dim)).astype(np.float32),
                           np.ones(1, np.float32), spec, [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)], [])["id"]


def request(tenant, identity, seed=1):
    return {"kind": "generate", "tenant": tenant, "identities": [{"id": identity}], "prompt": "a portrait",
            "negative_prompt": "", "seed": seed, "num_images": 1, "steps": 2, "guidance": 5.0, "width": 32,
            "height": 32, "cancelled": threading.Event()}


def test_a_damaged_record_of_one_tenant_fails_only_that_tenants_request(tmp_path):
    from deployments.generator import Generator

    registry = Registry(str(tmp_path / "registry"))
    healthy, damaged = enroll(registry, "acme", "ann"), enroll(registry, "other", "bob")
    storage.write_bytes(storage.join(registry._dir("other", damaged), "embeddings.npz"), b"PK\x03\x04 truncated")
    config = ServeConfig(registry=registry.store, api_tokens={"acme": "acme-token-0123456789abcdef"})
    generator = Generator(config.model_dump_json())
    generator.load_identity = generator._load_identity  # Serve's multiplexing LRU needs a replica context
    good, bad = asyncio.run(generator._generate_group([request("acme", healthy), request("other", damaged)]))
    assert len(good["png"]) == 1 and "error" not in good
    assert bad["status"] == 502 and bad["error"] == "storage_error" and "re-enroll" in bad["message"]
