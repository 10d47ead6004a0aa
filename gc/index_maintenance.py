"""Index maintenance: advance epochs, compact settled epochs, merge ranges, clean up.

Compaction writes new sets and deletes nothing. Cleanup deletes a superseded blob only once its
replacement set is complete and has been listed for ``cleanup_margin`` (storage clock), so a
reader that listed before the replacement existed has long finished, or re-lists when a blob
it wanted is gone. Range merges are the only step that drops deleted entries, and only those
whose timestamp is below the deletion watermark.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from repo_format import constants as C
from repo_format.epoch import EpochManager, EpochView, IndexSet, SetAbandoned, set_key
from repo_format.errors import BlobNotFound
from repo_format.index_scan import Verify, merge_into_set, merged_plaintexts
from repo_format.storage.base import BlobMeta

from kdist.gc.clock_guard import StorageClock

_RAW_EPOCH = re.compile(re.escape(C.INDEX_PREFIX) + r"(\d+)_")

# Levels: the range set (epochs 0..E) is rewritten only when the entries above it reach
# RANGE_RATIO of its own, or when the deletions the watermark has passed since it was written
# reach DROP_RATIO of it; the epochs' xs sets above it are merged TIER_FANOUT at a time when as
# many hold entries of the same order (tier), into raw blobs of the current epoch, which its own
# compaction takes on. So an entry is rewritten a bounded number of times per level, not once
# per run: what a run rewrites follows what was added (amortised), not the repository's size.
RANGE_RATIO = 0.25
DROP_RATIO = 0.02
TIER_FANOUT = 4
TIER_BASE = 1000  # entries: sets smaller than this are all of tier 0
MAX_MERGED_SETS = 16


@dataclass
class IndexPlan:
    now: float
    advance_to: int | None = None
    compact: list[int] = field(default_factory=list)
    merge_sets: list[int] = field(default_factory=list)  # epochs whose xs sets are merged forward
    range_to: int | None = None
    delete: list[BlobMeta] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.advance_to is not None:
            parts.append(f"advance to epoch {self.advance_to}")
        if self.compact:
            parts.append(f"compact epochs {self.compact}")
        if self.merge_sets:
            parts.append(f"merge the sets of epochs {self.merge_sets} into the current epoch")
        if self.range_to is not None:
            parts.append(f"merge epochs 0..{self.range_to} into a range set")
        parts.append(f"delete {len(self.delete)} superseded index blobs")
        return "index: " + ", ".join(parts)


def _entries(st: IndexSet) -> int:
    """About how many entries a set holds (from its members' sizes: no read)."""
    return sum(m.length for m in st.members.values()) // C.INDEX_ENTRY.size


def _tier(entries: int) -> int:
    return int(math.log(max(entries, TIER_BASE) / TIER_BASE, TIER_FANOUT))


def plan_index(epochs: EpochManager, view: EpochView, now: float, droppable: int = 0,
               merged: list[tuple[list[str], list[str], bool]] = ()) -> IndexPlan:
    """``droppable``: entries a range merge would drop now that the last one kept (marks the
    watermark has passed since, losers of pack rewrites: ``history.droppable_entries``).
    ``merged``: (sources, copies, confirmed) of recorded set merges: a set merged already is not
    merged again, and the sources of a confirmed one go once every copy is in the index."""
    s = epochs.safety
    plan = IndexPlan(now=now)
    if epochs.should_advance(view, now):
        plan.advance_to = view.current + 1
    settled = epochs.settled(view, now)
    plan.compact = [e for e in settled if view.raw.get(e) and view.complete_set(C.COMPACTED_PREFIX, e) is None
                    and not _in_range(view, e)]
    rng = view.best_range()
    pending = {n for sources, _copies, _confirmed in merged for n in sources}
    above = {e: st for e in settled if not _in_range(view, e) and not view.raw.get(e)
             and (st := view.complete_set(C.COMPACTED_PREFIX, e)) is not None}
    mergeable = {e: st for e, st in above.items() if not pending.intersection(st.names())}
    range_entries = _entries(rng) if rng else 0
    if settled and (rng is None or sum(_entries(st) for st in above.values()) >= RANGE_RATIO * range_entries
                    or droppable >= DROP_RATIO * range_entries):
        plan.range_to = settled[-1]
    else:
        tiers: dict[int, list[int]] = {}
        for e, st in sorted(mergeable.items()):
            tiers.setdefault(_tier(_entries(st)), []).append(e)
        full = [epochs_ for _t, epochs_ in sorted(tiers.items()) if len(epochs_) >= TIER_FANOUT]
        if full:
            plan.merge_sets = full[0][:MAX_MERGED_SETS]
    plan.delete = superseded(view, now, s.cleanup_margin) + merged_sources(view, [(a, b) for a, b, ok in merged if ok])
    return plan


def merged_sources(view: EpochView, merged) -> list[BlobMeta]:
    """The members still listed of sets whose recorded copies are all in the index: listed as
    raw blobs, or in a complete xs set of their epoch, or under the range set. Only ``xs``
    members: a record naming anything else (a range set, a raw blob) deletes nothing of it."""
    listed = {m.name: m for blobs in view.raw.values() for m in blobs}
    for sets in view.sets.values():
        listed.update((m.name, m) for st in sets for m in st.members.values())
    rng = view.best_range()
    sets = {n: st for e_sets in view.sets.values() for st in e_sets for n in st.names()}
    out: list[BlobMeta] = []
    for sources, copies in merged:
        if all(_covered(view, rng, listed, name) for name in copies):
            for n in sources:
                if n in listed and n.startswith(C.COMPACTED_PREFIX):
                    st = sets.get(n)
                    out += [m for m in (st.blobs() if st is not None else [listed[n]]) if m not in out]
    return out


def _covered(view: EpochView, rng, listed: dict, name: str) -> bool:
    m = _RAW_EPOCH.match(name)
    if m is None:
        return False
    epoch = int(m.group(1))
    return (name in listed and not view.ahead(epoch) or view.complete_set(C.COMPACTED_PREFIX, epoch) is not None
            or (rng is not None and epoch <= rng.epoch))


def _in_range(view: EpochView, epoch: int) -> bool:
    rng = view.best_range()
    return rng is not None and epoch <= rng.epoch


def superseded(view: EpochView, now: float, margin: float) -> list[BlobMeta]:
    """Index blobs whose content is in a complete set that has been listed for ``margin``; and,
    ``margin`` after they were stored, sets that do not count (unsigned where a signature is
    needed, or signed by a host), set signatures whose members are all gone, and raw blobs of
    an epoch ahead of any writer's (``EpochView.ahead``)."""
    out: list[BlobMeta] = []

    def old_enough(s) -> bool:
        return s is not None and now - s.newest >= margin

    rng = view.best_range()
    for (kind, e), sets in view.sets.items():
        chosen = view.complete_set(kind, e)
        for st in sets:
            covered_by_range = old_enough(rng) and (e < rng.epoch or (kind == C.COMPACTED_PREFIX and e <= rng.epoch))
            duplicate = chosen is not None and st is not chosen and old_enough(chosen)
            abandoned = not st.complete and now - st.newest >= margin
            if covered_by_range or duplicate or abandoned:
                out += st.blobs()
    out += [m for st in view.ignored_sets if now - st.newest >= margin for m in st.blobs()]
    out += [m for m in view.stray_signatures if now - m.timestamp >= margin]
    for e, blobs in view.raw.items():
        xs = view.complete_set(C.COMPACTED_PREFIX, e)
        if old_enough(xs) or (old_enough(rng) and e <= rng.epoch):
            out += blobs
        elif view.ahead(e):  # no writer's (EpochView.ahead): read by no one, never compacted
            out += [m for m in blobs if now - m.timestamp >= margin]
    return out


def _merge_forward(epochs: EpochManager, view: EpochView, merge: list[int], memory_limit: int,
                   copies_first: bool = True, verify: Verify | None = None) -> dict:
    """Write the winners of the chosen sets of epochs ``merge`` into the current epoch as raw
    blobs (as a writer writes: ``write_index``, which follows the epoch if it advances). The
    sources are deleted by a later run, once the run's record is a cleanup margin old and every
    copy is in the index (``merged_sources``): never before the copies exist."""
    sets = [st for e in merge if (st := view.complete_set(C.COMPACTED_PREFIX, e)) is not None]
    sources = [n for st in sets for n in st.names()]
    blobs = epochs.read_blobs(sources)
    if not copies_first:  # the simulator's mutation: the sources go before their copies exist
        for n in sources:
            epochs.storage.delete(n)
    copies, written = [], 0
    for plaintext in merged_plaintexts(blobs, memory_limit, verify):
        name = epochs.write_plaintext(plaintext)
        copies.append(name)
        written += len(plaintext)
    return {"epochs": [st.epoch for st in sets], "sources": sources, "copies": copies, "bytes": written}


def _written(epochs: EpochManager, s) -> int:
    """The bytes of a set just put (what compaction rewrote, for the report)."""
    return sum(m.length for m in s.members.values())


def _delete_in_order(blobs: list[BlobMeta], delete) -> list[BlobMeta]:
    """Delete ``blobs`` in order; once a set's blob is kept (Object Lock refused it), the rest of
    that set is kept too: a set's signatures go first, and no member may go while one of them
    stays (a signature over members that are gone could vouch for blobs a host puts there).
    Returns what was kept."""
    kept, held = [], set()
    for m in blobs:
        key = set_key(m.name)
        if key is not None and key in held or not delete(m.name, m.timestamp):
            kept.append(m)
            if key is not None:
                held.add(key)
    return kept


class _Counted:
    """A ``verify`` that counts the records it read and those not where their entry said."""

    def __init__(self, verify: Verify):
        self.verify, self.read, self.absent = verify, 0, 0

    def __call__(self, entries):
        ok = self.verify(entries)
        self.read += len(ok)
        self.absent += ok.count(False)
        return ok


def execute_index(epochs: EpochManager, plan: IndexPlan, watermark_us: int, clock: StorageClock,
                  delete, memory_limit: int = 256 * 2**20, copies_first: bool = True,
                  verify: Verify | None = None) -> dict:
    """Compactions and merges go range by range through the winners (``merge_into_set``), so
    they hold ``memory_limit`` whatever the index's size. ``delete(name, put time)``:
    maintenance's (``object_lock.Deletions``). ``verify`` reads the records of winners that
    compete with entries elsewhere before a merge lets those go (``IndexScan._relocate``)."""
    done = {"advanced": False, "compacted": [], "range": None, "deleted": 0, "written_bytes": 0}
    verify = _Counted(verify) if verify is not None else None
    if epochs.sign_epochs(epochs.refresh()):  # an upgraded repository's first run
        done["signed_epochs"] = True
    if plan.advance_to is not None:
        done["advanced"] = epochs.write_marker(plan.advance_to)
    try:
        view = epochs.refresh()
        for e in plan.compact:
            if view.complete_set(C.COMPACTED_PREFIX, e) is not None or _in_range(view, e) or not view.raw.get(e):
                continue  # done by a concurrent run since we planned (its sources may be gone)
            names = [m.name for m in view.raw.get(e, [])]
            s, _kept, _dropped = merge_into_set(epochs, C.COMPACTED_PREFIX, e, epochs.read_blobs(names),
                                                memory_limit=memory_limit, verify=verify)
            done["compacted"].append(e)
            done["written_bytes"] += _written(epochs, s)
        if plan.merge_sets:
            done["merged"] = _merge_forward(epochs, view, plan.merge_sets, memory_limit, copies_first, verify)
            done["written_bytes"] += done["merged"].pop("bytes", 0)
        if plan.range_to is not None:
            view = epochs.refresh()
            blobs = epochs.read_blobs(view.assembly(up_to=plan.range_to))

            def keep(w):  # deleted entries below the watermark are dropped (winners only, as always)
                return ~(w.deleted & (w.timestamp < watermark_us))

            s, kept, dropped = merge_into_set(
                epochs, C.RANGE_PREFIX, plan.range_to, blobs, keep, memory_limit,
                # the watermark was derived at the run's start
                before_put=lambda: clock.check(plan.now, "writing a range set"), verify=verify)
            done["range"] = {"to": plan.range_to, "entries": kept, "dropped": dropped, "watermark": watermark_us / 1e6}
            done["written_bytes"] += _written(epochs, s)
    except BlobNotFound:
        # a concurrent maintenance run cleaned up a source after our listing: it has done (or
        # will do) this compaction; a half-written set of ours is incomplete and never used
        done["skipped"] = "sources changed under a concurrent maintenance run"
    except SetAbandoned as exc:  # a later run writes the set under another id
        done["skipped"] = str(exc)
    if verify is not None and verify.read:
        done["records_verified"] = verify.read
        if verify.absent:  # forged entries (or damage): their contents kept another place
            done["records_not_where_indexed"] = verify.absent
    if plan.delete:
        clock.check(plan.now, "deleting superseded index blobs")
        kept = _delete_in_order(plan.delete, delete)
        done["deleted"] = len(plan.delete) - len(kept)
        if kept:
            done["kept_locked"] = len(kept)
    return done
