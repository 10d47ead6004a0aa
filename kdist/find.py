"""Searching snapshots for paths, and writing a snapshot's subtree out as a tar stream.

Owns the library side of ``kdist snapshot find`` and ``kdist snapshot dump``. Reads only: it
never writes to the repository or to the local file system.

A pattern without ``/`` is matched (shell-style, ``fnmatch``) against each entry's name at any
depth; a pattern with ``/`` against the whole path from the snapshot's root, component by
component (``*`` never crosses a ``/``; ``**`` stands for any number of directories), so a
search for ``/etc/ssh/*`` reads only the directories on that path.
"""

from __future__ import annotations

import fnmatch
import os
import tarfile
from dataclasses import dataclass
from typing import Callable

from repo_format.errors import CorruptionError
from repo_format.repository import Repository

from kdist.snapshot import (
    DEVICE_TYPES, MAX_TREE_DEPTH, TYPE_CHAR_DEVICE, TYPE_DIR, TYPE_FIFO, TYPE_FILE, TYPE_SOCKET, TYPE_SYMLINK, Entry,
    Snapshot, read_directory,
)
from kdist.tree import TreeWalker


@dataclass(frozen=True)
class Match:
    path: str  # from the snapshot's root, without a leading "/"
    entry: Entry


class Pattern:
    def __init__(self, pattern: str, ignore_case: bool = False):
        if not pattern.strip("/"):
            raise ValueError("an empty pattern matches nothing")
        self.ignore_case = ignore_case
        self.by_path = "/" in pattern
        text = pattern.lower() if ignore_case else pattern
        self.parts = [p for p in text.strip("/").split("/") if p not in ("", ".")]

    def _fold(self, name: str) -> str:
        return name.lower() if self.ignore_case else name

    def name_matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(self._fold(name), self.parts[-1])

    def advance(self, states: frozenset[int], name: str) -> frozenset[int]:
        """The pattern positions reached after one more path component ``name`` (an NFA over
        the components: ``**`` takes this one, and may take more)."""
        name = self._fold(name)
        out: set[int] = set()
        for i in self._closure(states):
            if i < len(self.parts):
                if self.parts[i] == "**":
                    out.update((i, i + 1))
                elif fnmatch.fnmatchcase(name, self.parts[i]):
                    out.add(i + 1)
        return frozenset(out)

    def _closure(self, states) -> set[int]:
        """``states`` and what they reach through a ``**`` that takes no component (not the last
        one: ``/etc/**`` is what is inside /etc, not /etc itself)."""
        out = set(states)
        for i in sorted(states):
            j = i
            while j < len(self.parts) - 1 and self.parts[j] == "**":
                j += 1
                out.add(j)
        return out

    def complete(self, states: frozenset[int]) -> bool:
        return len(self.parts) in self._closure(states)


class Finder:
    """Finds the entries a pattern matches in one snapshot after another. For name patterns a
    directory object shared by several snapshots (or paths) is read and searched once."""

    def __init__(self, repo: Repository, pattern: Pattern):
        self.repo = repo
        self.pattern = pattern
        # directory oid -> (its entries that match, (name, oid) of its subdirectories holding some)
        self._under: dict[str, tuple[list[Entry], list[tuple[str, str]]]] = {}

    def find(self, snap: Snapshot) -> list[Match]:
        rows = self._by_path(snap.root) if self.pattern.by_path else self._by_name(snap.root)
        return sorted((Match(p, e) for p, e in rows), key=lambda m: m.path)

    def _by_path(self, root: str) -> list[tuple[str, Entry]]:
        out = []
        stack = [("", root, frozenset({0}), 0)]
        while stack:
            base, oid, states, depth = stack.pop()
            if depth > MAX_TREE_DEPTH:
                raise CorruptionError(f"directory nesting deeper than {MAX_TREE_DEPTH} at {base!r}")
            for e in read_directory(self.repo.objects, oid):
                reached = self.pattern.advance(states, e.name)
                if not reached:
                    continue
                path = f"{base}/{e.name}" if base else e.name
                if self.pattern.complete(reached):
                    out.append((path, e))
                if e.type == TYPE_DIR:
                    stack.append((path, e.oid, reached, depth + 1))
        return out

    def _by_name(self, root: str) -> list[tuple[str, Entry]]:
        """Bottom up over the directory graph, each directory object once across snapshots:
        ``_under`` keeps, per directory, its own matches and its subdirectories that hold some
        (so memory follows the matches, not the tree); the paths are made top down."""
        memo = self._under
        listing: dict[str, list[Entry]] = {}
        stack = [(root, 0)]
        while stack:
            oid, depth = stack.pop()
            if oid in memo:
                continue
            if depth > MAX_TREE_DEPTH:
                raise CorruptionError(f"directory nesting deeper than {MAX_TREE_DEPTH}")
            entries = listing.get(oid)
            if entries is None:  # first visit: its subdirectories first
                entries = listing[oid] = read_directory(self.repo.objects, oid)
                below = [e.oid for e in entries if e.type == TYPE_DIR and e.oid not in memo]
                if below:
                    stack.append((oid, depth))
                    stack += [(b, depth + 1) for b in below]
                    continue
            own = [e for e in entries if self.pattern.name_matches(e.name)]
            holding = [(e.name, e.oid) for e in entries if e.type == TYPE_DIR and memo[e.oid] != ([], [])]
            memo[oid] = (own, holding)
            del listing[oid]
        rows: list[tuple[str, Entry]] = []
        paths = [("", root, 0)]
        while paths:
            base, oid, depth = paths.pop()
            if depth > MAX_TREE_DEPTH:
                raise CorruptionError(f"directory nesting deeper than {MAX_TREE_DEPTH} at {base!r}")
            own, holding = memo[oid]
            rows += [(f"{base}/{e.name}" if base else e.name, e) for e in own]
            paths += [(f"{base}/{name}" if base else name, sub, depth + 1) for name, sub in holding]
        return rows


def pax_time(ns: int) -> str:
    """Nanoseconds since the epoch as a pax time: exact decimal seconds, never an exponent."""
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    seconds, rest = divmod(ns, 10**9)
    return f"{sign}{seconds}.{rest:09d}"


def tar_info(path: str, e: Entry, on_skip: Callable[[str, str], None] | None = None) -> tarfile.TarInfo:
    """A tar header for entry ``e`` at ``path``: type, permissions, owner, mtime and extended
    attributes as stored (``on_skip(path, message)`` hears of an attribute tar cannot name)."""
    info = tarfile.TarInfo(path)
    info.mode = e.mode & 0o7777
    info.uid, info.gid = e.uid, e.gid
    info.uname, info.gname = e.user or "", e.group or ""
    info.mtime = e.mtime_ns // 10**9
    info.pax_headers = {"mtime": pax_time(e.mtime_ns)}  # to the nanosecond
    for name, value in e.xattrs:  # as GNU tar --xattrs and bsdtar read them (ACLs and capabilities too)
        try:  # a pax keyword is UTF-8
            keyword = "SCHILY.xattr." + name.decode("utf-8")
        except UnicodeDecodeError:
            if on_skip is not None:
                on_skip(path, f"extended attribute {name!r} left out: its name is not UTF-8")
            continue
        info.pax_headers[keyword] = value.decode("utf-8", "surrogateescape")
    if e.type == TYPE_DIR:
        info.type = tarfile.DIRTYPE
    elif e.type == TYPE_SYMLINK:
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    elif e.type == TYPE_FIFO:
        info.type = tarfile.FIFOTYPE
    elif e.type in DEVICE_TYPES:
        info.type = tarfile.CHRTYPE if e.type == TYPE_CHAR_DEVICE else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(e.rdev), os.minor(e.rdev)
        if max(info.devmajor, info.devminor) >= 8**7:  # what a tar header's field holds
            raise CorruptionError(f"device {e.name!r} has a device number tar cannot hold")
    else:
        info.type, info.size = tarfile.REGTYPE, e.size
    return info


def write_tar(repo: Repository, start: Entry, name: str, out,
              on_skip: Callable[[str, str], None] | None = None) -> int:
    """Write ``start`` (a directory, or one entry) and everything under it to ``out`` as a POSIX
    (pax) tar stream, under the top name ``name`` ("" for a snapshot's root: its entries at the
    top). Returns the number of entries written. A content that cannot be read raises (the
    stream is then cut short: tar reports it). The files of a link group after the first are
    hard links to it, as tar writes them."""
    count = 0
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        if name:
            count += _add(repo, tar, name, start, links, on_skip)
        if start.type != TYPE_DIR:
            return count
        for d in TreeWalker.over(repo.objects, once=False).walk(start.oid, name):
            for e in d.entries:
                count += _add(repo, tar, d.child_path(e.name), e, links, on_skip)
    return count


def _add(repo: Repository, tar: tarfile.TarFile, path: str, e: Entry, links: dict, on_skip) -> int:
    if e.type == TYPE_SOCKET:  # tar has no sockets (GNU tar leaves them out too)
        return 0
    info = tar_info(path, e, on_skip)
    if e.dev:
        first = links.setdefault((e.dev, e.inode), path)
        if first != path:
            info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
            tar.addfile(info)
            return 1
    if e.type == TYPE_FILE and e.size:
        with repo.objects.open(e.oid) as reader:
            tar.addfile(info, reader)
    else:
        tar.addfile(info)
    return 1
