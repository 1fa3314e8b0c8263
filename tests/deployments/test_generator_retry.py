"""The service asks another replica once when a Generator replica dies mid-request (the seed fixes
the image), and answers 503 with Retry-After when the queue is full or two replicas died."""
import asyncio

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.service import Busy, FaceService
from ray_faceid.config import ServeConfig, ServeLimits


class FlakyGenerator:
    """A handle whose calls fail with the given errors first, then answer."""

    def __init__(self, *failures):
        self.failures, self.calls = list(failures), 0
        self.generate = self

    def remote(self, payload):
        self.calls += 1

        async def answer():
            if self.failures:
                raise self.failures.pop(0)
            return {"png": ["image"], "seed": payload["seed"]}

        return answer()


@pytest.fixture
def service():
    made = FaceService.__new__(FaceService)  # only the retry logic: no Serve, no replicas
    made.config = ServeConfig(limits=ServeLimits(retry_after_s=9, generator_max_queued=8))
    return made


def test_a_replica_that_dies_mid_request_is_retried_once(service):
    handle = FlakyGenerator(RayActorError())
    assert asyncio.run(service._generate_once(handle, {"seed": 3})) == {"png": ["image"], "seed": 3}
    assert handle.calls == 2


def test_two_dead_replicas_or_a_full_queue_are_a_503_with_retry_after(service):
    with pytest.raises(Busy, match="failed twice") as twice:
        asyncio.run(service._generate_once(FlakyGenerator(RayActorError(), RayActorError()), {"seed": 3}))
    assert twice.value.status == 503 and twice.value.retry_after == 9
    handle = FlakyGenerator(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    with pytest.raises(Busy, match="queue of 8 is full") as full:
        asyncio.run(service._generate_once(handle, {"seed": 3}))
    assert full.value.retry_after == 9 and handle.calls == 1  # a full queue is not retried at once
