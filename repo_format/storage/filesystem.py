"""Blob storage in a local (or mounted) directory.

Layout: a blob whose name has 7 or more characters lives at ``root/name[0:3]/name[3:6]/name``, so
no directory holds more than a few thousand entries even with millions of blobs. Shorter names
live in the root as ``_name``: the underscore keeps a 3-character name from colliding with the
shard directory of the same spelling (no valid name starts with ``_``, so nothing else can).
Shard directories are created on demand and never removed (removing one would race with a put).

Writes go to a ``.tmp-*`` file in the target directory, are fsynced, then renamed into place
(``os.replace``) or hard-linked (``os.link``, for ``put_if_absent``), so readers never see a part
of a blob; with ``fsync=True`` the directory is fsynced too, so a completed put survives a crash.
Temp files are never listed; ones left by a crash are harmless litter. The storage timestamp is
the file's mtime, on the clock of the machine that wrote it.

Blob names are case-sensitive: on a case-insensitive filesystem two names that differ only in
case collide (kdist's own names are lowercase hex, so this does not arise in practice).
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import Iterator

from repo_format.errors import BlobNotFound, StorageError, StorageUnreachable
from repo_format.storage.base import BlobMeta, BlobStorage, check_range, validate_name, validate_prefix

SHARDED_NAME_MIN = 7  # names at least this long live in shard directories
SHARD_WIDTH = 3
SHORT_NAME_MARK = "_"
TEMP_PREFIX = ".tmp-"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class FilesystemStorage(BlobStorage):
    atomic_create_only = True

    def __init__(self, root: str | os.PathLike, fsync: bool = True, create: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        self._fsync = fsync
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageUnreachable(f"cannot create storage directory {self.root}: {exc.strerror}") from exc
        if not os.path.isdir(self.root):
            raise StorageUnreachable(f"storage directory {self.root} does not exist or is not a directory")

    # ---- layout

    def _dir_of(self, name: str) -> str:
        if len(name) < SHARDED_NAME_MIN:
            return self.root
        return os.path.join(self.root, name[:SHARD_WIDTH], name[SHARD_WIDTH:2 * SHARD_WIDTH])

    def _path(self, name: str) -> str:
        validate_name(name)
        if len(name) < SHARDED_NAME_MIN:
            return os.path.join(self.root, SHORT_NAME_MARK + name)
        return os.path.join(self._dir_of(name), name)

    def _make_shard_dirs(self, name: str) -> None:
        level1 = os.path.join(self.root, name[:SHARD_WIDTH])
        for parent, directory in ((self.root, level1), (level1, self._dir_of(name))):
            try:
                os.mkdir(directory)
            except FileExistsError:
                continue
            except FileNotFoundError as exc:  # the root itself is gone: do not recreate it
                raise StorageUnreachable(f"storage directory {self.root} no longer exists") from exc
            if self._fsync:
                _fsync_dir(parent)  # make the new directory's entry durable too

    # ---- writes

    def put(self, name, data) -> None:
        path = self._path(name)
        tmp = self._write_temp(name, data)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            _remove_quietly(tmp)
            raise self._error(exc, "put", name) from exc
        self._sync_dir(path, "put", name)

    def put_if_absent(self, name, data) -> bool:
        path = self._path(name)
        tmp = self._write_temp(name, data)
        try:
            os.link(tmp, path)  # fails with EEXIST, atomically, if the name is taken
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._error(exc, "put", name) from exc
        finally:
            _remove_quietly(tmp)
        self._sync_dir(path, "put", name)
        return True

    def _write_temp(self, name: str, data) -> str:
        """Write ``data`` to a new temp file next to the blob's final place; return its path."""
        tmp = os.path.join(self._dir_of(name), TEMP_PREFIX + secrets.token_hex(8))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileNotFoundError:
                self._make_shard_dirs(name)
                fd = os.open(tmp, flags, 0o666)
        except OSError as exc:
            raise self._error(exc, "put", name) from exc
        try:
            try:
                view = memoryview(data).cast("B")
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _remove_quietly(tmp)
            raise self._error(exc, "put", name) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        return tmp

    def delete(self, name) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(exc, "delete", name) from exc
        self._sync_dir(path, "delete", name)

    def _sync_dir(self, path: str, op: str, name: str) -> None:
        """Make the rename, link or unlink of ``path`` durable (with ``fsync=True``)."""
        if not self._fsync:
            return
        try:
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise self._error(exc, op, name) from exc

    # ---- reads

    def get(self, name, offset=0, length=-1) -> bytes:
        path = self._path(name)
        check_range(offset, length)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)  # -1 reads to the end; short at the end
        except FileNotFoundError:
            raise BlobNotFound(name) from None
        except OSError as exc:
            raise self._error(exc, "get", name) from exc

    def stat(self, name) -> BlobMeta:
        path = self._path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BlobNotFound(name) from None
        except OSError as exc:
            raise self._error(exc, "stat", name) from exc
        return BlobMeta(name, st.st_size, st.st_mtime_ns / 1e9)

    def list(self, prefix="") -> Iterator[BlobMeta]:
        validate_prefix(prefix)
        try:
            yield from self._list(prefix)
        except OSError as exc:
            if not os.path.isdir(self.root):
                raise StorageUnreachable(f"storage directory {self.root} no longer exists") from exc
            raise StorageError(f"cannot list {self.root}: {exc.strerror}") from exc

    def _list(self, prefix: str) -> Iterator[BlobMeta]:
        if len(prefix) < SHARDED_NAME_MIN:
            yield from _files_in(self.root, SHORT_NAME_MARK + prefix, strip=len(SHORT_NAME_MARK))
        for level1 in _shard_dirs(self.root, prefix[:SHARD_WIDTH]):
            for level2 in _shard_dirs(level1, prefix[SHARD_WIDTH:2 * SHARD_WIDTH]):
                yield from _files_in(level2, prefix or None)

    # ---- misc

    def _error(self, exc: OSError, op: str, name: str) -> StorageError:
        if exc.errno in _FULL_ERRNOS:
            return StorageError(f"storage full: cannot {op} blob {name!r} in {self.root} ({exc.strerror})")
        if not os.path.isdir(self.root):
            return StorageUnreachable(f"storage directory {self.root} no longer exists")
        return StorageError(f"cannot {op} blob {name!r} in {self.root}: {exc.strerror}")

    def describe(self) -> str:
        return self.root


def _shard_dirs(parent: str, wanted: str) -> Iterator[str]:
    """Yield the shard directories under ``parent`` whose names start with ``wanted``."""
    if len(wanted) == SHARD_WIDTH:  # fully determined: no need to read the parent
        path = os.path.join(parent, wanted)
        if os.path.isdir(path):
            yield path
        return
    with os.scandir(parent) as entries:
        found = [e.path for e in entries
                 if len(e.name) == SHARD_WIDTH and e.name.startswith(wanted) and e.is_dir(follow_symlinks=False)]
    yield from found


def _files_in(directory: str, prefix: str | None, strip: int = 0) -> Iterator[BlobMeta]:
    """Yield blobs in ``directory`` whose file names start with ``prefix`` (skipping temp files)."""
    with os.scandir(directory) as entries:
        found = [e for e in entries
                 if not e.name.startswith(".") and (prefix is None or e.name.startswith(prefix))
                 and e.is_file(follow_symlinks=False)]
    for entry in found:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # deleted since the directory was read
            continue
        yield BlobMeta(entry.name[strip:], st.st_size, st.st_mtime_ns / 1e9)


def _fsync_dir(path: str) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; renames are durable there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
