"""Storage through fsspec URIs: local paths, file://, memory://, s3://, gs://, ...

Writes are atomic: a reader never sees a half-written file, because data goes to a temporary
name first and is then moved into place (a rename on local disks; on object stores a single PUT
is already atomic, so the bytes are written directly).
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import uuid
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from ray_faceid.errors import NotFound, StorageError

log = logging.getLogger(__name__)
# Object stores have no rename; one PUT is atomic there.
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"}
_WARNED_NOT_EXCLUSIVE: set[str] = set()


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `uri` and the path inside it."""
    try:
        return url_to_fs(str(uri))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {uri!r}: {exc} (install the s3 or gcs extra for cloud URIs)") from exc


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def absolute(uri: str | None) -> str | None:
    """A local path made absolute in the driver (Ray workers may run in another working directory:
    Ray Train's always do); a URI, or None, as it is."""
    if uri is None or "://" in str(uri):
        return uri
    return os.path.abspath(os.path.expanduser(str(uri)))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' whatever the platform."""
    uri = str(uri)
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def beside(anchor: str, path: str) -> str:
    """`path` as the file `anchor` names it: a URI or an absolute path as it is, a relative one from
    anchor's folder (a catalog and its photos travel together; a Ray worker's directory is anyone's)."""
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return path if "://" in path else os.path.expanduser(path)
    anchor = absolute(anchor)
    if "://" in anchor:  # "../photos/a.png" climbs the URI's folders, as it would a local path's
        protocol, _, rest = anchor.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))}"
    return os.path.normpath(os.path.join(os.path.dirname(anchor), path))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise NotFound(f"no file at {uri}") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri} is a directory, not a file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically, creating parent folders."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if _protocol(fs) != "file" else os.path.dirname(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if _protocol(fs) in _ATOMIC_PUT_PROTOCOLS:
            fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from exc


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` only if nothing is there: True if this call created it, False if a file
    was already there. Atomic where the store can create exclusively (fsspec mode "xb": O_EXCL on
    local and POSIX disks, the memory store, object-store backends that implement it as a
    conditional PUT); on a backend that cannot, it checks then writes, and says so once in the log."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if _protocol(fs) != "file" else os.path.dirname(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(path, "xb") as fh:
                fh.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # the backend has no exclusive create
            proto = _protocol(fs)
            if proto not in _WARNED_NOT_EXCLUSIVE:
                _WARNED_NOT_EXCLUSIVE.add(proto)
                log.warning("the %s store cannot create files exclusively: registry writes there are "
                            "check-then-write, not safe against a concurrent writer", proto)
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from exc


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def delete(uri: str) -> None:
    """Remove a file or a folder tree; absent is not an error."""
    fs, path = filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:  # another writer removed it first
        pass


def tree_hash(uri: str) -> str:
    """sha256 of a file, or of every file of a folder (names relative to it, and bytes): an adapter,
    IMR or flow folder's content, wherever it is stored."""
    h = hashlib.sha256()
    root = uri.rstrip("/")
    for name in list_files(uri):
        h.update(name[len(root):].encode() + b"\0")
        h.update(hashlib.sha256(read_bytes(name)).digest())
    return h.hexdigest()


def modified(uri: str) -> float | None:
    """When the file at `uri` was last written (epoch seconds), or None where the store cannot say
    or nothing is there."""
    fs, path = filesystem(uri)
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError, OSError, AttributeError, ValueError):
        return None


def listing_root(uri: str) -> str:
    """The folder `list_files(uri)` lists, written as its URIs write their parent folders."""
    fs, path = filesystem(uri)
    if fs.exists(path) and fs.isfile(path):
        path = posixpath.dirname(path)
    return (fs.unstrip_protocol(path) if "://" in str(uri) else path).rstrip("/")


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> Iterator[str]:
    """Every file under `uri` (recursively), as URIs of the same scheme, in sorted order."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise NotFound(f"no such folder: {uri}")
    if fs.isfile(path):
        found = [path]
    else:
        found = sorted(fs.find(path))
    wanted = tuple(e.lower() for e in extensions) if extensions else None
    for p in found:
        if wanted is None or p.lower().endswith(wanted):
            yield fs.unstrip_protocol(p) if "://" in str(uri) else p
