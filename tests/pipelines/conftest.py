import pytest

from ray_faceid.face.spec import EncoderSpec


@pytest.fixture(scope="session")
def tiny_base():
    from ray_faceid.pipelines.models import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def spec128():
    return EncoderSpec(name="dlib_resnet", dim=128, version="test", license="-", metric="euclidean", threshold=0.6)
