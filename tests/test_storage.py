import os

import pytest

from ray_faceid import storage
from ray_faceid.errors import NotFound


def test_memory_roundtrip_and_listing():
    storage.write_bytes("memory://bucket/a/x.jpg", b"1")
    storage.write_bytes("memory://bucket/a/b/y.PNG", b"22")
    storage.write_bytes("memory://bucket/a/notes.txt", b"333")
    assert storage.read_bytes("memory://bucket/a/b/y.PNG") == b"22"
    listed = list(storage.list_files("memory://bucket/a", (".jpg", ".png")))
    assert [u.rsplit("/", 2)[-2:] for u in listed] == [["b", "y.PNG"], ["a", "x.jpg"]]
    assert [storage.read_bytes(u) for u in listed] == [b"22", b"1"]
    storage.delete("memory://bucket/a")
    assert not storage.exists("memory://bucket/a/x.jpg")


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "dir" / "file.bin"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_missing_things_raise_not_found(tmp_path):
    with pytest.raises(NotFound, match="no file"):
        storage.read_bytes(str(tmp_path / "absent.jpg"))
    with pytest.raises(NotFound, match="no such folder"):
        list(storage.list_files(str(tmp_path / "absent")))


def test_a_path_in_a_file_is_read_from_that_files_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.beside("s3://bucket/catalogs/c.jsonl", "photos/a.png") == "s3://bucket/catalogs/photos/a.png"
    assert storage.beside("s3://bucket/catalogs/c.jsonl", "gs://other/a.png") == "gs://other/a.png"
    assert storage.beside("s3://bucket/catalogs/c.jsonl", "../photos/a.png") == "s3://bucket/photos/a.png"
    assert storage.beside("cat/c.jsonl", "../photos/a.png") == str(tmp_path / "photos" / "a.png")
    assert storage.beside("cat/c.jsonl", "photos/a.png") == str(tmp_path / "cat" / "photos" / "a.png")
    assert storage.beside("cat/c.jsonl", "/data/a.png") == "/data/a.png"
    assert storage.beside("s3://bucket/c.jsonl", "~/a.png") == os.path.expanduser("~/a.png")
