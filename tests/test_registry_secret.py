"""The registry's secret lives outside the store: a store keyed before refuses to run with no secret
or another one (one line; nothing made anew), the store alone gives no name back, a secret earlier
versions kept inside the store is moved out, and rotation re-keys every tombstone, finishing after
a stop at any step."""
import hashlib
import hmac
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ray_faceid import storage, tombstones
from ray_faceid.cli import app
from ray_faceid.erasure import erase_identity
from ray_faceid.errors import ErasedPerson
from ray_faceid.registry import Registry
from ray_faceid.registry_secret import ENV_FILE, ENV_SECRET, RegistrySecretError, keys_for


def face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 128)).astype(np.float32)


def enroll(registry, name, seed, spec, **kw):
    return registry.create("default", name, f"form-{seed}-{kw.pop('n', 1)}", face(seed), np.ones(1, np.float32), spec,
                           [np.zeros((8, 8, 3), np.uint8)], [], **kw)["id"]


@pytest.fixture
def own_secret(tmp_path, monkeypatch):
    """A secret of this test's own, and no default one to fall back on."""
    monkeypatch.delenv(ENV_SECRET, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    secret = tmp_path / "secret-a"
    secret.write_text("a" * 40)
    monkeypatch.setenv(ENV_FILE, str(secret))
    return secret


def test_a_keyed_store_refuses_a_missing_or_other_secret_and_never_makes_one(tmp_path, own_secret, monkeypatch,
                                                                             spec128):
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "ann", 1, spec128))
    assert not (tmp_path / "registry" / "_secret.key").exists()  # nothing secret in the store

    monkeypatch.delenv(ENV_FILE)  # no secret at all: refused, and none made (default file or store)
    with pytest.raises(RegistrySecretError, match="not set up here") as missing:
        enroll(registry, "bob", 2, spec128)
    assert "\n" not in str(missing.value)
    assert not (tmp_path / "config").exists() and not (tmp_path / "registry" / "_secret.key").exists()
    other = tmp_path / "secret-b"
    other.write_text("b" * 40)
    monkeypatch.setenv(ENV_FILE, str(other))
    with pytest.raises(RegistrySecretError, match="not the one this registry is keyed with"):
        enroll(registry, "bob", 2, spec128)
    with pytest.raises(RegistrySecretError, match="not the one"):  # erasures too
        erase_identity(registry, "default", "ann")
    cli = CliRunner().invoke(app, ["identities", "delete", "ann", "--registry", registry.store])
    assert cli.exit_code == 2 and "registry_secret" in cli.stderr and "Traceback" not in cli.output

    monkeypatch.setenv(ENV_FILE, str(own_secret))
    with pytest.raises(ErasedPerson):  # the right secret: she is still recognised
        enroll(registry, "ann", 1, spec128, n=2)


def test_the_store_alone_gives_no_erased_name_back(tmp_path, own_secret, spec128):
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "ann", 1, spec128))
    store_bytes = b"".join(p.read_bytes() for p in (tmp_path / "registry").rglob("*") if p.is_file())
    name = "\0".join(("name", "default", "ann")).encode()
    for key in [b""] + [p.read_bytes().strip() for p in (tmp_path / "registry").rglob("*") if p.is_file()]:
        for guess in (hashlib.sha256(name).hexdigest(), hmac.new(key, name, hashlib.sha256).hexdigest()):
            assert guess.encode() not in store_bytes
    assert b"ann" not in store_bytes.replace(b"_secret", b"")


def test_a_secret_kept_in_the_store_is_refused_until_moved_out(tmp_path, own_secret, monkeypatch, spec128):
    """A store from before: its secret inside, tombstones keyed with HMAC. Moved out, the names
    erased before are still refused."""
    registry = Registry(str(tmp_path / "registry"))
    old = "c" * 64
    storage.write_bytes(registry.store + "/_secret.key", old.encode())
    key = hmac.new(old.encode(), "\0".join(("name", "default", "ann")).encode(), hashlib.sha256).hexdigest()
    storage.write_bytes(registry.store + "/default/_erased/x.json", json.dumps(
        {"id_sha256": "x", "tenant": "default", "erased": "2026-01-01T00:00:00Z", "consent": "form-0",
         "person_keys": [key], "key_scheme": "hmac-sha256"}).encode())
    with pytest.raises(RegistrySecretError, match="move-secret-out"):
        enroll(registry, "bob", 2, spec128)
    outside = tmp_path / "moved" / "registry-secret"
    moved = CliRunner().invoke(app, ["identities", "move-secret-out", str(outside), "--registry", registry.store])
    assert moved.exit_code == 0, moved.output
    assert not (tmp_path / "registry" / "_secret.key").exists() and oct(outside.stat().st_mode)[-3:] == "600"
    monkeypatch.setenv(ENV_FILE, str(outside))
    with pytest.raises(ErasedPerson, match="called 'ann'"):
        enroll(registry, "ann", 1, spec128)
    assert enroll(registry, "bob", 2, spec128)


@pytest.mark.parametrize("fail_at", [None, 0, 1, 2, 3])
def test_rotation_rekeys_every_tombstone_and_finishes_after_a_stop(tmp_path, own_secret, monkeypatch, spec128,
                                                                  fail_at):
    registry = Registry(str(tmp_path / "registry"))
    other_encoder = spec128.model_copy(update={"name": "other_encoder"})
    for name, seed in (("ann", 1), ("bob", 2)):
        identity = enroll(registry, name, seed, spec128)
        if name == "ann":  # her embeddings of a second encoder (`identities embed`): sketched too
            registry.add_embeddings("default", identity, face(11), np.ones(1, np.float32), other_encoder)
        erase_identity(registry, "default", identity)
    new = tmp_path / "secret-new"
    new.write_text("n" * 40)
    rotate = ["identities", "rotate-secret", "--new-secret-file", str(new), "--registry", registry.store]
    if fail_at is not None:  # the fail_at-th storage write of the rotation raises; the command stops there
        writes, real = [], storage.write_bytes

        def failing(uri, data):
            writes.append(uri)
            if len(writes) - 1 == fail_at:
                raise OSError("injected")
            return real(uri, data)

        monkeypatch.setattr(storage, "write_bytes", failing)
        assert CliRunner().invoke(app, rotate).exit_code != 0
        monkeypatch.setattr(storage, "write_bytes", real)
        if fail_at > 0:  # stopped after it began: nothing enrolls under either secret until it is finished
            with pytest.raises(RegistrySecretError, match="rotation"):
                enroll(registry, "cy", 3, spec128)
    done = CliRunner().invoke(app, rotate)
    assert done.exit_code == 0, done.output
    assert "re-keyed" in done.stdout
    with pytest.raises(RegistrySecretError, match="not the one"):
        enroll(registry, "cy", 3, spec128)
    monkeypatch.setenv(ENV_FILE, str(new))
    stones = tombstones.all_for(registry.store, "default")
    assert {t["key_id"] for t in stones} == {keys_for(registry.store).key_id}
    for name, seed in (("ann", 1), ("bob", 2)):
        with pytest.raises(ErasedPerson, match=f"called '{name}'"):  # by name
            enroll(registry, name, seed, spec128, n=2)
        with pytest.raises(ErasedPerson, match="matches a person erased"):  # by face
            enroll(registry, "", seed, spec128, n=2)
    with pytest.raises(ErasedPerson, match="matches a person erased"):  # by the face the other encoder saw
        enroll(registry, "", 11, other_encoder, n=2)
    assert enroll(registry, "cy", 3, spec128)


def test_a_secret_file_inside_the_registry_it_keys_is_refused(tmp_path, own_secret, monkeypatch, spec128):
    registry = Registry(str(tmp_path / "registry"))
    enroll(registry, "ann", 1, spec128)
    inside = tmp_path / "registry" / "key.txt"
    inside.write_text("a" * 40)  # the very secret, but kept beside the data it protects
    monkeypatch.setenv(ENV_FILE, str(inside))
    with pytest.raises(RegistrySecretError, match="lies inside the registry"):
        enroll(registry, "bob", 2, spec128)
    monkeypatch.setenv(ENV_FILE, str(own_secret))
    rotated = CliRunner().invoke(app, ["identities", "rotate-secret", "--new-secret-file", str(inside),
                                       "--registry", registry.store])
    assert rotated.exit_code == 2 and "inside the registry" in rotated.stderr
