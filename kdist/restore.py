"""The restorer: write a snapshot (or a subtree of it) into a target directory.

Everything is created relative to directory file descriptors opened with ``O_NOFOLLOW``, so no
entry, however crafted, can write outside the target: names are checked when directory objects
are decoded (no ``..``, ``/``, NUL), an existing symlink where a directory is expected is refused,
and files are created with ``O_NOFOLLOW``. Every content is authenticated as it is read. A file
that cannot be restored (a damaged or missing pack) is reported and the others still restore; a
full target disk stops the restore with its own error.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from repo_format.errors import KdistError, is_outage
from repo_format.objects import parse_object_id
from repo_format.repository import Repository

from kdist.snapshot import (
    MAX_TREE_DEPTH, TYPE_DIR, TYPE_FILE, TYPE_SYMLINK, Entry, Snapshot, check_entry_name, fewer_collections,
    read_directory,
)
from kdist.tree import Directory, TooDeep, TreeWalker

OVERWRITE_POLICIES = ("never", "always", "if-changed")
MAX_DEPTH = MAX_TREE_DEPTH  # one limit for restore and browsing (ls, diff, verify)
# Restoring a directory takes three stack frames per level (_restore_dir_contents, _restore_entry,
# _restore_dir): the interpreter must allow that many for MAX_DEPTH levels, or a deep tree would
# end in a RecursionError instead of the depth limit's clear error.
_FRAMES_NEEDED = 3 * (MAX_DEPTH + 2) + 200
INLINE_FILE_SIZE = 64 * 1024  # files up to this size are restored by the walking thread itself
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class RestoreError(KdistError):
    """The restore cannot continue (target unusable, path not in the snapshot)."""


class TargetFull(RestoreError):
    """The target disk is full."""


class TargetUnusable(RestoreError):
    """The restore target cannot be created or opened."""


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped_existing: int = 0
    errors: int = 0
    error_list: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def find_subtree(repo: Repository, snap: Snapshot, subpath: str | None) -> Entry:
    """The entry at ``subpath`` inside the snapshot (the root for ``None``)."""
    entry = Entry(name="", type=TYPE_DIR, oid=snap.root, mode=0o755)
    for part in [p for p in (subpath or "").split("/") if p and p != "."]:
        if entry.type != TYPE_DIR:
            raise RestoreError(f"{subpath!r} is not in the snapshot ({entry.name!r} is not a directory)")
        match = [e for e in read_directory(repo.objects, entry.oid) if e.name == part]
        if not match:
            raise RestoreError(f"{subpath!r} is not in the snapshot")
        entry = match[0]
    return entry


class Restorer:
    def __init__(self, repo: Repository, overwrite: str = "never", workers: int = 4,
                 progress: Callable[[RestoreStats], None] | None = None):
        if overwrite not in OVERWRITE_POLICIES:
            raise ValueError(f"overwrite policy must be one of {OVERWRITE_POLICIES}")
        self.repo = repo
        self.overwrite = overwrite
        self.workers = workers
        self.stats = RestoreStats()
        self._lock = threading.Lock()
        self._progress = progress
        self._owner = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        self._fatal: BaseException | None = None
        self._walker = TreeWalker.over(repo.objects, max_depth=MAX_DEPTH, once=False, errors="report")

    def restore(self, snap: Snapshot, target: str, subpath: str | None = None) -> RestoreStats:
        if sys.getrecursionlimit() < _FRAMES_NEEDED:  # raised once for the process, never lowered
            sys.setrecursionlimit(_FRAMES_NEEDED)
        entry = find_subtree(self.repo, snap, subpath)
        try:
            os.makedirs(target, exist_ok=True)
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise TargetUnusable(f"cannot use {target} as the restore target: {exc.strerror}") from None
        try:
            with fewer_collections(), self.repo.contents.reading_ahead(), \
                    ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kdist-restore") as pool:
                self._pool = pool
                if entry.type == TYPE_DIR:
                    self._restore_dir_contents(root_fd, entry, target, 0)
                else:  # a single file or symlink
                    fut = self._restore_entry(root_fd, entry, os.path.join(target, entry.name), 0)
                    if isinstance(fut, Future):
                        fut.result()
        finally:
            os.close(root_fd)
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _error(self, path: str, message: str) -> None:
        with self._lock:
            self.stats.errors += 1
            if len(self.stats.error_list) < 500:
                self.stats.error_list.append({"path": path, "error": message})

    def _restore_dir_contents(self, dir_fd: int, entry: Entry, path: str, depth: int) -> None:
        try:  # the walkers' rules: the depth limit, damage reported, an outage stops the restore
            d = self._walker.read(Directory(path, entry.oid, depth, None))
        except KdistError as exc:
            self._fatal = exc
            return
        if d.error is not None:
            self._error(path, str(d.error) if isinstance(d.error, TooDeep)
                        else f"cannot read directory from the repository: {d.error}")
            return
        children = d.entries
        futures = []
        for child in children:
            if self._fatal is not None:
                break
            fut = self._restore_entry(dir_fd, child, os.path.join(path, child.name), depth + 1)
            if isinstance(fut, Future):
                futures.append(fut)
        for f in futures:  # the directory fd must outlive its files' writes
            f.result()

    def _restore_entry(self, dir_fd: int, e: Entry, path: str, depth: int):
        check_entry_name(e.name)
        if e.type == TYPE_DIR:
            self._restore_dir(dir_fd, e, path, depth)
        elif e.type == TYPE_SYMLINK:
            self._restore_symlink(dir_fd, e, path)
        elif e.type == TYPE_FILE:
            if e.size <= INLINE_FILE_SIZE:  # Python work, which holds the GIL: threads only take turns
                self._guarded(self._restore_file, dir_fd, e, path)
                return None
            return self._pool.submit(self._guarded, self._restore_file, dir_fd, e, path)
        return None

    def _guarded(self, fn, *args):
        try:
            fn(*args)
        except TargetFull as exc:
            self._fatal = exc
        except KdistError as exc:
            if is_outage(exc):  # the storage failing: stop with its error, not "partial"
                self._fatal = exc
            else:
                self._error(args[-1], str(exc))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._fatal = TargetFull(f"the restore target is full (while writing {args[-1]})")
            else:
                self._error(args[-1], f"cannot restore: {exc.strerror or exc}")

    def _restore_dir(self, parent_fd: int, e: Entry, path: str, depth: int) -> None:
        try:
            os.mkdir(e.name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            self._error(path, f"cannot create directory: {exc.strerror}")
            return
        try:
            fd = os.open(e.name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            reason = "an existing symlink or file is in the way" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            self._error(path, f"refusing to restore into {path}: {reason}")
            return
        try:
            self._restore_dir_contents(fd, e, path, depth)
            with self._lock:
                self.stats.dirs += 1
            try:
                self._apply_metadata(fd, e)
            except OSError as exc:
                self._error(path, f"cannot set directory metadata: {exc.strerror}")
        finally:
            os.close(fd)

    def _restore_symlink(self, parent_fd: int, e: Entry, path: str) -> None:
        try:
            if not self._make_room(parent_fd, e, path):
                return
            os.symlink(e.target, e.name, dir_fd=parent_fd)
            if self._owner:
                os.chown(e.name, e.uid, e.gid, dir_fd=parent_fd, follow_symlinks=False)
            os.utime(e.name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            with self._lock:
                self.stats.symlinks += 1
        except OSError as exc:
            self._error(path, f"cannot restore symlink: {exc.strerror}")

    def _make_room(self, parent_fd: int, e: Entry, path: str) -> bool:
        """Whether ``e`` may be created; removes an existing non-directory when allowed."""
        try:
            st = os.stat(e.name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if statmod.S_ISDIR(st.st_mode):
            self._error(path, "a directory is in the way; not replaced")
            return False
        unchanged = e.type == TYPE_FILE and statmod.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns)
        if self.overwrite == "never" or (self.overwrite == "if-changed" and unchanged):
            with self._lock:
                self.stats.skipped_existing += 1
            return False
        os.unlink(e.name, dir_fd=parent_fd)  # removes a symlink itself, never its target
        return True

    def _restore_file(self, parent_fd: int, e: Entry, path: str) -> None:
        if not self._make_room(parent_fd, e, path):
            return
        parse_object_id(e.oid)
        fd = os.open(e.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent_fd)
        ok = False
        try:
            written = 0
            for cid, _n in self.repo.objects.chunks(e.oid):
                data = self.repo.contents.read(cid)
                if data.count(0) == len(data) and data:  # keep sparse files sparse
                    os.lseek(fd, len(data), os.SEEK_CUR)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                written += len(data)
            if written != e.size:
                raise KdistError(f"stored data has {written} bytes, the snapshot says {e.size}")
            os.ftruncate(fd, written)
            self._apply_metadata(fd, e)
            ok = True
        finally:
            os.close(fd)
            if not ok:
                try:
                    os.unlink(e.name, dir_fd=parent_fd)  # never leave a partial file looking complete
                except OSError:
                    pass
        with self._lock:
            self.stats.files += 1
            self.stats.bytes += written
        if self._progress is not None:
            self._progress(self.stats)

    def _apply_metadata(self, fd: int, e: Entry) -> None:
        if self._owner:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode & 0o7777)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
