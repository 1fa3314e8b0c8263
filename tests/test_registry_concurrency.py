"""The registry under concurrent writers (threads and processes): no resurrection, no lost record."""
import json
import multiprocessing
import threading
import time

import numpy as np
import pytest

from ray_faceid import storage
from ray_faceid.erasure import erase_identity
from ray_faceid.errors import BadInput, Conflict, Erased, ErasedPerson, NotFound
from ray_faceid.registry import Registry
from ray_faceid.store_lock import StoreLock


def enroll(registry: Registry, spec, name: str = "ann", consent: str | None = None, **kw) -> str:
    """`name`'s face, under the consent reference `consent-1` for ann and one of their own for others
    (an erasure withdraws a consent reference for the whole tenant)."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    crops = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)]
    consent = consent or ("consent-1" if name.casefold() == "ann" else f"consent-{name}-{time.time_ns()}")
    return registry.create("default", name, consent, rng.normal(size=(1, 128)).astype(np.float32),
                           np.ones(1, np.float32), spec, crops, [], **kw)["id"]


def while_writing_weights(monkeypatch, other):
    """Run `other` in a thread while the first adapter weights are being written, and give it 0.5 s
    to finish there (it cannot where the registry serialises writers)."""
    write, started = storage.write_bytes, []

    def hooked(uri, data):
        if uri.endswith("weights.safetensors") and not started:
            started.append(threading.Thread(target=other))
            started[0].start()
            started[0].join(0.5)
        write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", hooked)
    return started


def test_a_delete_during_a_personalize_write_is_not_undone(tmp_path, spec128, monkeypatch):
    registry = Registry(str(tmp_path / "registry"))
    ident = enroll(registry, spec128)
    threads = while_writing_weights(monkeypatch, lambda: erase_identity(registry, "default", ident))
    registry.add_adapter("default", ident, b"weights", {"base_adapter": "a"})  # began before the delete
    threads[0].join(10)
    assert not threads[0].is_alive()
    with pytest.raises(Erased):
        registry.get("default", ident)
    assert registry.files("default", ident) == []  # no meta.json, no adapter brought back
    with pytest.raises(Erased):  # and nothing may be written to it again
        registry.add_adapter("default", ident, b"weights", {"base_adapter": "a"})
    assert registry.files("default", ident) == []


def test_two_personalize_writers_keep_both_records(tmp_path, spec128, monkeypatch):
    registry = Registry(str(tmp_path / "registry"))
    ident = enroll(registry, spec128)
    threads = while_writing_weights(monkeypatch, lambda: registry.add_adapter("default", ident, b"second",
                                                                              {"base_adapter": "b"}))
    registry.add_adapter("default", ident, b"first", {"base_adapter": "a"})
    threads[0].join(10)
    meta = registry.get("default", ident)
    assert sorted(a["base_adapter"] for a in meta["adapters"]) == ["a", "b"]
    assert meta["generation"] == 3


def test_a_write_at_an_old_generation_is_refused(tmp_path, spec128):
    registry = Registry(str(tmp_path / "registry"))
    ident = enroll(registry, spec128)
    seen = registry.get("default", ident)["generation"]
    registry.update("default", ident, lambda m: m.update(name_note="first"), generation=seen)
    with pytest.raises(Conflict, match="changed"):
        registry.update("default", ident, lambda m: m.update(name_note="second"), generation=seen)
    assert registry.get("default", ident)["name_note"] == "first"


def test_an_erased_person_is_not_enrolled_again_without_new_consent(tmp_path, spec128):
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, spec128, "Ann"))
    with pytest.raises(ErasedPerson, match="--reconsent"):
        enroll(registry, spec128, "ann")
    with pytest.raises(BadInput, match="new consent"):
        enroll(registry, spec128, "ann", reconsent="consent-1")
    again = enroll(registry, spec128, "ann", reconsent="consent-2")
    assert registry.get("default", again)["consent"] == "consent-2"
    enroll(registry, spec128, "bob")  # others are not affected
    # Replacing an enrollment is not an erasure of the person: the name stays usable.
    newer = enroll(registry, spec128, "bob", name_exists="replace")
    assert enroll(registry, spec128, "bob", name_exists="replace") != newer


def test_enroll_racing_a_delete_never_brings_the_person_back(tmp_path, spec128):
    registry = Registry(str(tmp_path / "registry"))
    for _ in range(5):
        ident = enroll(registry, spec128, "cat", **({"reconsent": f"c{time.time_ns()}"} if _ else {}))
        outcome = {}

        def again():  # a scheduled re-enrollment of the same person
            try:
                outcome["id"] = enroll(registry, spec128, "cat")
            except Exception as exc:  # noqa: BLE001 - the outcome is asserted below
                outcome["error"] = exc

        thread = threading.Thread(target=again)
        thread.start()
        erase_identity(registry, "default", ident)
        thread.join(10)
        # Either the re-enrollment came first (the name was taken) or after (the person was erased).
        assert type(outcome.get("error")).__name__ in ("NameTaken", "ErasedPerson"), outcome
        assert registry.named("default", "cat") == []


def _add(store: str, ident: str, k: int) -> str:
    try:
        Registry(store).add_adapter("default", ident, f"weights {k}".encode(), {"base_adapter": f"b{k}"})
        return "stored"
    except (Erased, NotFound):
        return "erased"


def _delete(store: str, ident: str) -> str:
    erase_identity(Registry(store), "default", ident)
    return "deleted"


def test_writers_in_processes(tmp_path, spec128):
    registry = Registry(str(tmp_path / "registry"))
    kept, erased = enroll(registry, spec128, "dan"), enroll(registry, spec128, "eve")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        jobs = [pool.apply_async(_add, (registry.store, kept, k)) for k in range(6)]
        jobs += [pool.apply_async(_add, (registry.store, erased, k)) for k in range(3)]
        jobs.append(pool.apply_async(_delete, (registry.store, erased)))
        jobs += [pool.apply_async(_add, (registry.store, erased, k)) for k in range(3, 6)]
        results = [j.get(60) for j in jobs]
    assert results[:6] == ["stored"] * 6
    assert len(registry.get("default", kept)["adapters"]) == 6  # no lost record
    assert registry.files("default", erased) == []  # no resurrection
    with pytest.raises(Erased):
        registry.get("default", erased)


def test_a_lock_left_by_a_dead_writer_is_taken_over_and_a_live_one_is_waited_for(tmp_path):
    uri = str(tmp_path / "x.lock")
    storage.write_bytes(uri, json.dumps({"token": "dead", "time": time.time() - 3600}).encode())
    with StoreLock(uri, "x", timeout=1):
        with pytest.raises(Conflict, match="another writer"):
            with StoreLock(uri, "x", timeout=0.2):
                pass
    assert not storage.exists(uri)


def test_an_empty_lock_left_by_a_writer_that_died_while_creating_it_goes_stale(tmp_path):
    import os

    uri = str(tmp_path / "x.lock")
    storage.write_bytes(uri, b"")  # created, never written
    old = time.time() - 3600
    os.utime(uri, (old, old))
    with StoreLock(uri, "x", timeout=2):
        assert json.loads(storage.read_bytes(uri))["token"]
    storage.write_bytes(uri, b"")  # a fresh empty one is a writer still writing: waited for
    with pytest.raises(Conflict, match="another writer"):
        with StoreLock(uri, "x", timeout=0.2):
            pass


def _hold(uri: str, log: str) -> None:
    """Take the lock (a dead holder's is there at first), then record entering and leaving it."""
    with StoreLock(uri, "x", timeout=60):
        with open(log, "a") as fh:
            fh.write("in\n")
        time.sleep(0.05)
        with open(log, "a") as fh:
            fh.write("out\n")


def test_concurrent_takeovers_in_processes_let_one_writer_in_at_a_time(tmp_path):
    uri, log = str(tmp_path / "x.lock"), str(tmp_path / "log")
    storage.write_bytes(uri, json.dumps({"token": "dead", "time": time.time() - 3600}).encode())
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for job in [pool.apply_async(_hold, (uri, log)) for _ in range(12)]:
            job.get(120)
    events = open(log).read().split()
    assert events == ["in", "out"] * 12  # never two inside
    assert not storage.exists(uri) and not list(tmp_path.glob("x.lock.takeover-*"))


def test_every_withdrawn_consent_stays_refused_and_names_cannot_be_guessed_from_tombstones(tmp_path, spec128):
    from ray_faceid import tombstones

    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, spec128, "ann"))  # withdrew consent-1
    erase_identity(registry, "default", enroll(registry, spec128, "ann", reconsent="consent-2"))  # then consent-2
    for withdrawn in ("consent-1", "consent-2"):
        with pytest.raises(BadInput, match="one the person withdrew"):
            enroll(registry, spec128, "ann", reconsent=withdrawn)
    assert enroll(registry, spec128, "ann", reconsent="consent-3")
    stones = tombstones.all_for(registry.store, "default")
    assert len(stones) == 2 and len({t["sequence"] for t in stones}) == 2
    guess = tombstones.digest("name", "default", "ann")  # hashing a guessed name finds nothing
    assert all(guess not in t["person_keys"] and t["person_keys"] for t in stones)
    other = Registry(str(tmp_path / "other"))  # another registry keys the same name differently
    assert tombstones.person_key(other.store, "default", "ann") != tombstones.person_key(registry.store, "default", "ann")


def test_asking_for_an_erased_person_by_name_says_they_were_erased(tmp_path, spec128):
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, spec128, "ann"))
    with pytest.raises(Erased, match="'ann' was erased from this registry on "):
        registry.resolve("default", "ann")  # a render row or a request naming her
    with pytest.raises(NotFound, match="no identity called 'bob'"):
        registry.resolve("default", "bob")
