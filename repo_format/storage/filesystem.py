"""Blob storage in a local (or mounted) directory.

Layout: a blob whose name has 7 or more characters lives at ``root/name[0:3]/name[3:6]/name``, so
no directory holds more than a few thousand entries even with millions of blobs. Shorter names
live in the root as ``_name``: the underscore keeps a 3-character name from colliding with the
shard directory of the same spelling (no valid name starts with ``_``, so nothing else can).
Shard directories are created on demand.

Writes go to a ``.tmp-*`` file in the target directory, are fsynced, then renamed into place
(``os.replace``) or hard-linked (``os.link``, for ``put_if_absent``), so readers never see a part
of a blob; with ``fsync=True`` the directory is fsynced too, so a completed put survives a crash.
Temp files are never listed. The storage timestamp is the file's mtime, on the clock of the
machine that wrote it.

``reclaim_leftovers`` deletes temp files left by cut puts and removes empty shard directories
(deleted blobs and maintenance's probe blobs leave those), each once its mtime is older than the
cutoff. It races with puts, safely: a directory is removed only by ``os.rmdir``, which refuses a
non-empty one atomically, so it can only vanish while a put holds nothing in it, which is
between the put's ``mkdir`` and the creation of its temp file. From that creation until the
rename or link the temp file keeps the directory non-empty, and afterwards the blob does. A put
therefore makes its directories and creates its temp file again when either is missing, and
writes the temp file again when a reclaim deleted it (only a cutoff shorter than the put allows
that). A listing takes a directory that vanished before it was read for an empty one, and a
delete that empties a directory makes its removal durable if it is removed before the fsync.
A missing root is never recreated: it raises ``StorageUnreachable``.

Blob names are case-sensitive: on a case-insensitive filesystem two names that differ only in
case collide (kdist's own names are lowercase hex, so this does not arise in practice).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from typing import Iterator

from repo_format.errors import BlobNotFound, StorageError, StorageUnreachable
from repo_format.storage.base import BlobMeta, BlobStorage, check_range, validate_name, validate_prefix

SHARDED_NAME_MIN = 7  # names at least this long live in shard directories
SHARD_WIDTH = 3
SHORT_NAME_MARK = "_"
TEMP_PREFIX = ".tmp-"
# a reclaim can undo a put's mkdir or delete its temp file (see above): how often a put tries again
PUT_ATTEMPTS = 5
# the names of shard directories at each level (reclaiming removes only directories named so)
_LEVEL1_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{%d}" % (SHARD_WIDTH - 1))
_LEVEL2_RE = re.compile(r"[A-Za-z0-9._-]{%d}" % SHARD_WIDTH)
# what a removal that lost a race says: already gone, or not empty (POSIX allows EEXIST for that)
_RACE_ERRNOS = {errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST}
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
        """Create the directories of ``name``'s blob (short names have none); raise
        ``StorageUnreachable`` if the root itself is gone: it is never recreated.

        A reclaim may remove the first level (empty until the second exists) between the two
        mkdirs, or remove both before the second is fsynced into the first: that mkdir or fsync
        finds nothing, and the caller's open of its temp file then fails and comes back here.
        """
        level2 = self._dir_of(name)
        level1 = os.path.dirname(level2)
        try:
            if level2 != self.root:
                self._mkdir(self.root, level1)
                self._mkdir(level1, level2)
        except FileNotFoundError:
            pass  # the root is gone (below), or a reclaim removed level1 (the caller tries again)
        if not os.path.isdir(self.root):
            raise StorageUnreachable(f"storage directory {self.root} no longer exists")

    def _mkdir(self, parent: str, directory: str) -> None:
        try:
            os.mkdir(directory)
        except FileExistsError:
            return
        if self._fsync:
            _fsync_dir(parent)  # make the new directory's entry durable too

    # ---- writes

    def put(self, name, data) -> None:
        path = self._path(name)
        self._place(name, data, lambda tmp: os.replace(tmp, path), temp_stays=False)
        self._sync_dir(path, "put", name)

    def put_if_absent(self, name, data) -> bool:
        path = self._path(name)
        try:
            # os.link fails with EEXIST, atomically, if the name is taken
            self._place(name, data, lambda tmp: os.link(tmp, path), temp_stays=True)
        except FileExistsError:
            return False
        self._sync_dir(path, "put", name)
        return True

    def _place(self, name: str, data, move, temp_stays: bool) -> None:
        """Write ``data`` to a temp file and ``move(tmp)`` it into place (``FileExistsError``
        passes through). The temp file keeps its directory from being reclaimed until the move,
        after which the blob does; but a reclaim with a cutoff shorter than this put may delete
        the temp file itself (the move then finds no source), and then the put starts again."""
        attempt = 1
        while True:
            tmp = self._write_temp(name, data)
            try:
                move(tmp)
            except FileNotFoundError as exc:  # the temp file was reclaimed (its directory with it)
                _remove_quietly(tmp)
                if attempt == PUT_ATTEMPTS:
                    raise self._error(exc, "put", name) from exc
                attempt += 1
                continue
            except FileExistsError:
                _remove_quietly(tmp)
                raise
            except OSError as exc:
                _remove_quietly(tmp)
                raise self._error(exc, "put", name) from exc
            if temp_stays:  # a link leaves the temp name behind
                _remove_quietly(tmp)
            return

    def _write_temp(self, name: str, data) -> str:
        """Write ``data`` to a new temp file next to the blob's final place; return its path."""
        tmp = os.path.join(self._dir_of(name), TEMP_PREFIX + secrets.token_hex(8))
        fd = self._create_temp(name, tmp)
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

    def _create_temp(self, name: str, tmp: str) -> int:
        """Create ``tmp`` and return its descriptor, making its shard directories when they are
        missing. A reclaim may remove them again, empty, between the mkdir and the open: then
        make them again. Once the file exists its directory is not empty and cannot be removed."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        retries = 0
        while True:
            try:
                if retries:
                    self._make_shard_dirs(name)
                return os.open(tmp, flags, 0o666)
            except FileNotFoundError as exc:
                if retries == PUT_ATTEMPTS:
                    raise self._error(exc, "put", name) from exc
                retries += 1
            except OSError as exc:
                raise self._error(exc, "put", name) from exc

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
        """Make the rename, link or unlink of ``path`` durable (with ``fsync=True``).

        A reclaim may have removed the directory since, once it was empty (after a delete, or
        after another client deleted the blob just put): then its removal is made durable, by
        the first directory above it that is still there.
        """
        if not self._fsync:
            return
        directory = os.path.dirname(path)
        while True:
            try:
                _fsync_dir(directory)
                return
            except FileNotFoundError as exc:
                if directory == self.root:
                    raise self._error(exc, op, name) from exc
                directory = os.path.dirname(directory)
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
            # a reclaim may remove a shard directory after the read that found it: it was empty
            for level2 in _shard_dirs(level1, prefix[SHARD_WIDTH:2 * SHARD_WIDTH], missing_ok=True):
                yield from _files_in(level2, prefix or None, missing_ok=True)

    # ---- leftovers

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        """Delete temp files and remove empty shard directories whose mtime is before ``now -
        older_than``; return ``{"temp_files": n, "temp_bytes": b, "directories": d}``.

        Temp files live in the root and in second-level shard directories. A directory's age is
        its mtime as the scan found it, before this call deleted anything in it (which touches
        the mtime), so one call can empty a directory and remove it, and then its parent. Only
        regular files and real directories named like temp files and shard directories are
        considered; symbolic links are neither followed nor removed. Removals that lose a race
        (already gone, no longer empty) are skipped. Removals are not fsynced: one undone by a
        crash leaves the leftover for the next call.
        """
        cutoff = now - older_than
        counts = {"temp_files": 0, "temp_bytes": 0, "directories": 0}
        try:
            root_entries = _scan(self.root)
            _reclaim_temps(root_entries, cutoff, counts)
            for level1, level1_mtime in _shard_dirs_aged(root_entries, _LEVEL1_RE):
                for level2, level2_mtime in _shard_dirs_aged(_scan(level1, missing_ok=True), _LEVEL2_RE):
                    _reclaim_temps(_scan(level2, missing_ok=True), cutoff, counts)
                    if level2_mtime < cutoff:
                        counts["directories"] += _rmdir_if_empty(level2)
                if level1_mtime < cutoff:
                    counts["directories"] += _rmdir_if_empty(level1)
        except OSError as exc:
            if not os.path.isdir(self.root):
                raise StorageUnreachable(f"storage directory {self.root} no longer exists") from exc
            raise StorageError(f"cannot reclaim leftovers in {self.root}: {exc.strerror} "
                               f"({exc.filename})") from exc
        return counts

    # ---- misc

    def _error(self, exc: OSError, op: str, name: str) -> StorageError:
        if exc.errno in _FULL_ERRNOS:
            return StorageError(f"storage full: cannot {op} blob {name!r} in {self.root} ({exc.strerror})")
        if not os.path.isdir(self.root):
            return StorageUnreachable(f"storage directory {self.root} no longer exists")
        return StorageError(f"cannot {op} blob {name!r} in {self.root}: {exc.strerror}")

    def describe(self) -> str:
        return self.root


def _shard_dirs(parent: str, wanted: str, missing_ok: bool = False) -> Iterator[str]:
    """Yield the shard directories under ``parent`` whose names start with ``wanted``."""
    if len(wanted) == SHARD_WIDTH:  # fully determined: no need to read the parent
        path = os.path.join(parent, wanted)
        if os.path.isdir(path):
            yield path
        return
    yield from [e.path for e in _scan(parent, missing_ok)
                if len(e.name) == SHARD_WIDTH and e.name.startswith(wanted) and e.is_dir(follow_symlinks=False)]


def _files_in(directory: str, prefix: str | None, strip: int = 0, missing_ok: bool = False) -> Iterator[BlobMeta]:
    """Yield blobs in ``directory`` whose file names start with ``prefix`` (skipping temp files)."""
    found = [e for e in _scan(directory, missing_ok)
             if not e.name.startswith(".") and (prefix is None or e.name.startswith(prefix))
             and e.is_file(follow_symlinks=False)]
    for entry in found:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # deleted since the directory was read
            continue
        yield BlobMeta(entry.name[strip:], st.st_size, st.st_mtime_ns / 1e9)


def _scan(directory: str, missing_ok: bool = False) -> list[os.DirEntry]:
    """The entries of ``directory``; none if it is gone and ``missing_ok`` (a reclaim raced)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return []
        raise


def _shard_dirs_aged(entries: list[os.DirEntry], pattern: re.Pattern) -> list[tuple[str, float]]:
    """``(path, mtime)`` of the real directories (not links) among ``entries`` named like shard
    directories of one level; each mtime is read here, before anything in it is removed."""
    found = []
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            try:
                found.append((entry.path, entry.stat(follow_symlinks=False).st_mtime_ns / 1e9))
            except FileNotFoundError:  # removed since the scan
                continue
    return found


def _reclaim_temps(entries: list[os.DirEntry], cutoff: float, counts: dict[str, int]) -> None:
    """Delete the temp files among ``entries`` whose mtime is before ``cutoff``; count them."""
    for entry in entries:
        if not (entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False)):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # renamed into place or reclaimed since the scan
            continue
        if st.st_mtime_ns / 1e9 < cutoff and _unlink_if_there(entry.path):
            counts["temp_files"] += 1
            counts["temp_bytes"] += st.st_size


def _rmdir_if_empty(path: str) -> int:
    """Remove ``path`` if it is an empty directory (atomically, by ``os.rmdir``); return 1 if
    this call removed it, 0 if it is gone already or no longer empty."""
    try:
        os.rmdir(path)
        return 1
    except OSError as exc:
        if exc.errno in _RACE_ERRNOS:
            return 0
        raise


def _unlink_if_there(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


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
