"""The epoch manager: where index blobs go, how readers assemble the index, and compaction.

Index blobs ``xn<E>_...`` are written into the current epoch E, the largest N of an
authenticated epoch marker ``xe<N>`` (0 without markers). Maintenance advances the epoch when
the current one holds enough index blobs and its marker is at least ``min_epoch_duration`` old
(storage clock). An epoch E is *settled* once marker E+2 has existed for ``listing_settle``: no
writer can still put a blob into it (a writer's view is at most ``index_refresh`` old, which is
less than ``min_epoch_duration``, and a writer re-checks after its put, see ``write_index``).

Settled epochs are compacted into a set ``xs<E>_<set>_<i>of<n>``; every few epochs everything
up to E is merged into a range set ``xr<E>_<set>_<i>of<n>``, the only place where deleted
entries below the deletion watermark are dropped (dropping needs every older entry of the
content in the same merge). A set counts only when all n members are listed. Readers use the
complete range set with the largest E, then per epoch a complete ``xs`` set or the raw ``xn``
blobs. Superseded blobs are deleted only after their replacement has been visible for
``cleanup_margin``; a reader that finds a blob gone re-lists and assembles again.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from repo_format import clock
from repo_format import constants as C
from repo_format.crypto import Aead, ContentHasher
from repo_format.errors import BlobNotFound, CorruptionError, KdistError
from repo_format.io_pool import parallel_map
from repo_format.index import (
    IndexBlob, IndexEntry, MergedIndex, encode_index, index_blob_name, open_index, seal_index, wins,
)
from repo_format.safety import SafetyParameters
from repo_format.storage.base import BlobMeta, BlobStorage

_RAW = re.compile(r"xn(\d+)_([0-9a-f]+)-([0-9a-f]+)$")
_SET = re.compile(r"(xs|xr)(\d+)_([0-9a-f]+)_(\d+)of(\d+)$")
_MARKER = re.compile(r"xe(\d+)$")
ASSEMBLY_ATTEMPTS = 5


def _set_preference(s: "IndexSet") -> tuple:
    return (s.newest, -int(s.set_id, 16))


class StaleView(KdistError):
    """The index changed under a reader faster than it could assemble it."""


@dataclass
class IndexSet:
    kind: str  # "xs" or "xr"
    epoch: int
    set_id: str
    count: int
    members: dict[int, BlobMeta] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.count

    @property
    def newest(self) -> float:
        return max(m.timestamp for m in self.members.values())

    def names(self) -> list[str]:
        return [self.members[i].name for i in sorted(self.members)]


@dataclass
class EpochView:
    """One listing of the index blobs, interpreted."""

    markers: dict[int, BlobMeta]
    raw: dict[int, list[BlobMeta]]
    sets: dict[tuple[str, int], list[IndexSet]]
    taken_at: float  # monotonic

    @property
    def current(self) -> int:
        return max(self.markers, default=0)

    def complete_set(self, kind: str, epoch: int) -> IndexSet | None:
        """The set readers use for an epoch. For ``xs`` the *first* completed one: it was built
        while every raw blob of the epoch existed (a later duplicate may have been built after
        cleanup removed some). For ``xr`` the most recent one: a later merge of the same epochs
        differs only by dropping what the watermark allows."""
        done = [s for s in self.sets.get((kind, epoch), []) if s.complete]
        if not done:
            return None
        if kind == "xs":
            return min(done, key=lambda s: (s.newest, s.set_id))
        return max(done, key=_set_preference)

    def best_range(self) -> IndexSet | None:
        ranges = [s for (kind, e), sets in self.sets.items() if kind == "xr" for s in sets if s.complete]
        return max(ranges, key=lambda s: (s.epoch,) + _set_preference(s)) if ranges else None

    def assembly(self, up_to: int | None = None) -> list[str]:
        """The index blob names a reader reads (every epoch, or epochs up to ``up_to`` for a range
        merge): the best complete range, then per later epoch a complete ``xs`` set or raw blobs."""
        rng = self.best_range()
        first = rng.epoch + 1 if rng else 0
        names = rng.names() if rng else []
        epochs = {e for e in self.raw} | {e for (k, e) in self.sets if k == "xs"}
        for e in sorted(x for x in epochs if x >= first and (up_to is None or x <= up_to)):
            s = self.complete_set("xs", e)
            names += s.names() if s else [m.name for m in self.raw.get(e, [])]
        return names


class EpochManager:
    def __init__(self, storage: BlobStorage, index_aead: Aead, name_hasher: ContentHasher, marker_aead: Aead,
                 safety: SafetyParameters, session: str):
        self.storage = storage
        self.safety = safety
        self.session = session
        self._aead = index_aead
        self._name_hash = name_hasher
        self._marker_aead = marker_aead
        self._verified_markers: set[str] = set()
        self.view: EpochView | None = None

    # ---- listing -------------------------------------------------------------------------
    def refresh(self) -> EpochView:
        markers: dict[int, BlobMeta] = {}
        raw: dict[int, list[BlobMeta]] = {}
        sets: dict[tuple[str, int], dict[str, IndexSet]] = {}
        for m in self.storage.list("x"):
            if mk := _MARKER.fullmatch(m.name):
                if self._marker_valid(m.name):
                    markers[int(mk.group(1))] = m
            elif mr := _RAW.fullmatch(m.name):
                raw.setdefault(int(mr.group(1)), []).append(m)
            elif ms := _SET.fullmatch(m.name):
                kind, e, sid, i, n = ms.group(1), int(ms.group(2)), ms.group(3), int(ms.group(4)), int(ms.group(5))
                if 0 <= i < n:
                    s = sets.setdefault((kind, e), {}).setdefault(sid, IndexSet(kind, e, sid, n))
                    if s.count == n:
                        s.members[i] = m
        self.view = EpochView(markers, raw, {k: list(v.values()) for k, v in sets.items()}, clock.monotonic())
        return self.view

    def _marker_valid(self, name: str) -> bool:
        if name in self._verified_markers:
            return True
        try:
            self._marker_aead.open(self.storage.get(name), name.encode(), what=f"epoch marker {name}")
        except (BlobNotFound, CorruptionError):
            return False  # a forged or damaged marker is ignored: it cannot move epochs
        self._verified_markers.add(name)
        return True

    def fresh_view(self) -> EpochView:
        if self.view is None or clock.monotonic() - self.view.taken_at >= self.safety.index_refresh:
            return self.refresh()
        return self.view

    # ---- reading -------------------------------------------------------------------------
    def load_index(self) -> MergedIndex:
        """Assemble the current index; re-list and start again if a blob vanished meanwhile."""
        for _ in range(ASSEMBLY_ATTEMPTS):
            view = self.refresh()
            try:
                return MergedIndex(self._read_blobs(view.assembly()))
            except BlobNotFound:
                continue  # superseded and cleaned up after our listing: the new listing has its set
        raise StaleView("the index kept changing while it was being read; try again")

    def _read_blobs(self, names: list[str]) -> list[IndexBlob]:
        def read(name):
            return open_index(self._aead, name, self.storage.get(name))

        return parallel_map(read, names)

    # ---- writing -------------------------------------------------------------------------
    def write_index(self, entries: list[IndexEntry]) -> str:
        """Write entries into the current epoch; rewrite them if the epoch settled meanwhile."""
        plaintext = encode_index(entries)
        epoch = self.fresh_view().current
        while True:
            name = self._raw_name(plaintext, epoch)
            self.storage.put(name, seal_index(self._aead, name, plaintext))
            current = self.refresh().current
            if current <= epoch:
                return name
            # The epoch advanced while we wrote (or we were paused): a compaction of ours may
            # already have listed its blobs, so write the same entries into the current epoch.
            # (One advance is enough to check: min_epoch_duration exceeds any listing lag.)
            epoch = current

    def _raw_name(self, plaintext: bytes, epoch: int) -> str:
        return index_blob_name(self._name_hash, plaintext, epoch, self.session)

    def write_marker(self, epoch: int) -> bool:
        name = f"{C.EPOCH_MARKER_PREFIX}{epoch}"
        return self.storage.put_if_absent(name, self._marker_aead.seal(b"epoch %d" % epoch, name.encode()))

    # ---- maintenance ---------------------------------------------------------------------
    def should_advance(self, view: EpochView, now: float) -> bool:
        """Advance at most once per ``min_epoch_duration`` (storage clock), when the current or
        previous epoch holds index blobs: they can only be compacted, and their deletions
        dropped, once two markers follow them."""
        cur = view.current
        marker_age = now - view.markers[cur].timestamp if cur in view.markers else float("inf")
        if marker_age < self.safety.min_epoch_duration:
            return False
        return bool(view.raw.get(cur)) or bool(view.raw.get(cur - 1))

    def settled(self, view: EpochView, now: float) -> list[int]:
        """Epochs no writer can still add to."""
        cur = view.current
        marker = view.markers.get(cur)
        if cur < 2 or marker is None:
            return []
        last = cur - 2 if now - marker.timestamp >= self.safety.listing_settle else cur - 3
        return list(range(0, last + 1))

    def write_set(self, kind: str, epoch: int, entries: list[IndexEntry]) -> IndexSet:
        """Publish entries as a complete set (members first; the set counts once all are listed)."""
        entries = sorted(entries, key=lambda e: e.content_id)
        per = C.INDEX_BLOB_MAX_ENTRIES
        chunks = [entries[i:i + per] for i in range(0, len(entries), per)] or [[]]
        set_id = secrets.token_hex(8)
        s = IndexSet(kind, epoch, set_id, len(chunks))
        for i, chunk in enumerate(chunks):
            name = f"{kind}{epoch}_{set_id}_{i}of{len(chunks)}"
            self.storage.put(name, seal_index(self._aead, name, encode_index(chunk)))
            s.members[i] = BlobMeta(name, 0, 0.0)
        return s

    def read_entries(self, names: list[str]) -> list[IndexEntry]:
        merged: dict[bytes, IndexEntry] = {}
        for blob in self._read_blobs(names):
            for e in blob:
                cur = merged.get(e.content_id)
                if cur is None or wins(e, cur):
                    merged[e.content_id] = e
        return list(merged.values())
