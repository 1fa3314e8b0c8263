"""An erasure that stops at any storage write or delete is finished by the next `delete` of the same
person (by name), and then no store holds their id or embeddings: a fault injected at each step in
turn (registry, a render output the registry knows, a folder given with --also)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_faceid import storage
from ray_faceid.data import tables
from ray_faceid.erasure import erase_identity, journals
from ray_faceid.errors import Erased, NotFound
from ray_faceid.registry import Registry

from .test_erasure import traces


def enroll(registry, name, seed):
    from ray_faceid.face.analyzer import FaceAnalyzer

    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(2, 128)).astype(np.float32)
    meta = registry.create("t", name, f"consent-{name}", embeddings, np.ones(2, np.float32), FaceAnalyzer().spec,
                           [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)] * 2, [])
    return meta["id"], embeddings


def render_output(out: Path, rows: dict[str, str]) -> None:
    """A render output as `render` writes it: images with sidecars, the manifest, an eval report."""
    (out / "images").mkdir(parents=True)
    records = []
    for row, identity in rows.items():
        record = {"id": row, "identity_ids": [identity], "scores": "{}", "provenance": "{}"}
        (out / "images" / f"{row}.png").write_bytes(b"\x89PNG image of " + identity.encode())
        (out / "images" / f"{row}.json").write_text(json.dumps(record))
        records.append(record)
    tables.write_table(str(out / "manifest.parquet"), pa.Table.from_pylist(records))
    (out / "eval.json").write_text(json.dumps({"rows": [{"identities": list(rows.values())}]}))


def world(root: Path):
    registry = Registry(str(root / "registry"))
    amy, amy_emb = enroll(registry, "amy", 1)
    bob, _ = enroll(registry, "bob", 2)
    render_output(root / "known", {"r1": amy, "r2": bob})
    registry.record_output("t", str(root / "known"))
    render_output(root / "elsewhere", {"r3": amy, "r4": bob})
    return registry, amy, amy_emb, bob


def steps(monkeypatch, fail_at: int | None) -> list[str]:
    """Count storage writes and deletes (lock files aside: a lock left by a crash goes stale on its
    own); raise OSError at the `fail_at`-th."""
    seen: list[str] = []
    for name in ("write_bytes", "delete"):
        real = getattr(storage, name)

        def hooked(uri, *args, _real=real, _name=name):
            if "_locks" not in str(uri):
                seen.append(f"{_name} {uri}")
                if len(seen) - 1 == fail_at:
                    raise OSError(f"injected fault at step {fail_at}: {_name} {uri}")
            return _real(uri, *args)

        monkeypatch.setattr(storage, name, hooked)
    return seen


def test_count_the_steps_of_a_clean_erasure(tmp_path, monkeypatch):
    registry, amy, amy_emb, bob = world(tmp_path)
    seen = steps(monkeypatch, None)
    report = erase_identity(registry, "t", "amy", also=[str(tmp_path / "elsewhere")])
    assert len(seen) == 15 and report["id"] == amy  # journal, tombstone, meta, 2 x 4 in outputs, journal x2, folder, journal
    assert {entry["where"] for entry in report["removed"]} >= {str(tmp_path / "known"), str(tmp_path / "elsewhere")}


@pytest.mark.parametrize("fail_at", range(16))  # 15 steps (counted below), and one past them
def test_an_erasure_stopped_at_any_step_is_finished_by_the_next_delete(tmp_path, monkeypatch, fail_at):
    registry, amy, amy_emb, bob = world(tmp_path)
    also = [str(tmp_path / "elsewhere")]
    seen = steps(monkeypatch, fail_at)
    try:
        erase_identity(registry, "t", "amy", also=also)
        finished = True
    except OSError:
        finished = False
    monkeypatch.undo()
    if finished:  # past the last step: nothing is left to finish, and a delete by name says when it ended
        assert fail_at >= len(seen), "the fault was not injected"
        with pytest.raises(Erased, match="'amy' was erased on"):
            erase_identity(registry, "t", "amy", also=also)
    else:
        erase_identity(registry, "t", "amy", also=also)  # by name, as the operator retries
    assert traces([tmp_path], amy, amy_emb) == []
    assert journals(registry, "t") == []
    with pytest.raises(Erased):
        registry.get("t", amy)
    assert registry.get("t", bob)["name"] == "bob"  # the others are untouched
    for out in ("known", "elsewhere"):
        kept = [r["id"] for r in tables.read_table(str(tmp_path / out / "manifest.parquet")).to_pylist()]
        assert kept == [{"known": "r2", "elsewhere": "r4"}[out]]


def test_also_after_a_finished_erasure_reaches_another_output(tmp_path):
    registry, amy, amy_emb, bob = world(tmp_path)
    erase_identity(registry, "t", amy)
    report = erase_identity(registry, "t", amy, also=[str(tmp_path / "elsewhere")])
    assert report["removed"] and traces([tmp_path], amy, amy_emb) == []


def test_the_serve_sweep_finishes_a_stopped_erasure_but_not_a_running_one(tmp_path, monkeypatch):
    import os
    import time

    from ray_faceid.erasure import resume_pending

    registry, amy, amy_emb, bob = world(tmp_path)
    steps(monkeypatch, 5)  # stops in the middle of the first output
    with pytest.raises(OSError):
        erase_identity(registry, "t", "amy")
    monkeypatch.undo()
    assert resume_pending(registry) == 0  # just written: another process may still be running it
    (journal,) = (tmp_path / "registry" / "t" / "_erasing").iterdir()
    old = time.time() - 3600
    os.utime(journal, (old, old))
    assert resume_pending(registry) == 1
    assert journals(registry, "t") == [] and traces([tmp_path / "registry", tmp_path / "known"], amy, amy_emb) == []


def test_a_half_written_journal_copy_goes_with_the_journal(tmp_path, monkeypatch):
    """A crash inside a journal write leaves `<journal>.tmp-...` (it names the person): finishing the
    erasure removes it too."""
    registry, amy, amy_emb, bob = world(tmp_path)
    steps(monkeypatch, 5)
    with pytest.raises(OSError):
        erase_identity(registry, "t", "amy")
    monkeypatch.undo()
    (journal,) = (tmp_path / "registry" / "t" / "_erasing").iterdir()
    (journal.parent / (journal.name + ".tmp-0123")).write_bytes(journal.read_bytes()[:40])
    assert len(journals(registry, "t")) == 1
    erase_identity(registry, "t", "amy")
    known = [tmp_path / "registry", tmp_path / "known"]  # ("elsewhere" was not named: it keeps her)
    assert list(journal.parent.iterdir()) == [] and traces(known, amy, amy_emb) == []


def test_a_person_re_enrolled_after_a_stopped_erasure_is_the_one_a_delete_by_name_erases(tmp_path, monkeypatch):
    registry, amy, amy_emb, bob = world(tmp_path)
    steps(monkeypatch, 5)  # after the tombstone: the old amy is withdrawn, her erasure unfinished
    with pytest.raises(OSError):
        erase_identity(registry, "t", "amy")
    monkeypatch.undo()
    from ray_faceid.face.analyzer import FaceAnalyzer

    again = registry.create("t", "amy", "consent-1", np.ones((1, 128), np.float32), np.ones(1, np.float32),
                            FaceAnalyzer().spec, [np.zeros((8, 8, 3), np.uint8)], [], reconsent="consent-2")["id"]
    report = erase_identity(registry, "t", "amy")
    assert report["id"] == again  # the enrolled one, not the old record
    with pytest.raises(Erased):
        registry.get("t", again)
    assert erase_identity(registry, "t", amy)["id"] == amy  # the old one is finished by its id
    assert journals(registry, "t") == [] and traces([tmp_path / "registry", tmp_path / "known"], amy, amy_emb) == []


def test_deleting_by_name_again_says_when_they_were_erased(tmp_path):
    registry, amy, amy_emb, bob = world(tmp_path)
    erase_identity(registry, "t", "amy")
    with pytest.raises(Erased, match="'amy' was erased on .*nothing is left to erase"):
        erase_identity(registry, "t", "amy")
    with pytest.raises(NotFound, match="no identity called 'nobody'"):
        erase_identity(registry, "t", "nobody")


def test_a_damaged_journal_or_tombstone_is_set_aside_and_blocks_no_erasure(tmp_path, caplog):
    registry, amy, amy_emb, bob = world(tmp_path)
    erasing = tmp_path / "registry" / "t" / "_erasing"
    erasing.mkdir(parents=True)
    (erasing / "a.json").write_text(json.dumps({"folders": []}))  # no `meta`: a traceback stopped every erasure
    (erasing / "b.json").write_text("{ cut short")
    stones = tmp_path / "registry" / "t" / "_erased"
    stones.mkdir(parents=True)
    (stones / "c.json").write_text(json.dumps(["not", "a", "tombstone"]))
    with caplog.at_level("WARNING"):
        assert erase_identity(registry, "t", "amy")["id"] == amy
        assert erase_identity(registry, "t", bob)["id"] == bob
        enroll(registry, "cy", 3)  # reads every tombstone of the tenant
    assert sorted(p.name for p in (erasing / "_damaged").iterdir()) == ["a.json", "b.json"]
    assert [p.name for p in (stones / "_damaged").iterdir()] == ["c.json"]
    assert "damaged erasure journal" in caplog.text and "damaged tombstone" in caplog.text
    with pytest.raises(Erased):  # the good tombstones still hold
        registry.get("t", amy)
