"""``kdist mount``: a repository's snapshots as a read-only file system (FUSE).

Layout::

    /hosts/<host>/<time>_<id>/...   each snapshot's tree: modes, owners, times, symlinks,
                                    special files and extended attributes as stored
    /hosts/<host>/latest            a symlink to the host's newest snapshot
    /ids/<id>                       a symlink to the snapshot's directory under hosts

``<time>`` is the snapshot's end in local time (``2026-12-07T02:00:05``), ``<id>`` the first 8
hex characters of its id. The list of snapshots is read again when a listing of ``/hosts`` or
``/ids`` is older than ``REFRESH_SECONDS``, so snapshots published while mounted appear, and a
forgotten one disappears. Files are read through the repository's own readers: every content is
authenticated, directories come from the local cache, a file read in order is read ahead, and a
content that maintenance moved meanwhile (a pack rewrite) is found at its new place.

``SnapshotFS`` holds the operations, with no FUSE in sight (they are tested directly);
``mount`` puts them behind mfusepy, a maintained ctypes binding of libfuse 2 and 3 (nothing to
compile, unlike pyfuse3), with the mount read-only.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
import threading
import time
from collections import OrderedDict
from datetime import datetime

from repo_format.errors import KdistError
from repo_format.repository import Repository

from kdist.snapshot import (
    TYPE_BLOCK_DEVICE, TYPE_CHAR_DEVICE, TYPE_DIR, TYPE_FIFO, TYPE_FILE, TYPE_SOCKET, TYPE_SYMLINK, Entry, Snapshot,
    SnapshotFilter, check_entry_name, list_snapshots, read_directory, read_listing, visible_labels,
)

REFRESH_SECONDS = 30.0
CACHED_DIRECTORIES = 4096  # directory listings kept decoded (LRU)
_KIND = {TYPE_DIR: statmod.S_IFDIR, TYPE_FILE: statmod.S_IFREG, TYPE_SYMLINK: statmod.S_IFLNK,
         TYPE_FIFO: statmod.S_IFIFO, TYPE_SOCKET: statmod.S_IFSOCK, TYPE_CHAR_DEVICE: statmod.S_IFCHR,
         TYPE_BLOCK_DEVICE: statmod.S_IFBLK}


class FSError(OSError):
    """An errno for the file system's caller (``mount`` turns it into FUSE's)."""

    def __init__(self, code: int):
        super().__init__(code, os.strerror(code))


def snapshot_name(snap: Snapshot) -> str:
    return f"{datetime.fromtimestamp(snap.end).strftime('%Y-%m-%dT%H:%M:%S')}_{snap.id[:8]}"


class SnapshotFS:
    """The file system's operations on paths (``/hosts/web1/...``), as FUSE asks for them."""

    def __init__(self, repo: Repository, where: SnapshotFilter = SnapshotFilter(), clock=time.monotonic):
        self.repo = repo
        self.where = where
        self._clock = clock
        self._lock = threading.Lock()
        self._listed_at: float | None = None
        self._hosts: dict[str, dict[str, Snapshot]] = {}
        self._ids: dict[str, tuple[str, str]] = {}  # id prefix -> (host, snapshot name)
        self._dirs: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self._tops: dict[str, Entry] = {}
        self._handles: dict[int, tuple[threading.Lock, object]] = {}
        self._next_handle = 1
        self._mounted_at = time.time_ns()

    # ---- snapshots ---------------------------------------------------------------------------

    def _snapshots(self, refresh: bool = False) -> dict[str, dict[str, Snapshot]]:
        with self._lock:
            stale = self._listed_at is None or self._clock() - self._listed_at > REFRESH_SECONDS
            if not (refresh and stale) and self._listed_at is not None:
                return self._hosts
        snaps = self.where.select(list_snapshots(self.repo.manifests, **visible_labels(self.repo.identity)))
        hosts: dict[str, dict[str, Snapshot]] = {}
        ids: dict[str, tuple[str, str]] = {}
        for s in snaps:
            try:
                check_entry_name(s.source.host)
            except KdistError:
                continue  # a host name no directory can have
            name = snapshot_name(s)
            hosts.setdefault(s.source.host, {})[name] = s
            ids[s.id[:8]] = (s.source.host, name)
        with self._lock:
            self._hosts, self._ids, self._listed_at = hosts, ids, self._clock()
        return hosts

    def _listing(self, oid: str) -> dict[str, Entry]:
        with self._lock:
            got = self._dirs.get(oid)
            if got is not None:
                self._dirs.move_to_end(oid)
                return got
        got = {e.name: e for e in read_directory(self.repo.objects, oid)}
        with self._lock:
            self._dirs[oid] = got
            while len(self._dirs) > CACHED_DIRECTORIES:
                self._dirs.popitem(last=False)
        return got

    def _top(self, snap: Snapshot) -> Entry:
        """The snapshot's root directory as an entry: its own metadata when stored."""
        with self._lock:
            got = self._tops.get(snap.id)
        if got is None:
            top = read_listing(self.repo.objects, snap.root).top
            got = top if top is not None else Entry("", TYPE_DIR, mode=0o755, mtime_ns=int(snap.end * 1e9))
            got.oid = snap.root
            with self._lock:
                self._tops[snap.id] = got
        return got

    def _resolve(self, path: str):
        """What ``path`` names: ("dir", [names]) for the virtual directories, ("link", target),
        or ("entry", Entry) inside a snapshot."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "dir", ["hosts", "ids"]
        if parts[0] == "hosts":
            hosts = self._snapshots(refresh=len(parts) <= 2)
            if len(parts) == 1:
                return "dir", sorted(hosts)
            snaps = hosts.get(parts[1])
            if snaps is None:
                raise FSError(errno.ENOENT)
            if len(parts) == 2:
                return "dir", sorted(snaps) + ["latest"]
            if parts[2] == "latest" and len(parts) == 3:
                return "link", max(snaps, key=lambda n: (snaps[n].end, snaps[n].id))
            snap = snaps.get(parts[2])
            if snap is None:
                raise FSError(errno.ENOENT)
            entry = self._top(snap)
            for name in parts[3:]:
                if entry.type != TYPE_DIR:
                    raise FSError(errno.ENOTDIR)
                entry = self._listing(entry.oid).get(name)
                if entry is None:
                    raise FSError(errno.ENOENT)
            return "entry", entry
        if parts[0] == "ids":
            self._snapshots(refresh=len(parts) == 1)
            if len(parts) == 1:
                return "dir", sorted(self._ids)
            where = self._ids.get(parts[1])
            if where is None or len(parts) > 2:
                raise FSError(errno.ENOENT)
            return "link", f"../hosts/{where[0]}/{where[1]}"
        raise FSError(errno.ENOENT)

    def _entry_at(self, path: str) -> Entry:
        kind, what = self._guarded(path)
        if kind != "entry":
            raise FSError(errno.EINVAL)
        return what

    def _guarded(self, path: str):
        try:
            return self._resolve(path)
        except KdistError:  # damaged or unreachable: the caller sees an I/O error
            raise FSError(errno.EIO) from None

    # ---- operations --------------------------------------------------------------------------

    def getattr(self, path: str) -> dict:
        kind, what = self._guarded(path)
        base = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_mtime": self._mounted_at,
                "st_ctime": self._mounted_at, "st_atime": self._mounted_at}
        if kind == "dir":
            return {**base, "st_mode": statmod.S_IFDIR | 0o555, "st_nlink": 2}
        if kind == "link":
            return {**base, "st_mode": statmod.S_IFLNK | 0o777, "st_nlink": 1, "st_size": len(what)}
        e: Entry = what
        return {"st_mode": _KIND[e.type] | (e.mode & 0o7777), "st_nlink": 2 if e.type == TYPE_DIR else max(1, e.nlink),
                "st_uid": e.uid, "st_gid": e.gid, "st_size": e.size if e.type == TYPE_FILE else len(e.target),
                "st_mtime": e.mtime_ns, "st_ctime": e.ctime_ns or e.mtime_ns, "st_atime": e.mtime_ns,
                "st_rdev": e.rdev, "st_blocks": (e.size + 511) // 512 if e.type == TYPE_FILE else 0}

    def readdir(self, path: str) -> list[str]:
        kind, what = self._guarded(path)
        if kind == "dir":
            return [".", ".."] + list(what)
        if kind == "entry" and what.type == TYPE_DIR:
            try:
                return [".", ".."] + sorted(self._listing(what.oid))
            except KdistError:
                raise FSError(errno.EIO) from None
        raise FSError(errno.ENOTDIR)

    def readlink(self, path: str) -> str:
        kind, what = self._guarded(path)
        if kind == "link":
            return what
        if kind == "entry" and what.type == TYPE_SYMLINK:
            return what.target
        raise FSError(errno.EINVAL)

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT):
            raise FSError(errno.EROFS)
        e = self._entry_at(path)
        if e.type != TYPE_FILE:
            raise FSError(errno.EISDIR if e.type == TYPE_DIR else errno.EINVAL)
        try:
            reader = self.repo.objects.open(e.oid)
        except KdistError:
            raise FSError(errno.EIO) from None
        with self._lock:
            fh = self._next_handle
            self._next_handle += 1
            self._handles[fh] = (threading.Lock(), reader)
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise FSError(errno.EBADF)
        lock, reader = handle
        with lock:  # one reader per open file, read by one thread at a time
            try:
                reader.seek(offset)
                return reader.read(size)
            except KdistError:
                raise FSError(errno.EIO) from None

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle[1].close()
        return 0

    def listxattr(self, path: str) -> list[str]:
        kind, what = self._guarded(path)
        return [os.fsdecode(n) for n, _v in what.xattrs] if kind == "entry" else []

    def getxattr(self, path: str, name: str) -> bytes:
        kind, what = self._guarded(path)
        if kind == "entry":
            for n, v in what.xattrs:
                if n == os.fsencode(name):
                    return v
        raise FSError(errno.ENODATA)


def mount(repo: Repository, mountpoint: str, where: SnapshotFilter = SnapshotFilter(),
          allow_other: bool = False) -> None:
    """Mount the snapshots at ``mountpoint`` until it is unmounted (``fusermount3 -u``, or
    Ctrl-C); read-only."""
    try:
        import mfusepy as fuse
    except (ImportError, OSError) as exc:  # (OSError: the binding loads libfuse as it is imported)
        raise KdistError(f"kdist mount needs libfuse (Debian: apt-get install fuse3): {exc}") from None

    fs = SnapshotFS(repo, where)

    class Operations(fuse.Operations):
        use_ns = True

        def __call__(self, op, *args):
            try:
                return super().__call__(op, *args)
            except FSError as exc:
                raise fuse.FuseOSError(exc.errno) from None

        def getattr(self, path, fh=None):
            return fs.getattr(path)

        def readdir(self, path, fh):
            return fs.readdir(path)

        def readlink(self, path):
            return fs.readlink(path)

        def open(self, path, flags):
            return fs.open(path, flags)

        def read(self, path, size, offset, fh):
            return fs.read(path, size, offset, fh)

        def release(self, path, fh):
            return fs.release(path, fh)

        def listxattr(self, path):
            return fs.listxattr(path)

        def getxattr(self, path, name, position=0):
            return fs.getxattr(path, name)

    options = {"foreground": True, "ro": True, "fsname": "kdist", "subtype": "kdist"}
    if allow_other:
        options["allow_other"] = True
    with repo.contents.reading_ahead():  # browsing and copying read files that lie together in packs
        fuse.FUSE(Operations(), mountpoint, **options)
