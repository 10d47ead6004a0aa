"""Blob GC: delete packs that nothing can need any more.

A pack is deleted only if (1) no entry in the assembled index points into it, deleted entries
and entries that lose a conflict included (a loser can resurface when a winner is dropped),
(2) it is at least ``pack_age`` old on the storage's clock, and (3) the session named in it is
not live. The plan is made first; deletions run in batches, each after a fresh storage-clock
check that the run did not pause too long since planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repo_format import constants as C
from repo_format.index import MergedIndex
from repo_format.session import live_sessions, session_of
from repo_format.storage.base import BlobMeta, BlobStorage

from kdist.gc.clock_guard import StorageClock

BATCH = 200


@dataclass
class BlobGCPlan:
    now: float
    delete: list[BlobMeta] = field(default_factory=list)
    kept_referenced: int = 0
    kept_young: int = 0
    kept_live_session: int = 0

    def describe(self) -> str:
        return (f"blob GC: delete {len(self.delete)} unreferenced packs ({sum(b.length for b in self.delete)} bytes); "
                f"kept {self.kept_referenced} referenced, {self.kept_young} younger than the pack age, "
                f"{self.kept_live_session} of live sessions")


@dataclass
class Rules:
    """The blob-GC safety rules; each can be switched off only by the simulator's mutation tests."""

    pack_age: bool = True
    live_session: bool = True


def plan_from(packs: list[BlobMeta], index: MergedIndex, storage: BlobStorage, now: float, pack_age: float,
              session_expiry: float, rules: Rules = Rules()) -> BlobGCPlan:
    """Plan deletions among ``packs``. The index must be loaded after the packs were listed, so
    that a pack listed here and indexed before the index was read is seen as referenced."""
    referenced = {e.pack for e in index.physical_entries()}
    live = live_sessions(list(storage.list(C.SESSION_PREFIX)), now, session_expiry)
    plan = BlobGCPlan(now=now)
    for m in packs:
        if m.name in referenced:
            plan.kept_referenced += 1
        elif rules.pack_age and now - m.timestamp < pack_age:
            plan.kept_young += 1
        elif rules.live_session and session_of(m.name) in live:
            plan.kept_live_session += 1
        else:
            plan.delete.append(m)
    return plan


def execute_blob_gc(storage: BlobStorage, plan: BlobGCPlan, clock: StorageClock) -> int:
    deleted = 0
    for i in range(0, len(plan.delete), BATCH):
        clock.check(plan.now, "deleting packs")
        for m in plan.delete[i:i + BATCH]:
            storage.delete(m.name)
            deleted += m.length
    return deleted
