"""The one way through snapshot trees, and what a snapshot reaches.

A snapshot *reaches* its root directory object, and for every directory it reaches, the
directory and file objects its entries name; an object reaches its own content and, for an
indirect object, every content of its chunk list (``object_contents``). Content GC keeps what
some snapshot reaches and check reports what a snapshot reaches and cannot read: both decide it
here, so they cannot disagree. ``ls -r``, ``verify`` and repair's checks walk with the same rules,
and restore reads each directory through ``TreeWalker.read`` in an order of its own (it keeps a
directory open while it writes the children). ``diff`` walks two trees in step, on its own.

The walker goes depth first (one stack, no recursion: a deep tree cannot exhaust the
interpreter's), refuses to follow a directory deeper than ``max_depth`` below its start (GC and
check pass ``None``: they must see all a snapshot holds, and a stack has no depth to exhaust),
and with ``once`` visits each directory object at most once for its whole life, across every tree it walks
(nightly snapshots share most of their directories). What it does with a directory that cannot be
read is the caller's policy: ``errors="raise"`` stops the walk (GC never decides on a partial
walk); ``errors="report"`` yields the directory with its error and goes on with the others. The
storage failing as a whole always stops the walk.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterator

from repo_format.constants import CONTENT_ID_SIZE
from repo_format.errors import CorruptionError, KdistError, is_outage
from repo_format.objects import ObjectStore, parse_object_id

from kdist.snapshot import MAX_TREE_DEPTH, TYPE_DIR, TYPE_FILE, Entry, read_directory


class TooDeep(CorruptionError):
    """A directory nested deeper than the walk follows."""


@dataclass(slots=True)
class Directory:
    """One directory met by a walk. ``entries`` is ``None`` when it could not be read (``error``
    says why, unless the reader reported it itself); ``repeat`` is set, with no entries, when the
    walker had already visited this directory object (``once``) and does not walk it again."""

    path: str
    oid: str
    depth: int
    parent: "Directory | None"
    entries: list[Entry] | None = None
    error: KdistError | None = None
    repeat: bool = False

    def ancestors(self) -> Iterator["Directory"]:
        """This directory, then each one above it up to where the walk started."""
        d = self
        while d is not None:
            yield d
            d = d.parent

    def child_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}" if self.path else name

    def child(self, e: Entry, path: str | None = None) -> "Directory":
        """The subdirectory ``e`` names, not read yet."""
        return Directory(self.child_path(e.name) if path is None else path, e.oid, self.depth + 1, self)


def _visit_key(oid: str) -> bytes:
    indirect, cid = parse_object_id(oid)  # 33 (or 65) bytes a directory instead of a 65 (129) character str
    return cid + (b"I" if indirect else b"")


class TreeWalker:
    """Walks directory trees; see the module docstring for the rules.

    ``read``: a ``Directory`` (path, object id, parents) -> its entries; may return ``None`` for
    a directory it found unreadable and reported itself (check does, with the missing contents).
    """

    def __init__(self, read: Callable[[Directory], list[Entry] | None], max_depth: int | None = MAX_TREE_DEPTH,
                 once: bool = True, errors: str = "raise"):
        if errors not in ("raise", "report"):
            raise ValueError("errors must be 'raise' or 'report'")
        self._read = read
        self.max_depth = max_depth
        self.once = once
        self.errors = errors
        self._seen: set[bytes] = set()

    @classmethod
    def over(cls, objects: ObjectStore, **options) -> "TreeWalker":
        return cls(lambda d: read_directory(objects, d.oid), **options)

    @property
    def directories_visited(self) -> int:
        return len(self._seen)

    def walk(self, root: str, path: str = "") -> Iterator[Directory]:
        """Every directory under (and including) the one ``root`` names, as it is read. A caller
        that stops iterating stops the walk."""
        stack = [Directory(path, root, 0, None)]
        while stack:
            d = self.read(stack.pop())
            yield d
            for e in d.entries or ():
                if e.type == TYPE_DIR:
                    stack.append(d.child(e))

    def read(self, d: Directory) -> Directory:
        """Read one directory under the walker's rules (visited once, depth limit, error policy)
        and return it; for callers that walk in an order of their own (restore, which keeps a
        directory open while it writes its children)."""
        try:
            if self.once:
                key = _visit_key(d.oid)  # (a malformed id is damage like any other)
                if key in self._seen:
                    d.repeat = True
                    return d
                self._seen.add(key)
            if self.max_depth is not None and d.depth > self.max_depth:
                raise TooDeep(f"directory nesting deeper than {self.max_depth} at {d.path or '/'!r}: "
                              "not followed further")
            d.entries = self._read(d)
        except KdistError as exc:
            if self.errors == "raise" or is_outage(exc):
                raise
            d.error = exc
        return d

    def split(self, roots: list[str], width: int) -> tuple[list[Directory], list[str]]:
        """Breadth first from ``roots`` (all of them read here) until at least ``width``
        directories wait (or none do), for walks shared out among processes: the directories
        read here, and the object ids of those waiting (each once, none visited: other walkers
        take them)."""
        queue = collections.deque(Directory("", r, 0, None) for r in roots)
        queued = {_visit_key(r) for r in roots}
        read: list[Directory] = []
        # every root is read here, so that snapshots sharing subtrees hand out each one once
        while queue and (len(queue) < width or queue[0].depth == 0):
            d = self.read(queue.popleft())
            if d.repeat:
                continue
            read.append(d)
            for e in d.entries or ():
                if e.type == TYPE_DIR and (key := _visit_key(e.oid)) not in queued and key not in self._seen:
                    queued.add(key)
                    queue.append(d.child(e))
        return read, [d.oid for d in queue]


def object_contents(objects: ObjectStore, oid: str) -> list[bytes]:
    """The ids of every content an object reaches: its own, and for an indirect object its
    chunks' (a reference starts with its content's id)."""
    indirect, ref = parse_object_id(oid)
    cid = ref[:CONTENT_ID_SIZE]
    if not indirect:
        return [cid]
    return [cid] + [c[:CONTENT_ID_SIZE] for c, _n in objects.chunks(oid) if c is not None]  # (a hole: no content)


def reached_contents(walker: TreeWalker, objects: ObjectStore, root: str) -> Iterator[bytes]:
    """The contents one snapshot tree reaches (directories the walker visited before excluded,
    with what they reach: a ``once`` walker over many snapshots yields each directory's once)."""
    for d in walker.walk(root):
        if not d.repeat:
            yield from directory_contents(objects, d)


def directory_contents(objects: ObjectStore, d: Directory) -> Iterator[bytes]:
    """What one directory reaches by itself: its object's contents and its files' (not its
    subdirectories')."""
    yield from object_contents(objects, d.oid)
    for e in d.entries or ():
        if e.type == TYPE_FILE and e.oid:
            yield from object_contents(objects, e.oid)
