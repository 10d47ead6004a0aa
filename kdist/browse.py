"""Reading snapshots without restoring them: walk a tree, diff two trees, verify contents."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from repo_format.errors import CorruptionError, KdistError, is_outage
from repo_format.repository import Repository

from kdist.snapshot import MAX_TREE_DEPTH, TYPE_DIR, TYPE_FILE, Entry, read_directory
from kdist.tree import TreeWalker


def _too_deep(path: str) -> str:
    return f"directory nesting deeper than {MAX_TREE_DEPTH} at {path!r}: not followed further"


def walk(repo: Repository, start: Entry, prefix: str, recursive: bool) -> list[tuple[str, Entry]]:
    """``(path, entry)`` for the entries under ``start`` (one level, or all with ``recursive``).
    Every path is listed: a subtree stored once but present at two paths is shown at both."""
    if start.type != TYPE_DIR:
        return [(prefix, start)]
    rows = []
    for d in TreeWalker.over(repo.objects, once=False).walk(start.oid, prefix):
        rows += [(d.child_path(e.name), e) for e in d.entries]
        if not recursive:
            break
    return sorted(rows, key=lambda r: r[0]) if recursive else rows


def diff(repo: Repository, root_a: str, root_b: str) -> list[tuple[str, str]]:
    """Changes from tree A to tree B: ``+`` added, ``-`` removed, ``M`` modified (content or metadata).

    Subtrees with equal directory object ids are identical and are not read.
    """
    out: list[tuple[str, str]] = []
    stack = [("", root_a, root_b, 0)]
    while stack:
        base, a, b, depth = stack.pop()
        if a == b:
            continue
        if depth > MAX_TREE_DEPTH:
            raise CorruptionError(_too_deep(base))
        ea = {e.name: e for e in read_directory(repo.objects, a)} if a else {}
        eb = {e.name: e for e in read_directory(repo.objects, b)} if b else {}
        for name in sorted(set(ea) | set(eb)):
            p = f"{base}/{name}" if base else name
            x, y = ea.get(name), eb.get(name)
            if x is None or y is None:
                out.append(("+" if x is None else "-", p))
                subtree = y if x is None else x
                if subtree.type == TYPE_DIR:
                    stack.append((p, subtree.oid if x is not None else "", subtree.oid if y is not None else "",
                                  depth + 1))
            elif x.type == TYPE_DIR and y.type == TYPE_DIR:
                stack.append((p, x.oid, y.oid, depth + 1))
            elif _compared(x) != _compared(y):
                out.append(("M", p))
    return sorted(out, key=lambda c: c[1])


def _compared(e):
    """What ``diff`` compares of a file, symlink or special entry: content and the metadata a
    restore sets (the attributes, ACLs and capabilities among them)."""
    return (e.type, e.oid, e.target, e.mode, e.mtime_ns, e.uid, e.gid, e.rdev, e.xattrs)


@dataclass
class VerifyReport:
    files: int = 0
    dirs: int = 0
    contents_read: int = 0
    bytes_read: int = 0
    problems: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def verify(repo: Repository, root: str, percent: float = 100.0, rng: random.Random | None = None) -> VerifyReport:
    """Authenticate every directory object and ``percent`` of the files' contents."""
    rng = rng or random.Random()
    report = VerifyReport()
    seen: set[bytes] = set()
    for d in TreeWalker.over(repo.objects, once=False, errors="report").walk(root):
        if d.error is not None:
            report.problems.append({"path": d.path or "/", "error": str(d.error)})
            continue
        report.dirs += 1
        for e in d.entries:
            if e.type != TYPE_FILE:
                continue
            report.files += 1
            if percent < 100 and rng.random() * 100 >= percent:
                continue
            try:
                for cid, _n in repo.objects.chunks(e.oid):
                    if cid is None or cid in seen:  # (a hole is no content)
                        continue
                    data = repo.contents.read(cid)
                    seen.add(cid)
                    report.contents_read += 1
                    report.bytes_read += len(data)
            except KdistError as exc:
                if is_outage(exc):
                    raise
                report.problems.append({"path": d.child_path(e.name), "error": str(exc)})
    return report
