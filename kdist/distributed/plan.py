"""Split one tree into balanced parts, and assemble the parts' results into one snapshot tree.

The driver of a sharded backup walks the tree's metadata once (names and stat, no file data),
applying the same excludes, ``.kdistignore`` files and one-file-system rule as the uploader.
The root is always split; below it, a directory whose cost exceeds the target is *split* too:
each of its subdirectories is planned the same way. A split directory's other entries (files,
symlinks, specials, and the subdirectories that fit the target, whole) are grouped in name order
into parts of about the target cost. Cost is bytes plus a fixed charge per
entry, so a directory of a million small files is split as surely as one of a few huge ones.

Assembly writes each split directory from its children's entries in name order with the
uploader's own code, so the root object is the one a single-process backup of the same tree
writes (same chunking parameters, same metadata): the test suite checks exactly that.
"""

from __future__ import annotations

import os
import stat as statmod
from dataclasses import dataclass, field

from repo_format.errors import KdistError

from kdist.snapshot import SNAPSHOT_LABEL, TYPE_DIR, Entry, Snapshot, Source, read_directory
from kdist.uploader import (BackupOptions, BackupStats, DirNode, TreePart, Uploader, make_entry,
                            ignore_patterns, is_excluded)

ENTRY_COST = 64 * 1024  # what one entry costs beside its bytes (open, stat, metadata): ~64 KiB of reading
PARTS_PER_WORKER = 4  # enough parts for work stealing to even out uneven ones


@dataclass
class SplitDir:
    """A directory the plan splits: its own entry, its split subdirectories and its parts."""

    path: str
    entry: Entry
    dirs: list["SplitDir"] = field(default_factory=list)
    parts: list[TreePart] = field(default_factory=list)


@dataclass
class Plan:
    root: SplitDir  # the root is always split, so the driver writes the root object
    parts: list[TreePart]
    total_bytes: int
    total_entries: int
    errors: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{len(self.parts)} parts over {self.total_entries} entries, {self.total_bytes} bytes "
                f"(largest part {max((p.est_bytes for p in self.parts), default=0)} bytes)")


@dataclass
class _Measured:
    path: str
    st: os.stat_result
    bytes: int = 0
    entries: int = 0
    children: list = field(default_factory=list)  # (name, stat | None, _Measured | None) in name order
    inside: list[str] = field(default_factory=list)  # patterns in effect inside this directory
    readable: bool = True


def plan_tree(root_path: str, excludes: list[str], workers: int, one_file_system: bool = False,
              previous_root: str | None = None, objects=None, parts_per_worker: int = PARTS_PER_WORKER,
              measured: "MeasuredTree | None" = None) -> Plan:
    """Plan the parts of a backup of ``root_path`` for ``workers`` pullers (from ``measured``, if
    the caller measured the tree already)."""
    measured = measured or measure_tree(root_path, excludes, one_file_system)
    tree = measured.tree
    total = _cost(tree)
    target = max(total // max(1, workers * parts_per_worker), ENTRY_COST)
    parts: list[TreePart] = []
    errors = list(measured.errors)
    root = _split(tree, "", list(excludes), previous_root, objects, target, parts, errors)
    return Plan(root, parts, tree.bytes, tree.entries, errors)


@dataclass
class MeasuredTree:
    tree: "_Measured"
    errors: list[dict]

    @property
    def entries(self) -> int:
        return self.tree.entries


def measure_tree(root_path: str, excludes: list[str], one_file_system: bool = False,
                 sizes: bool = True) -> MeasuredTree:
    """Walk the tree's metadata once. Without ``sizes``, only directories are stat'ed (a file
    costs ``ENTRY_COST`` whatever its size): a quarter of the time, for a local multi-process
    backup of many small files, where entries, not bytes, are the work."""
    errors: list[dict] = []
    st = os.stat(root_path)
    tree = _measure(root_path, st, list(excludes), st.st_dev, one_file_system, root_path, errors, sizes)
    return MeasuredTree(tree, errors)


def _cost(m: _Measured) -> int:
    return m.bytes + ENTRY_COST * m.entries


def _measure(path: str, st: os.stat_result, patterns: list[str], root_dev: int, one_fs: bool, root: str,
             errors: list[dict], sizes: bool) -> _Measured:
    m = _Measured(path, st)
    try:
        with os.scandir(path) as it:
            dirents = sorted(it, key=lambda d: d.name)
    except OSError:
        m.readable = False  # the worker that backs it up reports the error, as a single process would
        return m
    m.inside = patterns + ignore_patterns(path, lambda p, msg: errors.append({"path": p, "error": msg}))
    for d in dirents:
        child_path = os.path.join(path, d.name)
        if is_excluded(child_path, d.name, root, m.inside):
            continue
        if not sizes and not d.is_dir(follow_symlinks=False):
            m.children.append((d.name, None, None))
            m.entries += 1
            continue
        try:
            cst = d.stat(follow_symlinks=False)
        except OSError:
            m.children.append((d.name, None, None))  # reported by the worker as "cannot stat"
            m.entries += 1
            continue
        if statmod.S_ISDIR(cst.st_mode):
            if one_fs and cst.st_dev != root_dev:
                continue
            sub = _measure(child_path, cst, m.inside, root_dev, one_fs, root, errors, sizes)
            m.children.append((d.name, cst, sub))
            m.bytes += sub.bytes
            m.entries += 1 + sub.entries
        else:
            m.children.append((d.name, cst, None))
            m.bytes += cst.st_size if statmod.S_ISREG(cst.st_mode) else 0
            m.entries += 1
    return m


def _split(m: _Measured, name: str, outer: list[str], prev_oid: str | None, objects, target: int,
           parts: list[TreePart], errors: list[dict]) -> SplitDir:
    node = SplitDir(m.path, make_entry(m.path, name, m.st, TYPE_DIR,
                                       lambda p, msg: errors.append({"path": p, "error": msg}),
                                       follow=not name))  # (the root: a symlink to it is followed)
    prev = _previous_children(objects, prev_oid)
    batch: list[str] = []
    batch_bytes = batch_cost = batch_entries = 0

    def close_batch():
        nonlocal batch, batch_bytes, batch_cost, batch_entries
        if batch:
            parts.append(TreePart(m.path, batch, list(m.inside), prev_oid, batch_bytes, batch_entries))
            node.parts.append(parts[-1])
        batch, batch_bytes, batch_cost, batch_entries = [], 0, 0, 0

    for child_name, cst, sub in m.children:
        if sub is not None and sub.readable and _cost(sub) + ENTRY_COST > target:
            old = prev.get(child_name)
            child_prev = old.oid if old is not None and old.type == TYPE_DIR else None
            node.dirs.append(_split(sub, child_name, m.inside, child_prev, objects, target, parts, errors))
            continue
        # a directory that fits (or cannot be read: its part reports it) goes whole into a batch
        if sub is not None:
            size, entries = sub.bytes, sub.entries + 1
        else:
            size, entries = (cst.st_size if cst is not None and statmod.S_ISREG(cst.st_mode) else 0), 1
        cost = size + ENTRY_COST * entries
        if batch and batch_cost + cost > target:
            close_batch()
        batch.append(child_name)
        batch_bytes += size
        batch_cost += cost
        batch_entries += entries
    close_batch()
    return node


def _previous_children(objects, prev_oid: str | None) -> dict[str, Entry]:
    if not prev_oid or objects is None:
        return {}
    try:
        return {e.name: e for e in read_directory(objects, prev_oid)}
    except KdistError:  # a damaged previous snapshot only costs re-reading, as in the uploader
        return {}


def assemble(root: SplitDir, results: dict[int, list[Entry]], parts: list[TreePart]) -> DirNode:
    """The tree of ``DirNode`` for the uploader to write: every split directory with its split
    subdirectories and the entries its parts returned (``results`` by part index), in name order."""
    index_of = {id(p): i for i, p in enumerate(parts)}

    def build(s: SplitDir) -> DirNode:
        children: list = [build(d) for d in s.dirs]
        for p in s.parts:
            children.extend(results[index_of[id(p)]])
        children.sort(key=lambda c: (c.entry if isinstance(c, DirNode) else c).name)
        return DirNode(s.entry, children)

    return build(root)


def parts_totals(plan: Plan, results: dict[int, dict]) -> tuple[BackupStats, list[dict]]:
    """The parts' stats added up, and their errors after the plan's own."""
    stats = BackupStats()
    errors = list(plan.errors)
    for r in results.values():
        for k, v in r["stats"].items():
            setattr(stats, k, getattr(stats, k) + v)
        errors += r["error_list"]
    return stats, errors


def publish_parts(repo, options: BackupOptions, source: Source, plan: Plan, results: dict[int, dict],
                  run: str, start: float) -> Snapshot:
    """Every part is done (``results`` by part index, each with its ``entries``, ``stats`` and
    ``error_list``): write the split directories, publish the snapshot (of a backup that began at
    ``start``), then forget the run's checkpoints, which the snapshot supersedes (those of failed
    attempts of a part too)."""
    stats, errors = parts_totals(plan, results)
    tree = assemble(plan.root, {i: r["entries"] for i, r in results.items()}, plan.parts)
    stats.dirs += _count_dirs(plan.root)
    snap = Uploader(repo, options).publish_tree(source, tree, stats, errors, start)
    repo.manifests.delete([r.id for r in repo.manifests.find(type=SNAPSHOT_LABEL, run=run)])
    return snap


def _count_dirs(split: SplitDir) -> int:
    return 1 + sum(_count_dirs(d) for d in split.dirs)
