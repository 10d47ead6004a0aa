"""Pack rewrite: move the live contents out of packs that are mostly dead or too small.

Plan, from the pack listing and the index blob GC uses (its winners range by range, in bounded
memory: ``repo_format.index_scan``): a pack at least ``pack_age`` old on the
storage's clock, whose session is not live, and that holds live contents (winning entries not
marked deleted) is rewritten when a pack of only its live contents would be under ``LIVE_FRACTION``
of its size (mostly dead), or when it is smaller than ``SMALL_FRACTION`` of its kind's pack size and at least
``SMALL_PACKS`` packs of that kind are (too small: they are combined).

Execute: re-validate against a freshly loaded index (move only entries that are still the
winners), check the storage clock, then copy each content, authenticated, into new packs of the
run's session with entries that win over the old ones, and flush (packs, then one index blob).
Deleted entries are not moved. The old pack stays referenced by the superseded entries until a
range merge drops them (a merge keeps winners only); blob GC then deletes it like any pack that
nothing points into, in two phases. Nothing here deletes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from repo_format import constants as C
from repo_format.content import ContentStore
from repo_format.index import IndexEntry, MergedIndex
from repo_format.session import session_of
from repo_format.storage.base import BlobMeta

from kdist.gc.clock_guard import StorageClock

LIVE_FRACTION = 0.5  # a pack whose live contents fill less than this share of it is mostly dead
SMALL_FRACTION = 0.25  # a pack smaller than this share of its kind's pack size is small
SMALL_PACKS = 4  # small packs are combined only when at least this many of one kind are
# a pack beyond its records: postamble, and a local index of a header, the pack's name, sealed
PACK_OVERHEAD = (C.PACK_POSTAMBLE.size + C.INDEX_HEADER.size + C.INDEX_PACK_NAME_LENGTH.size
                 + C.AEAD_NONCE_SIZE + C.AEAD_TAG_SIZE)


@dataclass
class RewritePlan:
    now: float
    packs: list[BlobMeta] = field(default_factory=list)
    move: list[IndexEntry] = field(default_factory=list)
    mostly_dead: int = 0
    small: int = 0

    def describe(self) -> str:
        return (f"pack rewrite: move {len(self.move)} live contents ({sum(e.packed_length for e in self.move)} bytes) "
                f"out of {len(self.packs)} packs ({sum(m.length for m in self.packs)} bytes; {self.mostly_dead} "
                f"mostly dead, {self.small} small), which blob GC can delete once a range merge drops their entries")


def plan_rewrite(packs: list[BlobMeta], index: MergedIndex, live_sessions: set[str], now: float, pack_age: float,
                 pack_sizes: dict[bool, int], pack_age_rule: bool = True, live_session_rule: bool = True,
                 memory_limit: int = 256 * 2**20) -> RewritePlan:
    """``pack_sizes``: the target pack size of metadata (True) and data (False) packs. Two passes
    over the index's winners, range by range: each pack's live contents and bytes, then the
    entries to move out of the packs chosen."""
    scan = index.scan(memory_limit)
    live_count = np.zeros(len(scan.packs), np.int64)
    live_bytes = np.zeros(len(scan.packs), np.int64)
    for w in scan:
        alive = ~w.deleted
        live_count += np.bincount(w.pack[alive], minlength=len(scan.packs))
        live_bytes += np.bincount(w.pack[alive], weights=w.packed_length[alive], minlength=len(scan.packs)).astype(np.int64)
    number = scan.pack_number()
    eligible = [m for m in packs if m.name in number and live_count[number[m.name]]
                and not (pack_age_rule and now - m.timestamp < pack_age)
                and not (live_session_rule and session_of(m.name) in live_sessions)]
    plan = RewritePlan(now=now)
    small: dict[bool, list[BlobMeta]] = {True: [], False: []}
    for m in eligible:
        metadata = m.name.startswith(C.METADATA_PACK_PREFIX)
        i = number[m.name]
        if _live_size(m.name, int(live_count[i]), int(live_bytes[i])) < LIVE_FRACTION * m.length:
            plan.packs.append(m)
            plan.mostly_dead += 1
        elif m.length < SMALL_FRACTION * pack_sizes[metadata]:
            small[metadata].append(m)
    for group in small.values():
        if len(group) >= SMALL_PACKS:
            plan.packs += group
            plan.small += len(group)
    if plan.packs:
        chosen = np.zeros(len(scan.packs), bool)
        chosen[[number[m.name] for m in plan.packs]] = True
        for w in scan:
            plan.move += w.entries(scan.packs, ~w.deleted & chosen[w.pack])
        plan.move.sort(key=lambda e: (e.pack, e.offset))
    return plan


def _live_size(name: str, count: int, packed_bytes: int) -> int:
    """The size of this pack if it held only its ``count`` live entries of ``packed_bytes`` (a
    fully live pack: its size)."""
    return packed_bytes + count * C.INDEX_ENTRY.size + PACK_OVERHEAD + len(name)


def execute_rewrite(contents: ContentStore, plan: RewritePlan, clock: StorageClock) -> dict:
    """Move what is still where the plan found it. Returns what was done, for the report."""
    fresh = contents.epochs.load_index()
    current = [e for e in plan.move if fresh.lookup(e.content_id) == e]
    done = {"packs": len(plan.packs), "moved": len(current), "bytes": 0, "skipped": len(plan.move) - len(current)}
    if not current:
        return done
    clock.check(plan.now, "rewriting packs")
    done["bytes"], unreadable = contents.rewrite(current)
    if unreadable:  # forged entries (or damage): not moved
        done["moved"] -= unreadable
        done["not_where_indexed"] = unreadable
    contents.flush()
    return done
