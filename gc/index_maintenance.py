"""Index maintenance: advance epochs, compact settled epochs, merge ranges, clean up.

Compaction writes new sets and deletes nothing. Cleanup deletes a superseded blob only once its
replacement set is complete and has been listed for ``cleanup_margin`` (storage clock), so a
reader that listed before the replacement existed has long finished, or re-lists when a blob
it wanted is gone. Range merges are the only step that drops deleted entries, and only those
whose timestamp is below the deletion watermark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repo_format import constants as C
from repo_format.epoch import EpochManager, EpochView
from repo_format.errors import BlobNotFound
from repo_format.index_scan import merge_into_set
from repo_format.storage.base import BlobMeta

from kdist.gc.clock_guard import StorageClock

RANGE_EVERY = 4  # merge everything into a range set once this many settled epochs are not in one


@dataclass
class IndexPlan:
    now: float
    advance_to: int | None = None
    compact: list[int] = field(default_factory=list)
    range_to: int | None = None
    delete: list[BlobMeta] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.advance_to is not None:
            parts.append(f"advance to epoch {self.advance_to}")
        if self.compact:
            parts.append(f"compact epochs {self.compact}")
        if self.range_to is not None:
            parts.append(f"merge epochs 0..{self.range_to} into a range set")
        parts.append(f"delete {len(self.delete)} superseded index blobs")
        return "index: " + ", ".join(parts)


def plan_index(epochs: EpochManager, view: EpochView, now: float) -> IndexPlan:
    s = epochs.safety
    plan = IndexPlan(now=now)
    if epochs.should_advance(view, now):
        plan.advance_to = view.current + 1
    settled = epochs.settled(view, now)
    plan.compact = [e for e in settled if view.raw.get(e) and view.complete_set(C.COMPACTED_PREFIX, e) is None
                    and not _in_range(view, e)]
    rng = view.best_range()
    outside = settled[-1] - (rng.epoch if rng else -1) if settled else 0
    # Merge when enough epochs are outside the range, or (at most once per drop margin) to drop
    # deleted entries that the watermark has passed since the last merge.
    if settled and (outside >= RANGE_EVERY or rng is None or now - rng.newest >= s.drop_margin):
        plan.range_to = settled[-1]
    plan.delete = superseded(view, now, s.cleanup_margin)
    return plan


def _in_range(view: EpochView, epoch: int) -> bool:
    rng = view.best_range()
    return rng is not None and epoch <= rng.epoch


def superseded(view: EpochView, now: float, margin: float) -> list[BlobMeta]:
    """Index blobs whose content is in a complete set that has been listed for ``margin``."""
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
                out += st.members.values()
    for e, blobs in view.raw.items():
        xs = view.complete_set(C.COMPACTED_PREFIX, e)
        if old_enough(xs) or (old_enough(rng) and e <= rng.epoch):
            out += blobs
    return out


def _written(epochs: EpochManager, s) -> int:
    """The bytes of a set just put (what compaction rewrote, for the report)."""
    return sum(m.length for m in s.members.values())


def execute_index(epochs: EpochManager, plan: IndexPlan, watermark_us: int, clock: StorageClock,
                  memory_limit: int = 256 * 2**20) -> dict:
    """Compactions and merges go range by range through the winners (``merge_into_set``), so
    they hold ``memory_limit`` whatever the index's size."""
    done = {"advanced": False, "compacted": [], "range": None, "deleted": 0, "written_bytes": 0}
    if plan.advance_to is not None:
        done["advanced"] = epochs.write_marker(plan.advance_to)
    try:
        view = epochs.refresh()
        for e in plan.compact:
            if view.complete_set(C.COMPACTED_PREFIX, e) is not None or _in_range(view, e) or not view.raw.get(e):
                continue  # done by a concurrent run since we planned (its sources may be gone)
            names = [m.name for m in view.raw.get(e, [])]
            s, _kept, _dropped = merge_into_set(epochs, C.COMPACTED_PREFIX, e, epochs.read_blobs(names),
                                                memory_limit=memory_limit)
            done["compacted"].append(e)
            done["written_bytes"] += _written(epochs, s)
        if plan.range_to is not None:
            view = epochs.refresh()
            blobs = epochs.read_blobs(view.assembly(up_to=plan.range_to))

            def keep(w):  # deleted entries below the watermark are dropped (winners only, as always)
                return ~(w.deleted & (w.timestamp < watermark_us))

            s, kept, dropped = merge_into_set(
                epochs, C.RANGE_PREFIX, plan.range_to, blobs, keep, memory_limit,
                # the watermark was derived at the run's start
                before_put=lambda: clock.check(plan.now, "writing a range set"))
            done["range"] = {"to": plan.range_to, "entries": kept, "dropped": dropped}
            done["written_bytes"] += _written(epochs, s)
    except BlobNotFound:
        # a concurrent maintenance run cleaned up a source after our listing: it has done (or
        # will do) this compaction; a half-written set of ours is incomplete and never used
        done["skipped"] = "sources changed under a concurrent maintenance run"
    if plan.delete:
        clock.check(plan.now, "deleting superseded index blobs")
        for m in plan.delete:
            epochs.storage.delete(m.name)
        done["deleted"] = len(plan.delete)
    return done
