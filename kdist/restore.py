"""The restorer: write a snapshot (or a subtree of it) into a target directory.

Everything is created relative to directory file descriptors opened with ``O_NOFOLLOW``, so no
entry, however crafted, can write outside the target: names are checked when directory objects
are decoded (no ``..``, ``/``, NUL), an existing symlink where a directory is expected is refused,
and files are created with ``O_EXCL | O_NOFOLLOW``. Every content is authenticated as it is read.
A file that cannot be restored (a damaged or missing pack) is reported and the others still
restore; a full target disk stops the restore with its own error.

Creating a file can take a millisecond or more (a directory where many files were just deleted,
NFS, a busy disk), and a thread that creates files one after the other waits for every one. But
threads that release the GIL at every system call also hand it over at every one, which costs
more than a fast create. So the walking thread reads directory objects, creates directories and
restores the small files itself in batches while that is fast, and hands the batches to a pool
of threads while it is slow (see SLOW_FILE_SECONDS); large files always go to the pool. A
directory's metadata is set once all its children exist (creating one changes its mtime), by
whichever thread finishes its last child, so the walker never waits for a directory's files; it
waits only while too many directories it has left are still open, so a tree of any width
restores within a small file-descriptor limit.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from repo_format.errors import KdistError, is_outage
from repo_format.repository import Repository

from kdist.snapshot import (
    DEVICE_TYPES, MAX_TREE_DEPTH, SPECIAL_TYPES, TYPE_BLOCK_DEVICE, TYPE_CHAR_DEVICE, TYPE_DIR, TYPE_FIFO, TYPE_FILE,
    TYPE_SOCKET, TYPE_SYMLINK, Entry, Snapshot, check_entry_name, fewer_collections, read_directory, read_listing,
)
from kdist.restore_plan import (
    ABSENT, DEFAULT_OVERWRITE, OVERWRITE_POLICIES, action, existing_state, made_node, set_metadata,
)
from kdist.tree import Directory, TooDeep, TreeWalker

MAX_DEPTH = MAX_TREE_DEPTH  # one limit for restore and browsing (ls, diff, verify)
# Files up to this size are restored in batches of up to BATCH_FILES entries of one directory (a
# task per file would cost more Python than the file itself); a larger file is a pool task alone.
SMALL_FILE_SIZE = 64 * 1024
BATCH_FILES = 48
# The walker restores batches itself while that takes under SLOW_FILE_SECONDS a file (measured
# over BATCH_FILES files or more), and hands them to the pool while it takes longer. After
# POOL_SECONDS it waits for the pool's batches to finish and measures itself again (alone: the
# pool's GIL hand-overs would slow it too); the period doubles, up to its maximum, while creating
# files stays slow. On this project's 2-core machine, 100,000 files of 1 KiB into a fresh ext4
# take ~40 us a file in the walker, and eight pool threads made that restore 12.8 s instead of
# 7.0 s; right after the same files were deleted there, ext4 (without a journal) scans past the
# just-freed inodes at every create, 0.3-1 ms a file, and the pool took the restore from 56 s
# to 31 s.
SLOW_FILE_SECONDS = 250e-6
POOL_SECONDS = (0.5, 8.0)
TASKS_PER_WORKER = 4  # how far the walker may run ahead of the pool
# Directories held open besides the walker's own path (which the depth limit bounds): those it
# has left whose files are still being written. It waits for them to finish above this.
MAX_OPEN_DIRS = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


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
    skipped_existing: int = 0  # existing files and symlinks kept: unchanged + left_different
    unchanged: int = 0  # ... that already matched the snapshot (their metadata set, but by ``never``)
    left_different: int = 0  # ... that differ from it (``never``): the restore exits 3
    special: int = 0  # fifos and devices made
    special_skipped: int = 0  # sockets, and devices when not root: recorded, not made
    hardlinks: int = 0  # files made as another link of a file restored (counted in ``files`` too)
    xattrs_skipped: int = 0  # extended attributes this user may not write (not root: all but user.* and ACLs)
    errors: int = 0
    error_list: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def root_metadata(repo: Repository, snap: Snapshot) -> Entry | None:
    """The snapshot's root directory's own metadata, if its object holds it (kdist before it
    did not store it; a damaged root gives None too: the walk reports it, as any directory)."""
    try:
        top = read_listing(repo.objects, snap.root).top
    except KdistError as exc:
        if is_outage(exc):
            raise
        return None
    if top is not None:
        top.oid = snap.root
    return top


def find_subtree(repo: Repository, snap: Snapshot, subpath: str | None) -> Entry:
    """The entry at ``subpath`` inside the snapshot (the root for ``None``: with the root
    directory's own metadata when its object holds it, else a bare 0755 one)."""
    entry = Entry(name="", type=TYPE_DIR, oid=snap.root, mode=0o755)
    if not [p for p in (subpath or "").split("/") if p and p != "."]:
        return root_metadata(repo, snap) or entry
    for part in [p for p in (subpath or "").split("/") if p and p != "."]:
        if entry.type != TYPE_DIR:
            raise RestoreError(f"{subpath!r} is not in the snapshot ({entry.name!r} is not a directory)")
        match = [e for e in read_directory(repo.objects, entry.oid) if e.name == part]
        if not match:
            raise RestoreError(f"{subpath!r} is not in the snapshot")
        entry = match[0]
    return entry


class _Dir:
    """A directory being restored. ``pending`` counts what must finish before its metadata is
    set and its fd closed: the walker's listing of it, its tasks in the pool, and its
    subdirectories. The target itself (``entry`` None) is the caller's: never set or closed."""

    __slots__ = ("fd", "entry", "path", "parent", "pending", "rel")

    def __init__(self, fd: int, entry: Entry | None, path: str, parent: "_Dir | None"):
        self.fd = fd
        self.entry = entry
        self.path = path
        self.parent = parent
        self.pending = 1
        self.rel = parent.rel + (entry.name,) if parent is not None else ()  # names from the target


WRITING, OK, FAILED = "writing", "ok", "failed"


def link_likeness(e: Entry) -> tuple:
    """What the files of one link group share (one inode): a file listed in a group but unlike
    its first file (a crafted snapshot, or two file systems giving the same device number on
    different nodes of a sharded backup) is restored with its own data, never linked."""
    return (e.oid, e.size, e.mode, e.uid, e.gid, e.mtime_ns, tuple(e.xattrs))


class _LinkGroup:
    """One link group (a device and inode of the snapshot). Its first file met is restored with
    its data (``state`` WRITING); a file of the group met meanwhile waits (``waiting``, its
    directory kept open and unsettled); once the first is restored (OK: ``ident``, its
    (st_dev, st_ino), at ``rel``/``name``) each other is linked to it at once, so a directory's
    links exist before its metadata is set. A first file not restored (FAILED: damaged data,
    left different by ``never``, something in the way) hands the data to the next one met."""

    __slots__ = ("like", "state", "rel", "name", "ident", "waiting")

    def __init__(self, like: tuple):
        self.like = like
        self.state = WRITING
        self.rel: tuple = ()
        self.name = ""
        self.ident: tuple[int, int] | None = None
        self.waiting: list[tuple["_Dir", Entry]] = []

    def holds(self, rel: tuple, name: str, ident: tuple[int, int]) -> None:
        self.rel, self.name, self.ident = rel, name, ident


class Restorer:
    def __init__(self, repo: Repository, overwrite: str = DEFAULT_OVERWRITE, workers: int = 8,
                 progress: Callable[[RestoreStats], None] | None = None):
        if overwrite not in OVERWRITE_POLICIES:
            raise ValueError(f"overwrite policy must be one of {OVERWRITE_POLICIES}")
        self.repo = repo
        self.overwrite = overwrite
        self.workers = workers
        self.stats = RestoreStats()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a task or a directory finished, or the restore stops
        self._progress = progress
        self._owner = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        self._fatal: BaseException | None = None
        self._walker = TreeWalker.over(repo.objects, max_depth=MAX_DEPTH, once=False, errors="report")
        self._open: set[_Dir] = set()  # directories opened and not finished
        self._tasks = 0  # tasks in the pool
        self._batches = 0  # of which batches of small entries (the others are files alone)
        # the walker's measure of itself (see SLOW_FILE_SECONDS): files and seconds so far, and
        # until when the pool takes the batches (0: the walker does), for how long next time
        self._timed = (0, 0.0)
        self._pool_until = 0.0
        self._pool_seconds = POOL_SECONDS[0]
        self._groups: dict[tuple[int, int], _LinkGroup] = {}  # by (dev, inode): ~200 bytes a group

    def restore(self, snap: Snapshot, target: str, subpath: str | None = None) -> RestoreStats:
        """Restore ``subpath`` of the snapshot (all of it for None) into ``target``. A directory
        restored into a target this creates gives the target its mode, owner, attributes and
        times; an existing target keeps its own (it may be /tmp, or the original place)."""
        if [p for p in (subpath or "").split("/") if p and p != "."]:
            entry = find_subtree(self.repo, snap, subpath)
            top = entry if entry.type == TYPE_DIR else None  # a subdirectory's own entry
        else:  # the root's own metadata, if its object holds it (one read of the root here)
            top = root_metadata(self.repo, snap)
            entry = top or Entry(name="", type=TYPE_DIR, oid=snap.root, mode=0o755)
        try:
            created = not os.path.lexists(target)
            os.makedirs(target, exist_ok=True)
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise TargetUnusable(f"cannot use {target} as the restore target: {exc.strerror}") from None
        if created:  # made here: a real directory, unless someone put a symlink in its place since
            try:
                os.close(os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))
                created = os.path.samestat(os.stat(root_fd), os.lstat(target))
            except OSError:
                created = False
        root = _Dir(root_fd, None, target, None)
        self._root_fd = root_fd
        try:
            with fewer_collections(), self.repo.contents.reading_ahead(), \
                    ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kdist-restore") as pool:
                self._pool = pool
                try:
                    if entry.type == TYPE_DIR:
                        self._walk(root, entry)
                    elif entry.type in (TYPE_FILE, TYPE_SYMLINK) or entry.type in SPECIAL_TYPES:  # one entry alone
                        check_entry_name(entry.name)
                        self._submit(root, [entry], "alone")
                except BaseException as exc:
                    self._stop(exc)  # the batches still queued skip their files: the pool's exit waits for them
                    raise
            if self._fatal is None and created and top is not None:
                self._settle(root_fd, top, target)
        finally:
            for d in self._open:  # left by a restore that stopped: no metadata, just closed
                os.close(d.fd)
            self._open.clear()
            os.close(root_fd)
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _stop(self, exc: BaseException) -> None:
        """Stop the restore with ``exc`` (the first such error wins); wakes a waiting walker."""
        with self._changed:
            if self._fatal is None:
                self._fatal = exc
            self._changed.notify_all()

    def _error(self, path: str, message: str) -> None:
        with self._lock:
            self.stats.errors += 1
            if len(self.stats.error_list) < 500:
                self.stats.error_list.append({"path": path, "error": message})

    def _failed(self, path: str, exc: KdistError | OSError, what: str) -> None:
        """One entry could not be restored: reported, unless the storage or the target failed as a
        whole, which stops the restore."""
        if isinstance(exc, KdistError):
            if is_outage(exc):  # the storage failing: stop with its error, not "partial"
                self._stop(exc)
            else:
                self._error(path, str(exc))
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._stop(TargetFull(f"the restore target is full (while writing {path})"))
        else:
            self._error(path, f"{what}: {exc.strerror or exc}")

    # ---- the walking thread ----------------------------------------------------------------

    def _walk(self, root: _Dir, entry: Entry) -> None:
        """Depth first with one stack (a deep tree cannot exhaust the interpreter's): each
        directory is created, opened and listed, its files restored or handed to the pool, then
        its subdirectories are walked; it is finished by whoever finishes its last child."""
        stack: list[tuple[_Dir, Entry, int]] = []
        self._list(root, entry, 0, stack)
        while stack and self._fatal is None:
            parent, e, depth = stack.pop()
            d = self._open_dir(parent, e, depth)
            if d is None:
                self._release(parent)
            else:
                self._list(d, e, depth, stack)

    def _open_dir(self, parent: _Dir, e: Entry, depth: int) -> _Dir | None:
        path = os.path.join(parent.path, e.name)
        with self._changed:  # its depth - 1 ancestors are open: count only the directories left behind
            while len(self._open) - (depth - 1) >= MAX_OPEN_DIRS and self._fatal is None:
                self._changed.wait()
        if self._fatal is not None:
            return None
        try:
            os.mkdir(e.name, 0o700, dir_fd=parent.fd)
        except FileExistsError:
            pass
        except OSError as exc:
            self._failed(path, exc, "cannot create directory")
            return None
        try:
            fd = os.open(e.name, _DIR_FLAGS, dir_fd=parent.fd)
        except OSError as exc:
            reason = "an existing symlink or file is in the way" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            self._error(path, f"refusing to restore into {path}: {reason}")
            return None
        d = _Dir(fd, e, path, parent)
        with self._lock:
            self._open.add(d)
        return d

    def _list(self, d: _Dir, entry: Entry, depth: int, stack: list) -> None:
        """Restore or hand out the entries of the directory ``d`` (subdirectories onto
        ``stack``), then let go of it."""
        try:  # the walkers' rules: the depth limit, damage reported, an outage stops the restore
            listing = self._walker.read(Directory(d.path, entry.oid, depth, None))
        except KdistError as exc:
            self._stop(exc)
            listing = None
        if listing is not None and listing.error is not None:
            self._error(d.path, str(listing.error) if isinstance(listing.error, TooDeep)
                        else f"cannot read directory from the repository: {listing.error}")
        elif listing is not None:
            batch: list[Entry] = []
            subdirs = []
            for child in listing.entries:
                check_entry_name(child.name)
                if child.type == TYPE_DIR:
                    subdirs.append(child)
                elif child.type == TYPE_FILE and child.size > SMALL_FILE_SIZE:
                    self._submit(d, [child], "alone")
                elif child.type in (TYPE_FILE, TYPE_SYMLINK) or child.type in SPECIAL_TYPES:
                    batch.append(child)
                    if len(batch) == BATCH_FILES:
                        self._hand_out(d, batch)
                        batch = []
            if batch:
                self._hand_out(d, batch)
            with self._lock:
                d.pending += len(subdirs)
            stack.extend((d, child, depth + 1) for child in reversed(subdirs))
        self._release(d)

    def _hand_out(self, d: _Dir, batch: list[Entry]) -> None:
        """Restore a batch of small entries here, or in the pool while creating files is slow."""
        if self._pool_until:
            if time.monotonic() < self._pool_until:
                self._submit(d, batch, "batch")
                return
            with self._changed:  # time to measure again, alone
                while self._batches and self._fatal is None:
                    self._changed.wait()
            self._pool_until = 0.0
        with self._lock:
            d.pending += 1
        start = time.perf_counter()
        self._restore_batch(d, batch, "walker")
        files, seconds = self._timed[0] + len(batch), self._timed[1] + time.perf_counter() - start
        if files < BATCH_FILES:
            self._timed = (files, seconds)
            return
        self._timed = (0, 0.0)
        if seconds > SLOW_FILE_SECONDS * files:
            self._pool_until = time.monotonic() + self._pool_seconds
            self._pool_seconds = min(2 * self._pool_seconds, POOL_SECONDS[1])
        else:
            self._pool_seconds = POOL_SECONDS[0]

    def _submit(self, d: _Dir, batch: list[Entry], lane: str) -> None:
        with self._changed:
            while self._tasks >= TASKS_PER_WORKER * self.workers and self._fatal is None:
                self._changed.wait()
            if self._fatal is not None:
                return
            self._tasks += 1
            if lane == "batch":
                self._batches += 1
            d.pending += 1
        self._pool.submit(self._restore_batch, d, batch, lane)

    def _release(self, d: _Dir, files: int = 0, nbytes: int = 0, symlinks: int = 0, lane: str = "walker") -> None:
        """One thing ``d`` waited for is done (with what it restored; ``lane``: who restored
        it); finish every directory this leaves with nothing pending, from ``d`` upwards. Each
        reaches zero exactly once, so exactly one thread finishes it."""
        with self._changed:
            self.stats.files += files
            self.stats.bytes += nbytes
            self.stats.symlinks += symlinks
            if lane not in ("walker", "link"):  # (a file that waited for its link group's first: no task)
                self._tasks -= 1
            if lane == "batch":
                self._batches -= 1
            d.pending -= 1
            finished = d.pending == 0 and d.entry is not None
            self._changed.notify_all()
        while finished:
            try:  # post-order: every child exists, so nothing changes its mtime after this
                self._settle(d.fd, d.entry, d.path)
            finally:
                with self._lock:  # closed here, whatever happened: never again by restore()
                    self._open.discard(d)
                os.close(d.fd)
            with self._changed:
                self.stats.dirs += 1
                d = d.parent
                d.pending -= 1
                finished = d.pending == 0 and d.entry is not None
                self._changed.notify_all()

    # ---- restoring files and symlinks (the walker or the pool) -------------------------------

    def _restore_batch(self, d: _Dir, batch: list[Entry], lane: str) -> None:
        try:
            files, nbytes, symlinks = self._restore_entries(d, batch)
            self._release(d, files, nbytes, symlinks, lane)
            if files and self._progress is not None:
                self._progress(self.stats)
        except BaseException as exc:  # a bug: the restore raises it, rather than lose it in a thread
            self._stop(exc)

    def _restore_entries(self, d: _Dir, batch: list[Entry]) -> tuple[int, int, int]:
        """Files and symlinks restored, bytes written."""
        files = nbytes = symlinks = 0
        for e in batch:
            if self._fatal is not None:
                break
            try:
                if e.type == TYPE_FILE and e.dev:  # one of a link group
                    done = self._restore_member(d, e)
                    if done is not None:
                        files += done[0]
                        nbytes += done[1]
                elif e.type == TYPE_FILE:
                    written = self._restore_file(d, e)
                    if written is not None:
                        files += 1
                        nbytes += written
                elif e.type == TYPE_SYMLINK:
                    symlinks += self._restore_symlink(d, e)
                else:
                    self._restore_special(d, e)
            except (KdistError, OSError) as exc:
                self._failed(os.path.join(d.path, e.name), exc, {TYPE_FILE: "cannot restore", TYPE_SYMLINK:
                             "cannot restore symlink"}.get(e.type, "cannot restore special file"))
        return files, nbytes, symlinks

    def _make_room(self, d: _Dir, e: Entry, group: _LinkGroup | None = None) -> bool:
        """Whether ``e`` is to be created where something exists, which is then removed. What
        the policy keeps that has the entry's bytes but not its metadata gets it, through the
        very node compared (``kdist.restore_plan.existing_state``). A file kept because it
        matches is what its link ``group`` holds (the node compared, by device and inode)."""
        settled: list = []
        ident: list = []
        state = existing_state(self.repo, d.fd, e, self._owner, compare=self.overwrite != "always",
                               settle=self.overwrite == "if-changed", outcome=settled, identity=ident)
        for got in settled:
            self._metadata_outcome(os.path.join(d.path, e.name), got)
        if state == ABSENT:
            return True
        what = action(state, self.overwrite)
        if what == "blocked":
            self._error(os.path.join(d.path, e.name), "a directory is in the way; not replaced")
            return False
        if what in ("keep", "left"):
            with self._lock:
                self.stats.skipped_existing += 1
                if what == "keep":
                    self.stats.unchanged += 1
                else:
                    self.stats.left_different += 1
            if group is not None and what == "keep" and ident:
                group.holds(d.rel, e.name, ident[0])
            return False
        os.unlink(e.name, dir_fd=d.fd)  # removes a symlink itself, never its target
        return True

    def _metadata_outcome(self, path: str, outcome: tuple[int, list[str]]) -> None:
        """What ``set_metadata`` could not do: attributes skipped (counted) or failed (reported)."""
        skipped, failed = outcome
        if skipped:
            with self._lock:
                self.stats.xattrs_skipped += skipped
        for message in failed:
            self._error(path, message)

    def _settle(self, fd: int, e: Entry, path: str) -> None:
        """A directory's metadata, once everything in it is made."""
        try:
            self._metadata_outcome(path, set_metadata(fd, e, self._owner))
        except OSError as exc:
            self._error(path, f"cannot set directory metadata: {exc.strerror}")

    def _restore_symlink(self, d: _Dir, e: Entry) -> bool:
        try:
            os.symlink(e.target, e.name, dir_fd=d.fd)
        except FileExistsError:  # the overwrite policy is asked only then, not with a stat per entry
            if not self._make_room(d, e):
                return False
            os.symlink(e.target, e.name, dir_fd=d.fd)
        self._metadata_outcome(os.path.join(d.path, e.name), made_node(d.fd, e, self._owner))
        return True

    def _restore_special(self, d: _Dir, e: Entry) -> None:
        """A fifo is made again, a device too when running as root; a socket is not (the program
        that listens makes it: a file in its place would be in the way), nor a device without
        root: both are counted in ``special_skipped``."""
        if e.type == TYPE_SOCKET or (e.type in DEVICE_TYPES and not self._owner):
            with self._lock:
                self.stats.special_skipped += 1
            return
        kind = {TYPE_FIFO: statmod.S_IFIFO, TYPE_CHAR_DEVICE: statmod.S_IFCHR, TYPE_BLOCK_DEVICE: statmod.S_IFBLK}[e.type]
        try:
            os.mknod(e.name, kind | 0o600, e.rdev, dir_fd=d.fd)
        except FileExistsError:
            if not self._make_room(d, e):
                return
            os.mknod(e.name, kind | 0o600, e.rdev, dir_fd=d.fd)
        self._metadata_outcome(os.path.join(d.path, e.name), made_node(d.fd, e, self._owner))
        with self._lock:
            self.stats.special += 1

    def _restore_file(self, d: _Dir, e: Entry, group: _LinkGroup | None = None) -> int | None:
        """The bytes written, or None where an existing file stays. A file written, or kept
        because it matches, is what its link ``group`` holds."""
        chunks = self.repo.objects.chunks(e.oid)  # a malformed id is refused before anything is created
        try:
            fd = os.open(e.name, _FILE_FLAGS, 0o600, dir_fd=d.fd)
        except FileExistsError:  # the overwrite policy is asked only then, not with a stat per file
            if not self._make_room(d, e, group):
                return None
            fd = os.open(e.name, _FILE_FLAGS, 0o600, dir_fd=d.fd)
        ok = False
        try:
            written = 0
            hole = False
            for cid, n in chunks:
                if cid is None:  # a hole of the snapshot's file: a hole here too
                    os.lseek(fd, n, os.SEEK_CUR)
                    written += n
                    hole = True
                    continue
                data = self.repo.contents.read(cid)
                hole = data.count(0) == len(data) and bool(data)
                if hole:  # keep sparse files sparse
                    os.lseek(fd, len(data), os.SEEK_CUR)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                written += len(data)
            if written != e.size:
                raise KdistError(f"stored data has {written} bytes, the snapshot says {e.size}")
            if hole:  # a seek alone does not make the file longer
                os.ftruncate(fd, written)
            outcome = set_metadata(fd, e, self._owner)
            st = os.fstat(fd)
            ok = True
        finally:
            os.close(fd)
            if not ok:
                try:
                    os.unlink(e.name, dir_fd=d.fd)  # never leave a partial file looking complete
                except OSError:
                    pass
        self._metadata_outcome(os.path.join(d.path, e.name), outcome)
        if group is not None:
            group.holds(d.rel, e.name, (st.st_dev, st.st_ino))
        return written

    # ---- hard links --------------------------------------------------------------------------

    def _restore_member(self, d: _Dir, e: Entry, waited: bool = False) -> tuple[int, int] | None:
        """Restore a file of a link group (``_LinkGroup``): its data if it is the group's first
        (or unlike it), a link to the first if that is restored; or wait for the first (None:
        ``d`` stays pending, and is released once this file is done). Returns (files, bytes).
        ``waited``: it waited already (its directory's pending count holds it)."""
        key = (e.dev, e.inode)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _LinkGroup(link_likeness(e))
                first = True
            elif group.like != link_likeness(e):
                group, first = None, False
            elif group.state == WRITING:
                group.waiting.append((d, e))
                if not waited:
                    d.pending += 1
                return None
            else:
                first = group.state == FAILED
                if first:
                    group.state = WRITING
        if group is None:  # listed in the group, unlike its first file: its own data
            written = self._restore_file(d, e)
            return (1, written) if written is not None else (0, 0)
        if not first:
            return self._link(group, d, e)
        written = None
        try:
            group.ident = None
            written = self._restore_file(d, e, group)
        finally:
            with self._lock:
                group.state = OK if group.ident is not None else FAILED
                waiting, group.waiting = group.waiting, []
            for wd, we in waiting:  # their directories are open: they waited for this file
                self._serve(wd, we)
        return (1, written) if written is not None else (0, 0)

    def _serve(self, d: _Dir, e: Entry) -> None:
        """Restore a file that waited for its group's first, and release its directory."""
        done = (0, 0)
        if self._fatal is not None:  # the restore stops: only let go of the directory
            self._release(d, lane="link")
            return
        try:
            got = self._restore_member(d, e, waited=True)
            if got is None:  # waiting again (the first failed and another file took over): not yet
                return
            done = got
        except (KdistError, OSError) as exc:
            self._failed(os.path.join(d.path, e.name), exc, "cannot restore")
        self._release(d, files=done[0], nbytes=done[1], lane="link")

    def _link(self, group: _LinkGroup, d: _Dir, e: Entry) -> tuple[int, int]:
        """Make ``e.name`` in ``d`` a link to the group's restored file: that very inode, opened
        again without following anything and checked by device and inode, linked through its
        descriptor (a name swapped meanwhile links nothing else). What is in the way is dealt
        with as the overwrite policy says (the same inode already: kept). If the group's file is
        gone, this one is restored with the data and holds the group from now on. Returns
        (files, bytes) made."""
        path = os.path.join(d.path, e.name)
        src = self._open_held(group)
        if src is None:
            written = self._restore_file(d, e, group)
            return (1, written) if written is not None else (0, 0)
        try:
            try:
                st = os.stat(e.name, dir_fd=d.fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if (st.st_dev, st.st_ino) == group.ident:
                    with self._lock:
                        self.stats.skipped_existing += 1
                        self.stats.unchanged += 1
                    return 0, 0
                if statmod.S_ISDIR(st.st_mode):
                    self._error(path, "a directory is in the way; not replaced")
                    return 0, 0
                if self.overwrite == "never":
                    with self._lock:
                        self.stats.skipped_existing += 1
                        self.stats.left_different += 1
                    return 0, 0
                os.unlink(e.name, dir_fd=d.fd)
            os.link(f"/proc/self/fd/{src}", e.name, dst_dir_fd=d.fd, follow_symlinks=True)
        finally:
            os.close(src)
        with self._lock:
            self.stats.hardlinks += 1
        return 1, 0

    def _open_held(self, group: _LinkGroup) -> int | None:
        """An ``O_PATH`` descriptor of the file the group holds, opened from the target name by
        name without following symlinks and checked to be that inode; None if it is not there."""
        fd = self._root_fd
        try:
            for name in group.rel:
                sub = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                if fd != self._root_fd:
                    os.close(fd)
                fd = sub
            node = os.open(group.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:
            return None
        finally:
            if fd != self._root_fd:
                os.close(fd)
        st = os.fstat(node)
        if not statmod.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != group.ident:
            os.close(node)
            return None
        return node
