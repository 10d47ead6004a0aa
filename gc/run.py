"""One maintenance run: plan each step on the storage's clock, print or execute it, record it.

Steps, in order (a full run does all; ``quick`` skips the three that walk snapshots and packs):
1. content GC (full): mark unreachable contents deleted, undelete reachable ones;
2. index: advance the epoch, compact settled epochs, merge ranges (dropping deleted entries
   below the watermark), delete superseded index blobs;
3. blob GC (full): delete packs no index entry points into that an earlier run found so too,
   record the newly found ones for a later run;
4. pack rewrite (full): move live contents out of mostly dead or small packs;
5. checkpoints: forget those of dead backups (a sharded backup's parts: of dead drivers) that a
   later snapshot supersedes; and failure records (``kdist.failures``) stored more than 30 days
   ago;
6. manifests: compact many small manifest blobs into one;
7. housekeeping: delete stale probe blobs, dead session markers and the slots of removed keys;
   reclaim what cut writes left in the storage (temp files, empty shard directories, unfinished
   multipart uploads);
8. Object Lock (full, on a bucket with it): extend the retention of what maintenance keeps
   (``gc/object_lock.py``). A delete the lock refuses is left for a later run in every step.
No step takes a lock. Two runs at once may repeat work; the rules keep either from losing data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repo_format import constants as C
from repo_format.errors import KdistError, StorageError
from repo_format.repository import Repository
from repo_format.safety import SAFETY_FULL, SafetyParameters, safety_of
from repo_format.session import live_sessions
from repo_format.keyslots import slot_name
from repo_format.storage.base import BlobStorage

from kdist.failures import FAILURE_KEEP, plan_failures
from kdist.gc import DEFAULT_MEMORY_LIMIT, history
from kdist.gc.blob_gc import Rules as BlobRules
from kdist.gc.blob_gc import confirmation_margin, execute_blob_gc, plan_from
from kdist.gc.checkpoints import execute_checkpoints, plan_checkpoints
from kdist.gc.clock_guard import StorageClock
from kdist.gc.content_gc import execute_content_gc, plan_content_gc
from kdist.gc.index_maintenance import execute_index, plan_index
from kdist.gc.object_lock import Deletions, extend_locks, missing_lock
from kdist.gc.pack_rewrite import execute_rewrite, plan_rewrite


class UnsafeMaintenance(KdistError):
    """The requested safety preset is not allowed on this repository now."""


@dataclass
class Rules:
    """Every safety rule, on by default. The simulator's mutation tests switch one off at a time
    to show the simulator catches its absence; nothing else does."""

    content_age: bool = True
    two_cycle_drop: bool = True
    pack_age: bool = True
    live_session: bool = True
    pause_revalidation: bool = True
    two_phase_delete: bool = True
    checkpoint_session: bool = True
    merge_copies_first: bool = True
    spent_tombstones: bool = True
    failure_type: bool = True
    part_driver: bool = True
    # merges read a winner competing with entries elsewhere before letting those go (a host's
    # forged entries; its mutation check is in tests/security/test_hostile_host.py)
    relocate: bool = True


@dataclass
class MaintenanceOptions:
    full: bool = True
    dry_run: bool = False
    safety: SafetyParameters | None = None  # None: the repository's own
    rules: Rules = field(default_factory=Rules)
    memory_limit: int = DEFAULT_MEMORY_LIMIT  # what the plans hold at once (the index is mapped, not counted)
    failure_keep: float = FAILURE_KEEP  # seconds a failure record is kept (the simulator scales it)
    pool: object = None  # Ray actors sharing content GC's walk and plan (kdist.gc.ray_pool.RayPool)


@dataclass
class MaintenanceReport:
    start: float
    plans: list[str] = field(default_factory=list)
    steps: dict = field(default_factory=dict)
    freed_bytes: int = 0
    dry_run: bool = False


def _refuse_unsafe(storage: BlobStorage, now: float, own_session: str) -> None:
    """The ``none`` preset is for tests: refuse it where another client may be writing."""
    others = live_sessions(list(storage.list(C.SESSION_PREFIX)), now, SAFETY_FULL.session_expiry) - {own_session}
    recent = [m for m in storage.list() if now - m.timestamp < SAFETY_FULL.listing_settle
              and not m.name.startswith(C.PROBE_PREFIX) and not m.name.endswith(own_session)]
    if others or recent:
        raise UnsafeMaintenance(
            "refusing --safety none: another client has written to this repository recently "
            f"({len(others)} live sessions, {len(recent)} recent blobs); it is for tests only"
        )


def run_maintenance(repo: Repository, options: MaintenanceOptions | None = None) -> MaintenanceReport:
    """Run every step to completion."""
    steps = maintenance_steps(repo, options)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def maintenance_steps(repo: Repository, options: MaintenanceOptions | None = None,
                      clock: StorageClock | None = None):
    """The run as a generator that yields between steps (the simulator interleaves them with
    other clients and pauses them); returns the report."""
    options = options or MaintenanceOptions()
    storage = repo.storage
    missing = missing_lock(storage, repo.parameters.extra.get("object_lock"))
    if missing:  # before the first delete (the clock's probe): it would be a plain DELETE
        raise StorageError(missing)
    safety = options.safety or safety_of(repo.parameters)
    rules = options.rules
    clock = clock or StorageClock(storage, repo.session, safety.max_pause, enabled=rules.pause_revalidation)
    now = clock.start
    if safety.is_unsafe():
        _refuse_unsafe(storage, now, repo.session)
    report = MaintenanceReport(start=now, dry_run=options.dry_run)
    record = history.RunRecord(start=now, mode="full" if options.full else "quick")
    epochs = repo.contents.epochs
    epochs.safety = safety
    past = history.read_history(repo.manifests)
    watermark = (history.deletion_watermark(past, safety.drop_margin, now, safety.listing_settle)
                 if rules.two_cycle_drop else now)
    confirmed = history.confirmed_pack_candidates(past, now, confirmation_margin(safety))
    garbage: set[str] = set()  # what this run found collectable: Object Lock must not keep it
    delete = Deletions(storage, now, history.known_locks(past, now))

    if options.full:  # 1. content GC
        index = epochs.load_index()
        plan = plan_content_gc(repo, index, now, safety.min_content_age if rules.content_age else 0.0,
                               options.memory_limit, options.pool)
        del index
        report.plans.append(plan.describe())
        report.steps["content_gc"] = {"marked": plan.marked, "undeleted": plan.undeleted, "live": plan.live,
                                      "key_ranges": plan.key_ranges, "spilled_runs": plan.spilled_runs,
                                      "walk_seconds": plan.walk_seconds}
        yield "content-gc planned"
        if not options.dry_run:
            execute_content_gc(repo, plan, clock, compensate_late=rules.pause_revalidation)
            record.content_gc_completed = True
            yield "content-gc executed"
        plan.close()

    view = epochs.refresh()  # 2. index
    iplan = plan_index(epochs, view, now, history.droppable_entries(past, watermark),
                       history.set_merges(past, now, safety.cleanup_margin))
    report.plans.append(iplan.describe())
    garbage.update(m.name for m in iplan.delete)
    yield "index planned"
    if not options.dry_run:
        report.steps["index"] = execute_index(epochs, iplan, int(watermark * 1e6), clock, delete,
                                              options.memory_limit // 2, copies_first=rules.merge_copies_first,
                                              verify=repo.contents.reader.authentic if rules.relocate else None)
        yield "index executed"

    if options.full:  # 3. blob GC: list packs, then read the index that may point into them
        packs = [m for p in C.PACK_PREFIXES for m in storage.list(p)]
        index = epochs.load_index()
        bplan = plan_from(packs, index, storage, clock.now(), safety.pack_age, safety.session_expiry,
                          BlobRules(pack_age=rules.pack_age, live_session=rules.live_session,
                                    two_phase=rules.two_phase_delete), confirmed)
        report.plans.append(bplan.describe())
        report.steps["blob_gc"] = {"deleted_packs": len(bplan.delete), "bytes": sum(m.length for m in bplan.delete),
                                   "candidates": len(bplan.candidates)}
        record.pack_candidates = [[m.name, m.length] for m in bplan.candidates]
        garbage.update(m.name for m in bplan.delete + bplan.candidates)
        yield "blob-gc planned"
        if not options.dry_run:
            freed, locked = execute_blob_gc(storage, bplan, clock, delete)
            report.freed_bytes += freed
            if locked:  # left for a later run
                report.steps["blob_gc"].update(kept_locked=locked, deleted_packs=len(bplan.delete) - locked)
            yield "blob-gc executed"

        # 4. pack rewrite, planned from the same listing and index
        t = clock.now()
        live = live_sessions(list(storage.list(C.SESSION_PREFIX)), t, safety.session_expiry)
        sizes = {False: repo.parameters.pack_size, True: repo.parameters.metadata_pack_size}
        rplan = plan_rewrite(packs, index, live, t, safety.pack_age, sizes, rules.pack_age, rules.live_session,
                             options.memory_limit // 2)
        report.plans.append(rplan.describe())
        report.steps["pack_rewrite"] = {"packs": len(rplan.packs), "moved": len(rplan.move),
                                        "bytes": sum(e.packed_length for e in rplan.move)}
        yield "pack-rewrite planned"
        if not options.dry_run and rplan.move:
            report.steps["pack_rewrite"] = execute_rewrite(repo.contents, rplan, clock)
            yield "pack-rewrite executed"

    # 5. old failure records, and checkpoints of dead backups
    old_failures = plan_failures(repo.manifests, clock.now(), options.failure_keep, rules.failure_type)
    report.plans.append(f"failure records: forget {len(old_failures)} stored more than "
                        f"{options.failure_keep / 86400:g} days ago")
    cplan = plan_checkpoints(repo.manifests, storage, clock.now(), safety, rules.checkpoint_session,
                             driver_rule=rules.part_driver)
    report.plans.append(cplan.describe())
    if not options.dry_run:
        repo.manifests.delete([r.id for r in old_failures])
        report.steps["failures_forgotten"] = len(old_failures)
        report.steps["checkpoints_forgotten"] = execute_checkpoints(repo.manifests, cplan)

    if not options.dry_run:  # 6. manifests, 7. housekeeping
        report.steps["manifests_merged"] = repo.manifests.compact(clock.now(), safety.listing_settle,
                                                                  tombstone_rule=rules.spent_tombstones, delete=delete)
        garbage.update(repo.manifests.covered)
        removed_slots = _removed_key_slots(repo)
        garbage.update(removed_slots)
        report.steps["housekeeping"] = _housekeeping(storage, clock, safety, removed_slots, delete)
        # what cut writes leave (temp files, emptied shard directories, multipart uploads), once
        # older than any put can take: a pack younger than pack_age is never judged either
        report.steps["leftovers"] = storage.reclaim_leftovers(clock.now(), safety.pack_age)
        garbage.update(delete.locked)
        if options.full:  # 8. a quick run knows no unreferenced packs: it would lock them too
            lock = extend_locks(storage, clock.now(), garbage)
            if lock:
                report.steps["object_lock"] = {**lock, "kept_locked": len(delete.locked)}
        record.locked = delete.record()
        record.end = clock.now()
        record.steps = report.steps
        history.write_record(repo.manifests, record)
    return report


def _removed_key_slots(repo: Repository) -> set[str]:
    """The slots of keys the root removed (``key remove`` deletes them, unless Object Lock kept
    them): only a root-signed record says so (the registry of ``Trust``)."""
    return {slot_name(k.key_id) for k in repo.manifests.keys.values() if k.revoked}


def _housekeeping(storage: BlobStorage, clock: StorageClock, safety: SafetyParameters,
                  removed_slots: set[str], delete: Deletions) -> int:
    now = clock.now()
    stale = [m for m in storage.list(C.PROBE_PREFIX) if now - m.timestamp > max(safety.max_pause, 60.0)]
    stale += [m for m in storage.list(C.SESSION_PREFIX) if now - m.timestamp >= 2 * safety.session_expiry
              and safety.session_expiry > 0]
    stale += [m for m in storage.list(C.KEY_SLOT_PREFIX) if m.name in removed_slots]
    return sum(delete(m.name, m.timestamp) for m in stale)
