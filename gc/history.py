"""Maintenance history: one record per run, in the repository's encrypted manifests.

The deletion watermark is derived from it: ``W`` is the start (storage clock) of the latest
completed content-GC cycle that another completed cycle started at least ``drop_margin`` after.
Deleted index entries with a timestamp below ``W`` can be dropped for good (gc/README.md).
It also carries blob GC's first phase: the packs a run found deletable, which a later run may
delete once the record is ``cleanup_margin`` old and they are still deletable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import msgpack

from repo_format.errors import CorruptionError
from repo_format.manifest import ManifestStore

LABEL = "maintenance-run"


@dataclass
class RunRecord:
    start: float  # storage clock
    end: float = 0.0
    mode: str = "full"
    content_gc_completed: bool = False
    steps: dict = field(default_factory=dict)
    requests: dict = field(default_factory=dict)
    error: str = ""
    pack_candidates: list = field(default_factory=list)  # [[pack name, size], ...] blob GC's phase 1
    locked: list = field(default_factory=list)  # [[blob name, lock end], ...]: deletes Object Lock refused

    def payload(self) -> bytes:
        return msgpack.packb(asdict(self))


def read_history(manifests: ManifestStore) -> list[RunRecord]:
    out = []
    known = {f.name for f in fields(RunRecord)}
    for rec in manifests.find(type=LABEL):
        try:
            d = msgpack.unpackb(rec.payload, raw=False)
            record = RunRecord(**{k: v for k, v in d.items() if k in known})  # newer fields: ignored
        except (ValueError, TypeError, AttributeError) as exc:
            raise CorruptionError(f"maintenance record {rec.id} is malformed") from exc
        if not _well_typed(record):
            raise CorruptionError(f"maintenance record {rec.id} is malformed")
        out.append(record)
    return sorted(out, key=lambda r: r.start)


def _well_typed(r: RunRecord) -> bool:
    """Every field of the type the watermark and blob GC compute with."""
    def number(x) -> bool:
        return type(x) in (int, float) and math.isfinite(x)

    return (number(r.start) and number(r.end) and type(r.mode) is str and type(r.content_gc_completed) is bool
            and type(r.steps) is dict and type(r.requests) is dict and type(r.error) is str
            and type(r.pack_candidates) is list
            and all(type(c) is list and len(c) == 2 and type(c[0]) is str and type(c[1]) is int
                    for c in r.pack_candidates)
            and type(r.locked) is list
            and all(type(c) is list and len(c) == 2 and type(c[0]) is str and number(c[1]) for c in r.locked))


def write_record(manifests: ManifestStore, record: RunRecord) -> None:
    manifests.put({"type": LABEL}, record.payload())


def deletion_watermark(history: list[RunRecord], drop_margin: float, now: float, settle: float) -> float:
    """Seconds (storage clock); 0 when no two completed cycles are far enough apart.

    Only cycles that ended at least ``settle`` ago count: what the confirming cycle undeleted
    must be in every listing before a merge may drop anything on its strength."""
    starts = sorted(r.start for r in history if r.content_gc_completed and now - r.end >= settle)
    if len(starts) < 2:
        return 0.0
    latest = starts[-1]
    candidates = [t for t in starts if t + drop_margin <= latest]
    return max(candidates, default=0.0)


def confirmed_pack_candidates(history: list[RunRecord], now: float, margin: float) -> set[tuple[str, int]]:
    """Packs (name, size) that a run which ended at least ``margin`` before ``now`` found
    unreferenced, old and of no live session: blob GC may delete those still deletable now."""
    return {(name, size) for r in history if r.end > 0 and now - r.end >= margin
            for name, size in r.pack_candidates}


def known_locks(history: list[RunRecord], now: float) -> dict[str, float]:
    """Blob name -> when its lock ends, for the deletes Object Lock refused that are still
    locked at ``now``: a run skips them without asking again."""
    out: dict[str, float] = {}
    for r in history:
        for name, until in r.locked:
            if until > now and until > out.get(name, 0.0):
                out[name] = until
    return out


def droppable_entries(history: list[RunRecord], watermark: float) -> int:
    """What a range merge would drop now that the last one did not: deletions marked by runs that
    started after that merge's watermark and ended before the current one, and the old entries
    of contents that pack rewrites moved since that merge's run."""
    merges = [r for r in history if isinstance(r.steps.get("index"), dict)
              and isinstance(r.steps["index"].get("range"), dict)]
    last = merges[-1] if merges else None
    last_w = last.steps["index"]["range"].get("watermark", 0.0) if last else 0.0
    last_w = last_w if type(last_w) in (int, float) else 0.0
    total = 0
    for r in history:
        gc = r.steps.get("content_gc") if isinstance(r.steps.get("content_gc"), dict) else {}
        rw = r.steps.get("pack_rewrite") if isinstance(r.steps.get("pack_rewrite"), dict) else {}
        marked, moved = gc.get("marked", 0), rw.get("moved", 0)
        if r.content_gc_completed and type(marked) is int and last_w <= r.start and 0 < r.end <= watermark:
            total += marked
        if type(moved) is int and (last is None or r.start >= last.start):
            total += moved
    return total


def set_merges(history: list[RunRecord], now: float, margin: float) -> list[tuple[list[str], list[str], bool]]:
    """(sources, copies, confirmed) of every recorded set merge; confirmed when its run ended at
    least ``margin`` before ``now`` (its sources may then go, once its copies are all listed)."""
    out = []
    for r in history:
        merged = r.steps.get("index", {}).get("merged") if isinstance(r.steps.get("index"), dict) else None
        if r.end <= 0 or not isinstance(merged, dict):
            continue
        sources, copies = merged.get("sources"), merged.get("copies")
        if (isinstance(sources, list) and isinstance(copies, list) and copies
                and all(type(n) is str for n in sources + copies)):
            out.append((sources, copies, now - r.end >= margin))
    return out
