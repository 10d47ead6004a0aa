"""Snapshot GC: which contents are live, which to mark deleted, which to undelete.

Plan: walk every snapshot and checkpoint that is not forgotten, collecting every content id they
reach (directory objects, chunk lists, chunks). Any content not reached, not already deleted, and
whose pack is at least ``min_content_age`` old on the storage's clock is marked deleted; a deleted
content that a snapshot reaches is undeleted. If any snapshot cannot be walked completely the
plan is refused: nothing is ever marked on incomplete knowledge.

Execute: one index blob with the new entries. A mark is timestamped after both the entry it
replaces and the run's start, an undelete after the mark it replaces, so the conflict rule
orders them causally whatever any client's clock says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from repo_format import constants as C
from repo_format.errors import KdistError
from repo_format.index import IndexEntry, MergedIndex
from repo_format.objects import parse_object_id
from repo_format.repository import Repository

from kdist.snapshot import TYPE_DIR, TYPE_FILE, SNAPSHOT_LABEL, Snapshot, read_directory


class IncompleteWalk(KdistError):
    """A snapshot could not be walked; content GC refuses to mark anything."""


@dataclass
class ContentGCPlan:
    now: float
    snapshots: int = 0
    live: int = 0
    mark: list[IndexEntry] = field(default_factory=list)
    undelete: list[IndexEntry] = field(default_factory=list)
    too_young: int = 0

    def describe(self) -> str:
        freed = sum(e.packed_length for e in self.mark)
        return (f"content GC: {self.snapshots} snapshots reach {self.live} contents; mark {len(self.mark)} "
                f"unreferenced contents deleted ({freed} bytes), undelete {len(self.undelete)}, "
                f"{self.too_young} unreferenced but younger than the minimum age")


def live_contents(repo: Repository) -> tuple[set[bytes], int]:
    """Every content id reachable from every live snapshot and checkpoint."""
    records = repo.manifests.find(type=SNAPSHOT_LABEL)
    # Read through an index loaded after that listing, so that a snapshot published since the
    # repository was opened can be walked. Marks are planned from the index loaded before it.
    repo.contents.refresh_index()
    live: set[bytes] = set()
    seen_dirs: set[str] = set()
    for rec in records:
        snap = Snapshot.from_record(rec)
        stack = [snap.root]
        try:
            while stack:
                oid = stack.pop()
                if oid in seen_dirs:
                    continue
                seen_dirs.add(oid)
                live.update(_object_contents(repo, oid))
                for e in read_directory(repo.objects, oid):
                    if e.type == TYPE_DIR:
                        stack.append(e.oid)
                    elif e.type == TYPE_FILE and e.oid:
                        live.update(_object_contents(repo, e.oid))
        except KdistError as exc:
            raise IncompleteWalk(f"snapshot {snap.id} cannot be walked ({exc}); refusing to collect garbage") from exc
    return live, len(records)


def _object_contents(repo: Repository, oid: str) -> list[bytes]:
    indirect, cid = parse_object_id(oid)
    if not indirect:
        return [cid]
    return [cid] + [c for c, _ in repo.objects.chunks(oid)]


def plan_content_gc(repo: Repository, index: MergedIndex, now: float, min_content_age: float) -> ContentGCPlan:
    """``index`` must be loaded before the snapshots are listed (a content written after the
    listing of the index cannot be marked: it is not in the index)."""
    live, count = live_contents(repo)
    plan = ContentGCPlan(now=now, snapshots=count, live=len(live))
    pack_times = {m.name: m.timestamp for p in C.PACK_PREFIXES for m in repo.storage.list(p)}
    for e in index:
        if e.content_id in live:
            if e.deleted:
                plan.undelete.append(e)
        elif not e.deleted:
            written = pack_times.get(e.pack)
            if written is not None and now - written >= min_content_age:
                plan.mark.append(e)
            else:
                plan.too_young += 1
    return plan


def execute_content_gc(repo: Repository, plan: ContentGCPlan, clock, compensate_late: bool = True) -> str | None:
    """Write the marks and undeletes that still apply. Marks carry the storage time read just before writing
    them, so only cycles that start after the marks exist (and walk every snapshot published
    meanwhile, undeleting what those reach) can let a merge drop them. If the write itself
    lands more than ``max_pause`` after that time (a pause between reading the clock and the
    put), the marks are withdrawn at once: a cycle in between could not have seen them."""
    # Re-validate the plan against a fresh index: act only on entries that are still the
    # winners. A plan made from an older view (a long walk, a pause) would otherwise mark a
    # location that a writer has since replaced, with a timestamp newer than the replacement.
    fresh = repo.contents.epochs.load_index()
    current = [e for e in plan.mark if fresh.lookup(e.content_id) == e]
    revive = [e for e in plan.undelete if fresh.lookup(e.content_id) == e]
    marked_at = clock.now()
    stamp = int(marked_at * 1e6)
    marks = [replace(e, deleted=True, timestamp_us=max(e.timestamp_us + 1, stamp)) for e in current]
    undeletes = [replace(e, deleted=False, timestamp_us=e.timestamp_us + 1) for e in revive]
    if not marks and not undeletes:
        return None
    name = repo.contents.epochs.write_index(marks + undeletes)
    if marks and compensate_late:
        written = repo.storage.stat(name).timestamp
        if written - marked_at > clock.max_pause:
            repo.contents.epochs.write_index([replace(m, deleted=False, timestamp_us=m.timestamp_us + 1) for m in marks])
    return name
