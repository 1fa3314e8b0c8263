import pytest
from pydantic import ValidationError

from ray_faceid import config as cfg


def all_settings_models():
    return [m for m in vars(cfg).values() if isinstance(m, type) and issubclass(m, cfg.Settings) and m is not cfg.Settings]


@pytest.mark.parametrize("model", all_settings_models(), ids=lambda m: m.__name__)
def test_every_field_is_described(model):
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert not missing, f"{model.__name__} fields without a description: {missing}"


def test_hash_follows_fields_that_change_artifacts():
    base = cfg.FaceConfig()
    assert base.compute_hash() == cfg.FaceConfig().compute_hash()
    assert cfg.FaceConfig(landmarks="dlib68").compute_hash() != base.compute_hash()
    assert cfg.FaceConfig(detection=cfg.DetectionConfig(dlib_model="cnn")).compute_hash() != base.compute_hash()
    # limits, thresholds and policies do not change what an embedding is
    assert cfg.FaceConfig(verify_threshold=0.5).compute_hash() == base.compute_hash()
    assert cfg.FaceConfig(decode=cfg.DecodeConfig(max_bytes=10)).compute_hash() == base.compute_hash()
    assert cfg.FaceConfig(detection=cfg.DetectionConfig(policy="all")).compute_hash() == base.compute_hash()


def test_unknown_and_out_of_range_settings_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        cfg.FaceConfig(bakend="dlib")
    with pytest.raises(ValidationError):
        cfg.DetectionConfig(working_max_side=10)
    with pytest.raises(ValidationError):
        cfg.FaceConfig(backend="opencv")
