"""What the page says a deployment serves: names, never the server's paths (any signed-in tenant reads it)."""
from types import SimpleNamespace

from deployments.generator import served_line


def test_the_served_line_names_the_base_and_adapter_without_server_paths():
    published = {"kind": "IP-Adapter-FaceID", "variant": "FaceID", "file": "ip-adapter-faceid_sd15.bin",
                 "licence": "non-commercial research use"}
    pipeline = SimpleNamespace(base=SimpleNamespace(model_id="/srv/models/sd15/"), adapter_hash="ab" * 32,
                               adapter=SimpleNamespace(published=published, trained_steps=0))
    line = served_line(pipeline)
    assert line == ("Serving sd15 with IP-Adapter-FaceID (FaceID) from ip-adapter-faceid_sd15.bin; "
                    "licence: non-commercial research use.")
    pipeline.adapter = SimpleNamespace(published=None, trained_steps=1200)
    pipeline.base.model_id = "s3://bucket/models/sdxl"
    assert served_line(pipeline) == f"Serving sdxl with identity adapter {'ab' * 6}, 1200 steps trained."
    pipeline.adapter = None
    assert "/srv" not in served_line(pipeline) and "no identity adapter" in served_line(pipeline)
