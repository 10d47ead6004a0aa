"""Snapshot GC: which contents are live, which to mark deleted, which to undelete.

Plan: walk every snapshot and checkpoint that is not forgotten (``kdist.tree``: each directory
object once across all of them), collecting the keys of every content they reach into sorted runs
on disk (``reachable.ReachableKeys``). Then go through the index's winning entries one key range
at a time (``repo_format.index_scan``): any content not reached, not already deleted, and whose
pack is at least ``min_content_age`` old on the storage's clock is marked deleted; a deleted
content that a snapshot reaches is undeleted. The planned rows go to disk too, so the memory a
run holds is bounded by ``memory_limit`` whatever the repository's size (plus one entry per
directory object for the walk's visited set). If any snapshot cannot be walked completely the
plan is refused: nothing is ever marked on incomplete knowledge.

Execute: range by range, keep the planned rows that are still the winners of a freshly loaded
index; write them as index blobs of at most ``C.INDEX_BLOB_MAX_ENTRIES`` entries. A mark is
timestamped after both the entry it replaces and the storage time read just before its blob is
written, an undelete after the mark it replaces, so the conflict rule orders them causally
whatever any client's clock says.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from repo_format import clock
from repo_format import constants as C
from repo_format.errors import KdistError
from repo_format.index import MAX_TIMESTAMP_US, IndexEntry, MergedIndex
from repo_format.index_scan import FLAGS_AT, PACK_AT, PLEN_AT, TS_AT, Winners, column, encode_rows, entries_of
from repo_format.repository import Repository

from kdist.gc import DEFAULT_MEMORY_LIMIT
from kdist.gc.reachable import ReachableKeys
from kdist.snapshot import SNAPSHOT_LABEL, Snapshot
from kdist.tree import TreeWalker, reached_contents


class IncompleteWalk(KdistError):
    """A snapshot could not be walked; content GC refuses to mark anything."""


@dataclass
class ContentGCPlan:
    now: float
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    snapshots: int = 0
    live: int = 0
    marked: int = 0
    marked_bytes: int = 0
    undeleted: int = 0
    too_young: int = 0
    key_ranges: int = 0  # how many ranges the index was read in (the memory limit decides)
    spilled_runs: int = 0  # sorted runs of reached keys written to disk
    walk_seconds: float = 0.0
    packs: list[str] = field(default_factory=list)  # what the rows' pack numbers name
    ranges: list[tuple[int, int]] = field(default_factory=list)  # key ranges that plan something
    spill: tempfile.TemporaryDirectory | None = None

    def describe(self) -> str:
        return (f"content GC: {self.snapshots} snapshots reach {self.live} contents; mark {self.marked} "
                f"unreferenced contents deleted ({self.marked_bytes} bytes), undelete {self.undeleted}, "
                f"{self.too_young} unreferenced but younger than the minimum age")

    def _path(self, i: int, what: str) -> str:
        return os.path.join(self.spill.name, f"{i}-{what}.npy")

    def store(self, lo: int, hi: int, marks: np.ndarray, undeletes: np.ndarray) -> None:
        if not len(marks) and not len(undeletes):
            return
        if self.spill is None:
            self.spill = tempfile.TemporaryDirectory(prefix="kdist-gc-plan-")
        i = len(self.ranges)
        np.save(self._path(i, "mark"), marks)
        np.save(self._path(i, "undelete"), undeletes)
        self.ranges.append((lo, hi))
        self.marked += len(marks)
        self.marked_bytes += int(column(marks, PLEN_AT, ">u4").astype(np.int64).sum())
        self.undeleted += len(undeletes)

    def planned(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        for i, (lo, hi) in enumerate(self.ranges):
            yield lo, hi, np.load(self._path(i, "mark")), np.load(self._path(i, "undelete"))

    def entries(self) -> tuple[list[IndexEntry], list[IndexEntry]]:
        """Every planned mark and undelete as entries (tests, small repositories)."""
        marks, undeletes = [], []
        for _lo, _hi, m, u in self.planned():
            marks += entries_of(m, self.packs)
            undeletes += entries_of(u, self.packs)
        return marks, undeletes

    def close(self) -> None:
        if self.spill is not None:
            self.spill.cleanup()


def reach_snapshots(repo: Repository, reach: ReachableKeys) -> int:
    """Add every content every live snapshot and checkpoint reaches; returns how many were walked."""
    records = repo.manifests.find(type=SNAPSHOT_LABEL)
    # Read through an index loaded after that listing, so that a snapshot published since the
    # repository was opened can be walked. Marks are planned from the index loaded before it.
    repo.contents.refresh_index()
    walker = TreeWalker.over(repo.objects, max_depth=None)
    for rec in records:
        snap = Snapshot.from_record(rec)
        try:
            reach.update(reached_contents(walker, repo.objects, snap.root))
        except KdistError as exc:
            raise IncompleteWalk(f"snapshot {snap.id} cannot be walked ({exc}); refusing to collect garbage") from exc
    return len(records)


def plan_content_gc(repo: Repository, index: MergedIndex, now: float, min_content_age: float,
                    memory_limit: int = DEFAULT_MEMORY_LIMIT, pool=None) -> ContentGCPlan:
    """``index`` must be loaded before the snapshots are listed (a content written after the
    listing of the index cannot be marked: it is not in the index). ``pool``: Ray actors that
    share the walk and the ranges out (``kdist.gc.ray_pool``); the plan is the same."""
    plan = ContentGCPlan(now=now, memory_limit=memory_limit)
    with ReachableKeys(buffer_bytes=memory_limit // 4) as reach:
        started = clock.monotonic()
        plan.snapshots = pool.reach(repo, reach) if pool is not None else reach_snapshots(repo, reach)
        plan.walk_seconds = round(clock.monotonic() - started, 3)
        scan = index.scan(memory_limit // 2)
        plan.packs, plan.key_ranges = scan.packs, scan.ranges_count
        written = pack_times(repo.storage, scan.packs, _named_by_young_blobs(repo, index, now))
        ranges = (pool.plan_ranges(index, scan, reach, written, now, min_content_age) if pool is not None
                  else (plan_range(w, reach.between(w.lo, w.hi), written, now, min_content_age) for w in scan))
        for lo, hi, marks, undeletes, live, too_young in ranges:
            plan.live += live
            plan.too_young += too_young
            plan.store(lo, hi, marks, undeletes)
        plan.spilled_runs = reach.runs
    return plan


def pack_times(storage, packs: list[str], maybe_unlisted: set[str] | None = frozenset()) -> np.ndarray:
    """When each pack was written (storage clock), listed after the index was loaded. A pack
    not listed is one that does not exist (-inf: as old as can be, so its unreferenced entries
    are marked and, in time, dropped: a host's entries pointing nowhere are garbage like any),
    unless only index blobs stored less than ``listing_settle`` ago name it (``maybe_unlisted``;
    None: any pack): a listing may not show that fresh a pack yet (nan: never old)."""
    listed = {m.name: m.timestamp for p in C.PACK_PREFIXES for m in storage.list(p)}
    return np.array([listed.get(p, np.nan if maybe_unlisted is None or p in maybe_unlisted else -np.inf)
                     for p in packs], dtype=np.float64)


def _named_by_young_blobs(repo: Repository, index: MergedIndex, now: float) -> set[str] | None:
    """The packs that only index blobs stored less than ``listing_settle`` before ``now`` name: a
    pack is put before every blob naming it, so one older blob naming it proves it is listed if
    it exists (a host writing fresh blobs that name its made-up pack keeps nothing young). None
    when the blobs' names or times are unknown: then every unlisted pack is spared."""
    view = repo.contents.epochs.view
    named = index.named_blobs()
    if view is None or not named:
        return None
    stored = {m.name: m.timestamp for blobs in view.raw.values() for m in blobs}
    stored.update((m.name, m.timestamp) for sets in view.sets.values() for st in sets for m in st.members.values())
    settle = repo.contents.safety.listing_settle
    young: set[str] = set()
    old: set[str] = set()
    for name, blob in named:
        t = stored.get(name)
        (young if t is None or now - t < settle else old).update(blob.packs)
    return young - old


def plan_range(w: Winners, reached: np.ndarray, written: np.ndarray, now: float, min_content_age: float) -> tuple:
    """One key range's part of the plan: ``(lo, hi, marks, undeletes, live, too_young)``."""
    hit = _members(w.keys, reached)
    deleted = w.deleted
    with np.errstate(invalid="ignore"):
        old = now - written[w.pack] >= min_content_age  # nan (maybe not listed yet) is never old
    unreached_live = ~deleted & ~hit
    return (w.lo, w.hi, w.rows[unreached_live & old], w.rows[deleted & hit], len(reached),
            int((unreached_live & ~old).sum()))


def _members(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(keys), bool)
    at = np.minimum(sorted_set.searchsorted(keys), len(sorted_set) - 1)
    return sorted_set[at] == keys


def _still_winning(rows: np.ndarray, fresh: Winners, renumber: np.ndarray) -> np.ndarray:
    """Rows (numbered as the plan's scan) that are exactly the fresh winner of their id,
    renumbered as the fresh scan; the others dropped."""
    if not len(rows) or not len(fresh):
        return rows[:0]
    rows = rows.copy()
    numbers = renumber[column(rows, PACK_AT, ">u4")]
    rows = rows[numbers >= 0]  # a pack the fresh index does not name: not the winner any more
    rows[:, PACK_AT:PACK_AT + 4] = numbers[numbers >= 0].astype(">u4").view(np.uint8).reshape(-1, 4)
    ids = np.ascontiguousarray(fresh.rows[:, :C.CONTENT_ID_SIZE]).view(f"S{C.CONTENT_ID_SIZE}").ravel()
    wanted = np.ascontiguousarray(rows[:, :C.CONTENT_ID_SIZE]).view(f"S{C.CONTENT_ID_SIZE}").ravel()
    at = np.minimum(ids.searchsorted(wanted), len(ids) - 1)
    same = (fresh.rows[at] == rows).all(axis=1)
    return rows[same]


WRITE_BATCH = C.INDEX_BLOB_MAX_ENTRIES  # marks and undeletes an index blob holds


def _restamped(rows: np.ndarray, deleted: bool, at_least: int = 0) -> np.ndarray:
    """The rows as marks (``deleted``) or undeletes of the entries they are: the flag set or
    cleared, the timestamp one microsecond after theirs, and at least ``at_least``."""
    out = rows.copy()
    ts = np.maximum(np.minimum(column(out, TS_AT, ">i8").astype(np.int64), MAX_TIMESTAMP_US - 1) + 1, at_least)  # stamp_after
    out[:, TS_AT:TS_AT + 8] = ts.astype(">i8").view(np.uint8).reshape(-1, 8)
    flags = out[:, FLAGS_AT]
    out[:, FLAGS_AT] = (flags | C.INDEX_FLAG_DELETED) if deleted else (flags & ~np.uint8(C.INDEX_FLAG_DELETED))
    return out


def _by_id(rows: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(rows[:, :C.CONTENT_ID_SIZE]).view(f"S{C.CONTENT_ID_SIZE}").ravel()
    return rows[np.argsort(ids, kind="stable")]


def execute_content_gc(repo: Repository, plan: ContentGCPlan, clock, compensate_late: bool = True) -> list[str]:
    """Write the marks and undeletes that still apply; returns the index blobs written.

    Re-validated against a fresh index, range by range: act only on entries that are still the
    winners. A plan made from an older view (a long walk, a pause) would otherwise mark a
    location that a writer has since replaced, with a timestamp newer than the replacement.
    Marks carry the storage time read just before their blob is written, so only cycles that
    start after the marks exist (and walk every snapshot published meanwhile, undeleting what
    those reach) can let a merge drop them. If a blob lands more than ``max_pause`` after that
    time (a pause between reading the clock and the put), its marks are withdrawn at once: a
    cycle in between could not have seen them."""
    epochs = repo.contents.epochs
    fresh = epochs.load_index().scan(plan.memory_limit // 2)
    number = fresh.pack_number()
    renumber = np.array([number.get(p, -1) for p in plan.packs] or [-1], dtype=np.int64)
    written: list[str] = []
    marks: list[np.ndarray] = []  # rows, numbered as the fresh scan, in key order
    undeletes: list[np.ndarray] = []

    def write() -> None:
        marked_at = clock.now()
        m = _restamped(np.concatenate(marks), deleted=True, at_least=int(marked_at * 1e6))
        rows = np.concatenate([m, _restamped(np.concatenate(undeletes), deleted=False)])
        name = epochs.write_plaintext(encode_rows(_by_id(rows), fresh.packs))
        written.append(name)
        if len(m) and compensate_late and repo.storage.stat(name).timestamp - marked_at > clock.max_pause:
            written.append(epochs.write_plaintext(encode_rows(_restamped(m, deleted=False), fresh.packs)))
        marks.clear()
        undeletes.clear()

    try:
        held = 0
        for lo, hi, m, u in plan.planned():
            winners = fresh.winners(lo, hi)
            marks.append(_still_winning(m, winners, renumber))
            undeletes.append(_still_winning(u, winners, renumber))
            held += len(marks[-1]) + len(undeletes[-1])
            if held >= WRITE_BATCH:
                write()
                held = 0
        if held:
            write()
    finally:
        plan.close()
    return written
