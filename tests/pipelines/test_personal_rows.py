"""People's own adapters are per-row inputs of a UNet batch, never changes to the shared weights:
requests of different people, with and without their own adapter, batched together or run inside
another job's pause between steps (deployments/turns.py), each give exactly the image they give alone."""
import threading
import time

import numpy as np
import pytest
import torch

from deployments.turns import PipelineTurns
from ray_faceid.pipelines.generate import GenerationItem, IdentityCondition

SIZE, STEPS = 16, 3


@pytest.fixture(scope="module")
def pipe(spec128, perturbed_pipeline):
    return perturbed_pipeline(spec128)


@pytest.fixture(scope="module")
def people(pipe):
    rng = np.random.default_rng(0)
    face = rng.normal(size=(1, 128)).astype(np.float32)
    out = {}
    for i, name in enumerate(("ann", "bob")):
        g = torch.Generator().manual_seed(i + 1)
        delta = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in pipe.adapter.processors.state_dict().items()}
        out[name] = IdentityCondition(name, face, personal=(f"v{i}", delta))
    out["cy"] = IdentityCondition("cy", face)  # the same face on the shared adapter
    return out


def pixels(result, k=0):
    return np.asarray(result.images[k]).astype(int)


def alone(pipe, person, seed=7):
    return pixels(pipe.generate_items([GenerationItem("a photo", [person], seed=seed)], STEPS, 5.0, SIZE, SIZE))


def test_people_with_and_without_their_own_adapter_batch_together(pipe, people):
    shared_before = {k: v.clone() for k, v in pipe.adapter.processors.state_dict().items()}
    solo = {name: alone(pipe, person) for name, person in people.items()}
    assert len({im.tobytes() for im in solo.values()}) == 3  # each adapter makes its own image of the face
    batched = pipe.generate_items([GenerationItem("a photo", [people[n]], seed=7) for n in ("ann", "cy", "bob")],
                                  STEPS, 5.0, SIZE, SIZE)
    for k, name in enumerate(("ann", "cy", "bob")):
        assert np.abs(pixels(batched, k) - solo[name]).max() <= 1, name
        own = batched.provenance[k]["identities"][0]["personal_adapter"]
        assert own == (people[name].personal[0] if people[name].personal else None)
    after = pipe.adapter.processors.state_dict()
    assert all(torch.equal(shared_before[k], after[k]) for k in after)  # nothing changed in place


def test_a_small_job_inside_a_large_jobs_pause_runs_on_its_own_weights(pipe, people):
    """The large job (ann, her own adapter) lends the pipeline after its first step; the small job
    (cy, shared adapter) runs to the end inside that pause. Neither sees the other's weights."""
    solo_ann, solo_cy = alone(pipe, people["ann"]), alone(pipe, people["cy"])
    turns, results, lent = PipelineTurns(), {}, threading.Event()

    def small_job():
        borrowed = turns.acquire(small=True)
        try:
            pipe.on_step = None
            results["cy"] = alone(pipe, people["cy"])
        finally:
            turns.release(borrowed)

    def pause(step, total):
        if step == 1:
            worker = threading.Thread(target=small_job)
            worker.start()
            deadline = time.monotonic() + 10
            while not turns._small_waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            turns.between_steps()  # the small job runs now, to its end
            worker.join(10)
            lent.set()

    borrowed = turns.acquire(small=False)
    try:
        pipe.on_step = pause
        results["ann"] = alone(pipe, people["ann"])
    finally:
        pipe.on_step = None
        turns.release(borrowed)
    assert lent.is_set() and turns.lent == 1
    assert np.abs(results["cy"] - solo_cy).max() <= 1
    assert np.abs(results["ann"] - solo_ann).max() <= 1


def test_more_people_than_bank_slots_are_split_into_batches(pipe, people):
    from ray_faceid.identity.personal_bank import BANK_SLOTS

    face = people["cy"].embeddings
    many = []
    for i in range(BANK_SLOTS + 2):
        delta = {k: torch.full_like(v, 0.001 * i) for k, v in pipe.adapter.processors.state_dict().items()}
        many.append(GenerationItem("a photo", [IdentityCondition(f"p{i}", face, personal=(f"v{i}", delta))], seed=1))
    batches = pipe.unet_batches(many)
    assert [len(b) for b in batches] == [BANK_SLOTS, 2]


def test_an_erased_persons_weights_leave_the_bank_and_are_never_loaded_again(pipe, people, spec128):
    from ray_faceid.errors import Erased

    eve = IdentityCondition("eve", people["cy"].embeddings, personal=("v_eve", {
        k: torch.full_like(v, 0.01) for k, v in pipe.adapter.processors.state_dict().items()}))
    version = eve.personal[0]
    alone(pipe, eve)  # resident now
    bank = pipe.personal_bank
    slot = bank._resident[version]
    assert any(bank.stack(n)[slot].abs().sum() > 0 for n in bank.names)
    pipe.forget_personal(version)
    assert all(bank.stack(n)[slot].abs().sum() == 0 for n in bank.names) and version not in bank._resident
    with pytest.raises(Erased):  # a request of theirs still running stops, typed
        alone(pipe, eve)


def test_a_person_erased_then_enrolled_again_is_served_their_same_adapter_bytes(pipe, spec128, tmp_path):
    """Erasure refuses an identity's adapter, not its bytes: re-consented and personalised again to
    the very same weights (a new identity), the person is served by a pipeline that saw the erasure."""
    from ray_faceid.erasure import erase_identity
    from ray_faceid.errors import Erased
    from ray_faceid.identity.personalization import delta_bytes, load_personal
    from ray_faceid.registry import Registry

    registry = Registry(str(tmp_path))
    face = np.random.default_rng(3).normal(size=(1, 128)).astype(np.float32)
    weights = delta_bytes({k: torch.full_like(v, 0.02) for k, v in pipe.adapter.processors.state_dict().items()})

    def enrolled(**consent) -> tuple[str, IdentityCondition]:
        meta = registry.create("t", "dee", "form-1", face, np.ones(1, np.float32), spec128,
                               [np.zeros((8, 8, 3), np.uint8)], [], **consent)
        registry.add_adapter("t", meta["id"], weights, {"base_adapter": "shared"})
        return meta["id"], IdentityCondition("dee", face, personal=load_personal(registry, "t", meta["id"], "shared", None))

    first, before = enrolled()
    alone(pipe, before)
    erase_identity(registry, "t", first)
    pipe.forget_personal(before.personal[0])  # what the Serve replica's erasure sweep does
    with pytest.raises(Erased):
        alone(pipe, before)
    _, again = enrolled(reconsent="form-2")
    assert np.array_equal(alone(pipe, again), alone(pipe, again))  # served, not refused as the erased one


def test_large_adapters_get_fewer_resident_slots(pipe, monkeypatch):
    from ray_faceid.identity import personal_bank

    per_person = sum(p.numel() * p.element_size() for p in pipe.adapter.processors.parameters())
    monkeypatch.setattr(personal_bank, "BANK_BYTES", 3 * per_person)
    assert personal_bank.PersonalBank(pipe.adapter).slots == 2  # and slot 0, the shared weights


def test_a_pause_in_a_split_batch_keeps_each_jobs_weights_and_callback(pipe, people):
    """One bank slot: the large job (ann and bob, each with an adapter of their own) runs as two UNet
    batches; in its first pause a small job of dan (his own adapter, so ann's is evicted) runs to its
    end. Every image is the one made alone, and the large job's own callback sees all its steps."""
    from ray_faceid.identity.personal_bank import PersonalBank

    g = torch.Generator().manual_seed(9)
    dan = IdentityCondition("dan", people["cy"].embeddings, personal=("v9", {
        k: 0.2 * torch.randn(v.shape, generator=g) for k, v in pipe.adapter.processors.state_dict().items()}))
    shared_bank = pipe.personal_bank
    pipe.personal_bank = PersonalBank(pipe.adapter, slots=1)
    try:
        solo = {p.name: alone(pipe, p) for p in (people["ann"], people["bob"], dan)}
        turns, seen, results = PipelineTurns(), [], {}

        def small_job():
            borrowed = turns.acquire(small=True)
            try:
                pipe.on_step = lambda step, total: None  # the small job's own callback
                results["dan"] = alone(pipe, dan)
            finally:
                turns.release(borrowed)

        def large_callback(step, total):
            seen.append(step)
            if step == 1 and not results:
                worker = threading.Thread(target=small_job)
                worker.start()
                deadline = time.monotonic() + 10
                while not turns._small_waiting and time.monotonic() < deadline:
                    time.sleep(0.01)
                turns.between_steps()
                worker.join(10)

        borrowed = turns.acquire(small=False)
        try:
            pipe.on_step = large_callback
            large = pipe.generate_items([GenerationItem("a photo", [people[n]], seed=7) for n in ("ann", "bob")],
                                        STEPS, 5.0, SIZE, SIZE)
        finally:
            pipe.on_step = None
            turns.release(borrowed)
        assert len(pipe.unet_batches([GenerationItem("a photo", [people[n]]) for n in ("ann", "bob")])) == 2
        assert seen == list(range(STEPS + 1)) * 2  # its own callback in both batches, after the pause too
        assert np.abs(results["dan"] - solo["dan"]).max() <= 1
        for k, name in enumerate(("ann", "bob")):
            assert np.abs(pixels(large, k) - solo[name]).max() <= 1, name
    finally:
        pipe.personal_bank = shared_bank
