"""Blob GC: delete packs that nothing can need any more, in two phases.

A pack is *deletable* if (1) no entry in the assembled index points into it, deleted entries
and entries that lose a conflict included (a loser can resurface when a winner is dropped),
(2) it is at least ``pack_age`` old on the storage's clock, and (3) the session named in it is
not live. A run deletes only the deletable packs that an earlier run, whose record ended at least
``cleanup_margin`` before this run started, found deletable too (``confirmed``); the others it
records as candidates in its history record for a later run. So an entry that points into a
pack, written from an index loaded before that pack's last entry was dropped, has been listed
by the time the pack could be deleted (gc/README.md). The plan is made first; deletions run in
batches, each after a fresh storage-clock check that the run did not pause too long since planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from repo_format import constants as C
from repo_format.index import MergedIndex
from repo_format.safety import SafetyParameters
from repo_format.session import live_sessions, session_of
from repo_format.storage.base import BlobMeta, BlobStorage

from kdist.gc.clock_guard import StorageClock

BATCH = 200


@dataclass
class BlobGCPlan:
    now: float
    delete: list[BlobMeta] = field(default_factory=list)
    candidates: list[BlobMeta] = field(default_factory=list)  # deletable, not yet confirmed
    kept_referenced: int = 0
    kept_young: int = 0
    kept_live_session: int = 0

    def describe(self) -> str:
        return (f"blob GC: delete {len(self.delete)} unreferenced packs ({sum(b.length for b in self.delete)} bytes) "
                f"that an earlier run found unreferenced too; record {len(self.candidates)} newly unreferenced packs "
                f"({sum(b.length for b in self.candidates)} bytes) for a later run; kept {self.kept_referenced} "
                f"referenced, {self.kept_young} younger than the pack age, {self.kept_live_session} of live sessions")


@dataclass
class Rules:
    """The blob-GC safety rules; each can be switched off only by the simulator's mutation tests."""

    pack_age: bool = True
    live_session: bool = True
    two_phase: bool = True


def confirmation_margin(safety: SafetyParameters) -> float:
    """How long after a run that found a pack deletable a later run may delete it: an entry into
    the pack written from an index listed before that run saw it unreferenced is listed by then
    (a listing lags by ``listing_settle``, an entry is written within ``index_refresh`` of the
    index it derives from, and the later run's listing lags again). ``cleanup_margin``, the same
    margin after which superseded index blobs go, covers that in every preset."""
    return max(safety.cleanup_margin, safety.index_refresh + 2 * safety.listing_settle)


def plan_from(packs: list[BlobMeta], index: MergedIndex, storage: BlobStorage, now: float, pack_age: float,
              session_expiry: float, rules: Rules = Rules(),
              confirmed: set[tuple[str, int]] = frozenset()) -> BlobGCPlan:
    """Plan deletions among ``packs``. The index must be loaded after the packs were listed, so
    that a pack listed here and indexed before the index was read is seen as referenced.
    ``confirmed``: (name, size) of packs an earlier run found deletable long enough ago."""
    referenced = index.referenced_packs()
    live = live_sessions(list(storage.list(C.SESSION_PREFIX)), now, session_expiry)
    plan = BlobGCPlan(now=now)
    for m in packs:
        if m.name in referenced:
            plan.kept_referenced += 1
        elif rules.pack_age and now - m.timestamp < pack_age:
            plan.kept_young += 1
        elif rules.live_session and session_of(m.name) in live:
            plan.kept_live_session += 1
        elif not rules.two_phase or (m.name, m.length) in confirmed:
            plan.delete.append(m)
        else:
            plan.candidates.append(m)
    return plan


def execute_blob_gc(storage: BlobStorage, plan: BlobGCPlan, clock: StorageClock,
                    delete: Callable[[str, float], bool]) -> tuple[int, int]:
    """Delete the planned packs; returns (bytes freed, packs Object Lock kept for a later run).
    ``delete(name, put time)``: maintenance's (``object_lock.Deletions``)."""
    deleted = locked = 0
    for i in range(0, len(plan.delete), BATCH):
        clock.check(plan.now, "deleting packs")
        for m in plan.delete[i:i + BATCH]:
            if delete(m.name, m.timestamp):
                deleted += m.length
            else:
                locked += 1
    return deleted, locked
