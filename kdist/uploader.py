"""The uploader: back up a directory tree into a repository as one snapshot.

Walks the tree in the calling thread and hands changed files to a bounded pool of threads that
read, chunk, hash, compress, encrypt and pack them (the native stages release the GIL, so two
threads keep two cores busy). Unchanged files (same size, mtime, ctime and inode as in the
previous snapshot of the same source) are reused without being read. Directory objects are
written bottom-up once their children are done; packs and index are flushed before the manifest
(ordering rule 1). Every ``checkpoint_interval`` seconds a checkpoint manifest makes the finished
part reachable. Unreadable files are recorded and skipped; a file that changes while read is
reported. The uploader never deletes anything.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import operator
import os
import stat as statmod
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Callable

from repo_format import clock
from repo_format.content import ContentLost
from repo_format.errors import KdistError, is_outage
from repo_format.repository import Repository

from kdist.snapshot import (
    DEVICE_TYPES, DRIVER_LABEL, ENTRY_FIELDS, TYPE_BLOCK_DEVICE, TYPE_CHAR_DEVICE, TYPE_DIR, TYPE_FIFO, TYPE_FILE,
    TYPE_SOCKET, TYPE_SYMLINK, Entry, Snapshot, Source, backup_host, check_entry_name,
    PARTIAL_LABEL, Listing, encode_directory, fewer_collections, previous_root, read_listing,
)

IGNORE_FILE = ".kdistignore"
MAX_REPORTED_ERRORS = 500
# Files no larger than the chunker's minimum chunk are one chunk each: they are read whole, in
# one call. Those up to BATCH_FILE_SIZE are handed to one thread of their own in batches of up to
# BATCH_FILES files or BATCH_BYTES bytes: their cost is Python work per file, which holds the GIL,
# so more threads on them only take turns (measured slower), and one task per batch, not per
# file. Larger files keep the pool's threads busy with native work that releases the GIL.
BATCH_FILE_SIZE = 64 * 1024
BATCH_FILES = 64
BATCH_BYTES = 4 * 1024 * 1024
# Files that look unchanged are checked against the index this many at a time: one vectorised
# search per index blob for the batch (per file, it was a second per 200,000 index entries).
REUSE_BATCH = 4096


class SourceError(KdistError):
    """The backup source cannot be used at all (missing, not a directory)."""


class ReadFailed(Exception):
    """A source file could not be read; the message is what the backup reports for it."""


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
_NOATIME = getattr(os, "O_NOATIME", 0)


_EUID = os.geteuid() if hasattr(os, "geteuid") else -1


def open_source(path: str, owner: int | None = None) -> int:
    """A descriptor for reading ``path``, never through a symlink and, where allowed, without
    updating its access time. O_NOATIME needs ownership (or root's CAP_FOWNER): for a file the
    walk saw owned by ``owner``, someone else's, it is not tried (a failed open per file)."""
    if _NOATIME and (owner is None or _EUID in (0, owner)):
        try:
            return os.open(path, _OPEN_FLAGS | _NOATIME)
        except PermissionError:  # not allowed after all (another owner, no capability): retry without
            pass
        except OSError as exc:
            raise ReadFailed(f"cannot read file: {exc.strerror}") from None
    try:
        return os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ReadFailed(f"cannot read file: {exc.strerror}") from None


def read_whole(path: str, size: int, owner: int | None = None) -> tuple[bytes, os.stat_result] | None:
    """The bytes of a file the walk saw ``size`` bytes long and its stat after the read, or None
    if it has grown since. Reads of at most ``size + 1`` bytes in all (a larger buffer than
    needed costs an mmap per file): one, unless the file system returns short reads (NFS, FUSE,
    a signal), when it reads on to the end."""
    fd = open_source(path, owner)
    try:
        data = os.read(fd, size + 1)
        while 0 < len(data) <= size:  # usually one read: a short one may just be short
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > size:
            return None
        return data, os.fstat(fd)
    except OSError as exc:
        raise ReadFailed(f"error while reading file: {exc.strerror}") from None
    finally:
        os.close(fd)


@dataclass
class BackupOptions:
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    checkpoint_interval: float = 1800.0  # seconds; 0 disables checkpoints
    workers: int = max(2, os.cpu_count() or 2)
    tags: list[str] = field(default_factory=list)
    description: str = ""
    reuse_previous: bool = True
    host: str = ""  # the snapshot's host name; "" is this machine's (a host key's host: its own)
    # --files-from: absolute paths under the backed-up directory; only they (a directory with all
    # it holds) and the directories on the way to them are backed up. None: everything.
    files: list[str] | None = None


@dataclass
class BackupStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    files_read: int = 0
    bytes_read: int = 0
    files_reused: int = 0
    new_bytes: int = 0
    errors: int = 0
    skipped: int = 0
    special: int = 0  # fifos, sockets and devices recorded
    checkpoints: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DirNode:
    """A directory being built: its entry, and its children in name order (entries, futures of
    entries, or directories being built). ``same``: the walk found exactly the previous
    snapshot's children, each with the same metadata (files still to be confirmed reusable):
    if they all are, the previous directory object is this one (``reused``), not written again."""

    entry: Entry
    children: list = field(default_factory=list)  # Entry | DirNode | PENDING (Entry | None)
    prev_oid: str | None = None
    same: bool = False
    reused: bool = False
    # a snapshot's root: its object also holds its own metadata (``encode_directory``'s top),
    # and ``prev_top`` is the previous root's, which it must equal to be reused
    top: bool = False
    prev_top: Entry | None = None
    complete: bool = True  # its entries say all of each node's attributes and links (Listing.complete)


class _Batch:
    """Small files read together by one pool task; ``future`` is set once it is submitted."""

    __slots__ = ("items", "bytes", "future")

    def __init__(self):
        self.items: list[tuple[str, Entry]] = []
        self.bytes = 0
        self.future: Future | None = None


class _Slot:
    """A directory's child that is one file of a batch: ``done()`` and ``result()`` like a Future."""

    __slots__ = ("batch", "i")

    def __init__(self, batch: _Batch, i: int):
        self.batch, self.i = batch, i

    def done(self) -> bool:
        return self.batch.future is not None and self.batch.future.done()

    def result(self) -> Entry | None:
        return self.batch.future.result()[self.i]


class _Reuse:
    """A directory's child that is a file which looks unchanged: ``value`` once its previous
    content is known to be live (``Uploader._resolve_reuse``), else ``future``, its read."""

    __slots__ = ("path", "entry", "oid", "cid", "value", "future")

    def __init__(self, path: str, entry: Entry, oid: str, cid: bytes):
        self.path, self.entry, self.oid, self.cid = path, entry, oid, cid
        self.value: Entry | None = None
        self.future = None

    def done(self) -> bool:
        return self.value is not None or (self.future is not None and self.future.done())

    def result(self) -> Entry | None:
        return self.value if self.value is not None else self.future.result()


PENDING = (Future, _Slot, _Reuse)  # children of a DirNode still being read or decided

# every field of an entry but what is computed from its contents (object id, directory summary)
_metadata = operator.attrgetter(*(f for f in ENTRY_FIELDS if f not in ("oid", "summary")))


def _same_metadata(entry: Entry, old: Entry | None) -> bool:
    return old is not None and _metadata(entry) == _metadata(old)


def _same_file(st: os.stat_result, old: Entry) -> bool:
    """Whether a file's stat gives exactly the previous entry's metadata (what ``make_entry``
    would make of it), without making an entry: the unchanged re-run's common case. Extended
    attributes are not read: changing them changes the ctime. The previous entry must come from
    a complete listing (``Listing.complete``: its writer recorded attributes and links)."""
    return (old.type == TYPE_FILE and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.inode == st.st_ino and old.mode == statmod.S_IMODE(st.st_mode)
            and old.uid == st.st_uid and old.gid == st.st_gid and old.nlink == st.st_nlink
            and old.dev == (st.st_dev if st.st_nlink > 1 else 0)
            and old.user == _user(st.st_uid) and old.group == _group(st.st_gid))


def _special_kind(st: os.stat_result) -> str | None:
    """The entry type of a fifo, socket or device, or None for another kind."""
    mode = st.st_mode
    return (TYPE_FIFO if statmod.S_ISFIFO(mode) else TYPE_SOCKET if statmod.S_ISSOCK(mode)
            else TYPE_CHAR_DEVICE if statmod.S_ISCHR(mode) else TYPE_BLOCK_DEVICE if statmod.S_ISBLK(mode) else None)


_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.ENODATA)


def read_xattrs(path: str, on_error: Callable[[str, str], None], follow: bool = False) -> list[tuple[bytes, bytes]]:
    """The extended attributes of ``path`` itself (a symlink's target only with ``follow``) that
    this user can read, as sorted (name, value) pairs: ACLs (``system.posix_acl_*``) and file
    capabilities (``security.capability``) among them. A file system without them has none; one
    that cannot be read is reported and the others are kept."""
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno not in _NO_XATTRS:
            on_error(path, f"cannot list extended attributes: {exc.strerror}")
        return []
    pairs = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed since it was listed
                on_error(path, f"cannot read extended attribute {name}: {exc.strerror}")
    pairs.sort()
    return pairs


def make_entry(path: str, name: str, st: os.stat_result, etype: str,
               on_error: Callable[[str, str], None], follow: bool = False) -> Entry:
    """The entry of what the walk found at ``path``: its stat, its extended attributes, and for
    a file of several links the device that, with the inode, names its link group. ``follow``:
    ``path`` may be a symlink to it (a backup's root, which ``stat_source`` follows). An entry
    whose attributes could not all be read has no ctime, so that the next backup reads them
    again rather than take this entry for unchanged."""
    entry = _entry_from_stat(name, st, etype)
    if etype in DEVICE_TYPES:
        entry.rdev = st.st_rdev
    elif etype == TYPE_FILE and st.st_nlink > 1:
        entry.dev = st.st_dev
    failed = []

    def report(p: str, message: str) -> None:
        failed.append(message)
        on_error(p, message)

    entry.xattrs = read_xattrs(path, report, follow)
    if failed:
        entry.ctime_ns = 0
    return entry


def _entry_from_stat(name: str, st: os.stat_result, etype: str) -> Entry:
    return Entry(
        name=name, type=etype, mode=statmod.S_IMODE(st.st_mode), size=st.st_size if etype == TYPE_FILE else 0,
        mtime_ns=st.st_mtime_ns, uid=st.st_uid, gid=st.st_gid, user=_user(st.st_uid), group=_group(st.st_gid),
        inode=st.st_ino, ctime_ns=st.st_ctime_ns, nlink=st.st_nlink,
    )


class Selection:
    """What ``--files-from`` lists under a backup's root: each listed path is backed up whole,
    and the directories on the way to one are walked for it alone (a file on the way is not
    listed, so left out). Remembers what the walk met, so that a listed path it did not is
    reported."""

    def __init__(self, root: str, paths: list[str]):
        self.listed = {os.path.normpath(p) for p in paths}
        self.on_the_way: set[str] = set()
        for p in self.listed:
            while p != root and p != os.path.dirname(p):
                p = os.path.dirname(p)
                self.on_the_way.add(p)
        self.met: set[str] = set()

    def verdict(self, path: str) -> str | None:
        """``"whole"`` for a listed path, ``"walk"`` for a directory on the way to one, else None."""
        if path in self.listed:
            self.met.add(path)
            return "whole"
        return "walk" if path in self.on_the_way else None

    def missing(self) -> list[tuple[str, str]]:
        """Each listed path the walk did not back up, and why (one that exists below a listed
        directory was backed up with it)."""
        def inside_met(p: str) -> bool:
            while p != os.path.dirname(p):
                p = os.path.dirname(p)
                if p in self.met:
                    return True
            return False

        return [(p, "listed in --files-from, but excluded, or not below a directory" if os.path.lexists(p)
                 else "listed in --files-from, but it does not exist")
                for p in sorted(self.listed - self.met) if not (os.path.lexists(p) and inside_met(p))]


@dataclass
class TreePart:
    """One unit of a sharded backup: the directory ``path`` as a whole (``names`` None), or the
    given ``names`` in it (files, symlinks and whole subdirectories). ``patterns`` are the excludes in effect where the part's
    entries are looked up (for a whole directory: in its parent), ``prev_oid`` the directory's
    object in the previous snapshot, for reusing unchanged files."""

    path: str
    names: list[str] | None = None
    patterns: list[str] = field(default_factory=list)
    prev_oid: str | None = None
    est_bytes: int = 0
    est_files: int = 0


def stat_source(path: str) -> tuple[str, os.stat_result]:
    root_path = os.path.abspath(path)
    try:
        st = os.stat(root_path)
    except OSError as exc:
        raise SourceError(f"cannot back up {root_path}: {exc.strerror}") from None
    if not statmod.S_ISDIR(st.st_mode):
        raise SourceError(f"cannot back up {root_path}: not a directory")
    return root_path, st


def is_excluded(path: str, name: str, root: str, patterns: list[str]) -> bool:
    """The ignore file itself, or a name or path (relative to the backup root) that matches."""
    if name == IGNORE_FILE:
        return True
    if not patterns:
        return False
    rel = os.path.relpath(path, root)
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) or fnmatch.fnmatch("/" + rel, p)
               for p in patterns)


def ignore_patterns(path: str, on_error: Callable[[str, str], None]) -> list[str]:
    """The patterns of the directory's ``.kdistignore``, if it has one."""
    try:
        with open(os.path.join(path, IGNORE_FILE), encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        on_error(os.path.join(path, IGNORE_FILE), f"cannot read ignore file: {exc}")
        return []


@functools.lru_cache(maxsize=4096)
def _user(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return ""


@functools.lru_cache(maxsize=4096)
def _group(gid: int) -> str:
    try:
        import grp
        return grp.getgrgid(gid).gr_name
    except (KeyError, ImportError):
        return ""


class Uploader:
    def __init__(self, repo: Repository, options: BackupOptions | None = None,
                 progress: Callable[[BackupStats, str], None] | None = None):
        self.repo = repo
        self.options = options or BackupOptions()
        self.stats = BackupStats()
        self.error_list: list[dict] = []
        self._progress = progress
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._slots = threading.BoundedSemaphore(self.options.workers * 4)
        self._checkpoint_ids: list[str] = []
        self._batch = _Batch()
        self._reuse: list[_Reuse] = []

    # ---- public --------------------------------------------------------------------------
    def backup(self, path: str, source: Source | None = None) -> Snapshot:
        root_path, st = stat_source(path)
        self._begin(source or Source.local(root_path, self.options.host), st.st_dev)
        previous = self._previous_root()
        self._root = DirNode(make_entry(root_path, "", st, TYPE_DIR, self._error, follow=True), top=True)
        files = self.options.files
        self._selection = Selection(root_path, files) if files is not None else None
        whole = self._selection is None or self._selection.verdict(root_path) == "whole"
        # the previous snapshot's directory objects lie together in metadata packs: read ahead
        with self.repo.contents.reading_ahead() if previous else contextlib.nullcontext():
            self._run(lambda: self._walk(root_path, self._root, previous, list(self.options.excludes), whole))
        for missing, why in self._selection.missing() if self._selection is not None else ():
            self._error(missing, why)
        root_entry = self._write_tree(self._root, final=True)
        snap = self._publish(root_entry, checkpoint=False)
        if self._checkpoint_ids:
            self.repo.manifests.delete(self._checkpoint_ids)  # the final snapshot supersedes them
        return snap

    def backup_part(self, part: "TreePart", source: Source, root_dev: int, run: str,
                    driver: str = "") -> tuple[list[Entry], str]:
        """Back up one part of a tree whose snapshot another process assembles (the sharded
        backup, ``kdist.distributed``, and ``kdist.processes``): a whole directory, or some
        names of one.

        Returns the entries made (the directory's entry, or one per name, in name order) and the
        id of a checkpoint manifest whose tree holds them: it keeps what they refer to reachable
        for maintenance until the whole snapshot is published, whatever happens to this process.
        ``source`` is the whole tree's, so excludes match as they do in a single-process backup.
        ``driver``: the session of the process that will publish the snapshot (its label on the
        checkpoint: maintenance keeps the checkpoint while that session is live).
        """
        self._begin(source, root_dev, run, driver)
        if part.names is None:
            try:
                st = os.stat(part.path, follow_symlinks=False)
            except OSError as exc:
                raise SourceError(f"cannot back up {part.path}: {exc.strerror}") from None
            self._root = DirNode(make_entry(part.path, os.path.basename(part.path), st, TYPE_DIR, self._error))
            self._run(lambda: self._walk(part.path, self._root, part.prev_oid, list(part.patterns)))
            made = self._write_tree(self._root, final=True)
            holder, entries = made, [made]
        else:
            self._root = DirNode(Entry(name="", type=TYPE_DIR))  # only a holder for the checkpoint
            self._run(lambda: self._add_names(part))
            holder = self._write_tree(self._root, final=True)
            entries = []
            for c in self._root.children:
                c = c.result() if isinstance(c, PENDING) else c.entry if isinstance(c, DirNode) else c
                if c is not None:
                    entries.append(c)
        snap = self._publish(holder, checkpoint=True)
        if self._checkpoint_ids:
            self.repo.manifests.delete(self._checkpoint_ids)
        return entries, snap.id

    def publish_tree(self, source: Source, root: DirNode, parts_stats: BackupStats, parts_errors: list[dict],
                     start: float) -> Snapshot:
        """Write the directories of ``root`` whose children were backed up elsewhere (the parts of
        a sharded backup, which began at ``start``) and publish the snapshot, with the parts'
        totals and errors added."""
        self._begin(source, 0)
        self._start = start
        self.stats = parts_stats
        self.error_list = list(parts_errors)[:MAX_REPORTED_ERRORS]
        self._new_bytes_base -= parts_stats.new_bytes  # the parts' new bytes plus ours
        root.top = True
        return self._publish(self._write_tree(root, final=True), checkpoint=False)

    # ---- walking -------------------------------------------------------------------------
    def _begin(self, source: Source, root_dev: int, run: str = "", driver: str = "") -> None:
        backup_host(self.repo.identity, source.host)  # a host key publishes only as its own host
        # Maintenance assumes a checkpoint at least every safety.checkpoint_interval (gc/README.md):
        # reused files are protected by being in a published tree, so never checkpoint less often.
        limit = self.repo.contents.safety.checkpoint_interval
        if limit > 0 and not 0 < self.options.checkpoint_interval <= limit:
            self.options.checkpoint_interval = limit
        self._source = source
        self._root_dev = root_dev
        self._run_id = run
        self._driver = driver
        self._start = clock.now()
        self._last_checkpoint = clock.monotonic()
        self._new_bytes_base = self.repo.contents.stats.bytes_original
        self._futures = []
        self._selection = None
        self._checkpoint_ids = []
        self._batch = _Batch()
        self._reuse: list[_Reuse] = []
        # (format 3: this host's trees converge under its tree key; a key without it is refused)
        self._objects = self.repo.objects_for(source.host)
        self._small = self._objects.splitter.min_size

    def _run(self, walk: Callable[[], None]) -> None:
        """Walk in this thread while the pool reads files; checkpoint while waiting for them."""
        # Small files go to one thread of their own (BATCH_FILE_SIZE); the others to ``workers``
        # threads, which chunk, hash, compress and encrypt in parallel.
        with fewer_collections(), \
                ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="kdist-upload") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdist-small") as small_pool:
            self._pool, self._small_pool = pool, small_pool
            walk()
            self._resolve_reuse()
            self._submit_batch()
            pending = [f for f in self._futures if not f.done()]
            while pending:
                _, pending = wait(pending, timeout=self._checkpoint_wait(), return_when=FIRST_COMPLETED)
                self._maybe_checkpoint()

    def _previous_root(self) -> str | None:
        if not self.options.reuse_previous:
            return None
        return previous_root(self.repo.manifests, self._source, partial=self.options.files is not None)

    def _error(self, path: str, message: str) -> None:
        with self._lock:
            self.stats.errors += 1
            if len(self.error_list) < MAX_REPORTED_ERRORS:
                self.error_list.append({"path": path, "error": message})

    def backup_stream(self, stream, name: str, source: Source) -> Snapshot:
        """Back up what ``stream`` gives until its end as the file ``name``, alone in a
        snapshot of its own ``source`` (``snapshot create --stdin``): cut and stored as it
        arrives, with checkpoints as for any file. Owned by this user, mode 0644 (0755 for the
        root directory), with the time of the backup. A read that fails fails the backup: a
        part of a stream is not a backup of it."""
        check_entry_name(name)
        self._begin(source, 0)
        now = int(clock.now() * 1e9)
        uid, gid = os.getuid(), os.getgid()
        owner = dict(mtime_ns=now, uid=uid, gid=gid, user=_user(uid), group=_group(gid))
        self._root = DirNode(Entry("", TYPE_DIR, mode=0o755, **owner), top=True)
        entry = Entry(name, TYPE_FILE, mode=0o644, **owner)
        with self._lock:
            self.stats.dirs += 1
            self.stats.files += 1
        self._run(lambda: self._root.children.append(self._submit(self._read_stream, stream, entry)))
        snap = self._publish(self._write_tree(self._root, final=True), checkpoint=False)
        if self._checkpoint_ids:
            self.repo.manifests.delete(self._checkpoint_ids)
        return snap

    def _read_stream(self, stream, entry: Entry) -> Entry:
        try:
            entry.oid, entry.size = self._objects.write_stream(stream, on_chunk=self._count_read)
        except OSError as exc:
            raise SourceError(f"error while reading standard input: {exc.strerror or exc}") from None
        with self._lock:
            self.stats.files_read += 1
            self.stats.bytes += entry.size
        return entry

    def _walk(self, path: str, node: DirNode, prev_oid: str | None, patterns: list[str], whole: bool = True) -> None:
        """Back up the directory ``path`` into ``node``: all of it, or with ``whole`` False only
        what ``--files-from`` selects in it (``Selection``)."""
        with self._lock:
            self.stats.dirs += 1
        try:
            with os.scandir(path) as it:
                dirents = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            self._error(path, f"cannot read directory: {exc.strerror}")
            return
        patterns = patterns + ignore_patterns(path, self._error)
        listing = self._previous_listing(prev_oid)
        same, matched = listing is not None, 0
        prev = {e.name: e for e in listing.entries} if listing is not None else {}
        complete = listing is not None and listing.complete
        if node.top:
            node.prev_top = listing.top if listing is not None else None
        for d in dirents:
            child_path = os.path.join(path, d.name)
            if is_excluded(child_path, d.name, self._source.path, patterns):
                continue
            child_whole = True
            if not whole:
                verdict = self._selection.verdict(child_path)
                if verdict is None or (verdict == "walk" and not d.is_dir(follow_symlinks=False)):
                    continue
                child_whole = verdict == "whole"
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as exc:
                self._error(child_path, f"cannot stat: {exc.strerror}")
                continue
            old = prev.get(d.name)
            matched += old is not None
            same = self._add_child(node, child_path, d.name, st, old, patterns, complete, child_whole) and same
        node.prev_oid, node.same = prev_oid, same and matched == len(prev)

    def _add_names(self, part: "TreePart") -> None:
        listing = self._previous_listing(part.prev_oid)
        prev = {e.name: e for e in listing.entries} if listing is not None else {}
        complete = listing is not None and listing.complete
        for name in part.names:
            child_path = os.path.join(part.path, name)
            try:
                st = os.stat(child_path, follow_symlinks=False)
            except OSError as exc:
                self._error(child_path, f"cannot stat: {exc.strerror}")
                continue
            self._add_child(self._root, child_path, name, st, prev.get(name), list(part.patterns), complete)

    def _add_child(self, node: DirNode, child_path: str, name: str, st: os.stat_result, old: Entry | None,
                   patterns: list[str], complete: bool, whole: bool = True) -> bool:
        """Add one child; returns whether it looks as it did in the previous snapshot
        (``DirNode.same``). ``complete``: ``old`` comes from a complete listing; ``whole``: a
        directory is walked for all it holds (else for what ``--files-from`` selects)."""
        same = False
        if statmod.S_ISDIR(st.st_mode):
            if self.options.one_file_system and st.st_dev != self._root_dev:
                if self._selection is not None and child_path in self._selection.listed:
                    self._error(child_path, "listed in --files-from, but on another file system (--one-file-system)")
                return False
            old_oid = old.oid if old is not None and old.type == TYPE_DIR else None
            child = DirNode(make_entry(child_path, name, st, TYPE_DIR, self._error))
            node.children.append(child)
            self._walk(child_path, child, old_oid, patterns, whole)
            same = child.same and _same_metadata(child.entry, old)
        elif statmod.S_ISREG(st.st_mode):
            if old is not None and complete and _same_file(st, old):  # the previous entry is this one, as it is
                got, same = self._file(child_path, old, old), True
            else:
                got, same = self._file(child_path, make_entry(child_path, name, st, TYPE_FILE, self._error), old), False
            node.children.append(got)
            same = same and isinstance(got, _Reuse)
        elif statmod.S_ISLNK(st.st_mode):
            got = self._symlink(child_path, make_entry(child_path, name, st, TYPE_SYMLINK, self._error))
            node.children.append(got)
            same = got is not None and got == old
        else:  # a fifo, socket or device: recorded, nothing to read
            kind = _special_kind(st)
            if kind is None:
                with self._lock:
                    self.stats.skipped += 1
                self._error(child_path, "skipped: a file of an unknown kind")
            else:
                got = make_entry(child_path, name, st, kind, self._error)
                node.children.append(got)
                with self._lock:
                    self.stats.special += 1
                same = got == old
        self._maybe_checkpoint()
        return same

    def _previous_listing(self, prev_oid: str | None) -> Listing | None:
        """The previous snapshot's listing of a directory; None if there is none to compare
        with (no previous directory, or a damaged one)."""
        if not prev_oid:
            return None
        try:
            return read_listing(self._objects, prev_oid)
        except KdistError as exc:  # a damaged previous snapshot only costs re-reading
            if is_outage(exc):  # the storage failing is not damage: stop with its error
                raise
            return None

    def _symlink(self, path: str, entry: Entry) -> Entry | None:
        try:
            entry.target = os.readlink(path)
        except OSError as exc:
            self._error(path, f"cannot read symlink: {exc.strerror}")
            return None
        with self._lock:
            self.stats.symlinks += 1
        return entry

    def _file(self, path: str, entry: Entry, old: Entry | None):
        with self._lock:
            self.stats.files += 1
            self.stats.bytes += entry.size
        if (old is not None and old.type == TYPE_FILE and old.oid != ""
                and (old.size, old.mtime_ns, old.ctime_ns, old.inode) == (entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode)):
            try:
                cid = self._objects.parse(old.oid)[1]
            except KdistError:
                return self._read(path, entry)
            slot = _Reuse(path, entry, old.oid, cid)
            self._reuse.append(slot)
            if len(self._reuse) >= REUSE_BATCH:
                self._resolve_reuse()
            return slot
        # a changed file: in format 3 its unchanged chunks are found by the previous version's
        # references (``ObjectStore.known_chunks``)
        return self._read(path, entry, old.oid if old is not None and old.type == TYPE_FILE and old.oid else "")

    def _resolve_reuse(self) -> None:
        """Decide the files that look unchanged since the previous snapshot (same size, mtime,
        ctime and inode): each whose content the index still holds live takes the previous
        entry's object (and the content is noted as referenced: revalidated before publishing);
        the others are read. One index search for a whole batch (``contains_many``)."""
        batch, self._reuse = self._reuse, []
        if not batch:
            return
        live = self.repo.contents.contains_many([r.cid for r in batch])
        self.repo.contents.note_references([r.cid for r, ok in zip(batch, live) if ok])
        for r, ok in zip(batch, live):
            if ok:
                r.entry.oid = r.oid
                r.value = r.entry
            else:
                r.future = self._read(r.path, r.entry)
        with self._lock:
            self.stats.files_reused += sum(live)

    def _read(self, path: str, entry: Entry, previous: str = ""):
        """Hand a file to be read: small ones in batches to one thread, larger ones to the pool
        (``previous``: the object id of the file's previous version, if any)."""
        if entry.size <= BATCH_FILE_SIZE and entry.size <= self._small:
            batch = self._batch
            batch.items.append((path, entry))
            batch.bytes += entry.size
            slot = _Slot(batch, len(batch.items) - 1)
            if len(batch.items) >= BATCH_FILES or batch.bytes >= BATCH_BYTES:
                self._submit_batch()
            return slot
        if entry.size <= self._small:
            return self._submit(self._read_small, path, entry)
        return self._submit(self._read_file, path, entry, previous)

    def _submit(self, fn, *args, pool: ThreadPoolExecutor | None = None) -> Future:
        self._slots.acquire()
        fut = (pool or self._pool).submit(fn, *args)
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)
        return fut

    def _submit_batch(self) -> None:
        batch, self._batch = self._batch, _Batch()
        if not batch.items:
            return
        batch.future = self._submit(self._read_batch, batch.items, pool=self._small_pool)

    def _read_batch(self, items: list[tuple[str, Entry]]) -> list[Entry | None]:
        done = [self._read_small(path, entry) for path, entry in items]
        if self._progress is not None:
            self._progress(self.stats, "")
        return done

    def _read_small(self, path: str, entry: Entry) -> Entry | None:
        """A file the walk saw no larger than one chunk: read whole (``read_whole``); grown
        since the walk, it is read as a stream, like a large file."""
        try:
            got = read_whole(path, entry.size, entry.uid)
        except ReadFailed as exc:
            self._error(path, str(exc))
            return None
        if got is None:
            return self._read_file(path, entry)
        data, st = got
        return self._finish_small(path, entry, self._objects.write_bytes(data), len(data), st.st_mtime_ns, st.st_size)

    def _finish_small(self, path: str, entry: Entry, oid: str, length: int, mtime_ns: int, size: int) -> Entry:
        """A small file is stored: compare its stat after the read with the walk's (a change
        since then is reported like a change while reading)."""
        walked = (entry.mtime_ns, entry.size)
        entry.oid, entry.size = oid, length
        with self._lock:
            self.stats.files_read += 1
            self.stats.bytes_read += length
        if (mtime_ns, size) != walked or length != size:
            self._error(path, "file changed while it was being read; the stored copy may be inconsistent")
            entry.ctime_ns = 0  # never taken for unchanged next time
        return entry

    def _read_file(self, path: str, entry: Entry, previous: str = "") -> Entry | None:
        known = self._objects.known_chunks(previous) if previous else None
        try:
            fd = open_source(path, entry.uid)
        except ReadFailed as exc:
            self._error(path, str(exc))
            return None
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                before = os.fstat(f.fileno())
                oid, length = self._objects.write_file(f, on_chunk=self._count_read, known=known)
                after = os.fstat(f.fileno())
        except OSError as exc:
            self._error(path, f"error while reading file: {exc.strerror}")
            return None
        with self._lock:
            self.stats.files_read += 1
        entry.oid, entry.size = oid, length
        if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size) or length != before.st_size:
            self._error(path, "file changed while it was being read; the stored copy may be inconsistent")
        # (an entry whose attributes could not all be read keeps no ctime: read again next time)
        entry.mtime_ns, entry.ctime_ns = before.st_mtime_ns, before.st_ctime_ns if entry.ctime_ns else 0
        return entry

    def _count_read(self, n: int) -> None:
        with self._lock:
            self.stats.bytes_read += n
        if self._progress is not None:
            self._progress(self.stats, "")

    # ---- writing the tree ----------------------------------------------------------------
    def _write_tree(self, node: DirNode, final: bool) -> Entry:
        entries = []
        summary = {"files": 0, "dirs": 0, "bytes": 0}
        # every child must turn out as it was, too (and a root's own metadata be the same)
        reuse = final and node.same and (not node.top or _same_metadata(node.entry, node.prev_top))
        for child in node.children:
            if isinstance(child, PENDING):
                if not final and not child.done():
                    continue
                reuse = reuse and isinstance(child, _Reuse) and child.value is not None
                child = child.result()
            elif isinstance(child, DirNode):
                sub, child = child, self._write_tree(child, final)
                reuse = reuse and sub.reused
            if child is None:
                continue
            entries.append(child)
            if child.type == TYPE_DIR:
                summary["dirs"] += 1 + child.summary.get("dirs", 0)
                summary["files"] += child.summary.get("files", 0)
                summary["bytes"] += child.summary.get("bytes", 0)
            elif child.type == TYPE_FILE:
                summary["files"] += 1
                summary["bytes"] += child.size
        entry = node.entry
        if reuse and self._still_stored(node.prev_oid):
            entry.oid, node.reused = node.prev_oid, True  # the same entries encode to the same object
        else:
            entry.oid = self._objects.write_bytes(
                encode_directory(entries, node.entry if node.top else None, node.complete), metadata=True)
        entry.summary = summary
        return entry

    def _still_stored(self, oid: str) -> bool:
        """Whether a previous directory object can be referred to as it is: one chunk whose content
        the index holds live (noted as referenced: revalidated before publishing)."""
        try:
            indirect, cid = self._objects.parse(oid)
        except KdistError:
            return False
        if indirect or not self.repo.contents.contains(cid):
            return False
        self.repo.contents.note_reference(cid)
        return True

    def _checkpoint_wait(self) -> float | None:
        iv = self.options.checkpoint_interval
        return max(0.05, iv - (clock.monotonic() - self._last_checkpoint)) if iv > 0 else None

    def _maybe_checkpoint(self) -> None:
        iv = self.options.checkpoint_interval
        if iv <= 0 or clock.monotonic() - self._last_checkpoint < iv:
            return
        self._last_checkpoint = clock.monotonic()
        snap = self._publish(self._write_tree(self._root, final=False), checkpoint=True)
        self._checkpoint_ids.append(snap.id)
        with self._lock:
            self.stats.checkpoints += 1

    def _publish(self, root_entry: Entry, checkpoint: bool, original: Snapshot | None = None,
                 extra_labels: dict | None = None) -> Snapshot:
        """Publish the tree ``root_entry`` as a snapshot of this backup, or (``original``, not a
        checkpoint) as a copy of that snapshot: its times, totals, tags, description and errors."""
        self.repo.flush()  # packs, then the index blob, then the manifest
        self.repo.contents.revalidate()  # nothing we refer to was collected while we ran
        with self._lock:
            self.stats.new_bytes = self.repo.contents.stats.bytes_original - self._new_bytes_base
            totals = self.stats.as_dict()
            errors = list(self.error_list)
        snap = Snapshot(
            source=self._source, root=root_entry.oid, start=self._start, end=clock.now(), totals=totals,
            tags=list(self.options.tags), description=self.options.description, checkpoint=checkpoint,
            errors=errors, run=self._run_id,
        )
        if original is not None and not checkpoint:
            snap = replace(snap, end=original.end, totals=dict(original.totals), tags=list(original.tags),
                           description=original.description, errors=list(original.errors))
        labels = {**snap.labels(), **(extra_labels or {})}
        if self.options.files is not None and not checkpoint:  # a snapshot of the listed paths only
            labels[PARTIAL_LABEL] = "1"
        if checkpoint:  # maintenance forgets a dead backup's checkpoints, never a live one's (kdist.gc.checkpoints)
            labels["session"] = self.repo.session
            if self._driver:  # a part: its backup lives as long as the session that will publish it
                labels[DRIVER_LABEL] = self._driver
        rec = self.repo.manifests.put(labels, snap.payload())
        snap.id, snap.ts, snap.partial = rec.id, rec.ts, labels.get(PARTIAL_LABEL) == "1"
        try:
            self.repo.contents.confirm_published()
        except ContentLost:
            self.repo.manifests.delete([rec.id])  # paused mid-publish and lost contents: withdraw
            raise
        return snap
