"""Manifests: small immutable, timestamped records (snapshots, checkpoints, policies).

Each manifest blob ``m<random>-<session>`` holds one or more sealed records
``{id, labels, ts, deleted, payload}``. Records are never edited: a newer record with the same id
replaces an older one (newest ``ts`` wins; on a tie a tombstone wins, then the larger blob name),
and deleting writes a tombstone. ``compact`` writes every current record into one blob and, in a
later run, removes the blobs that blob surely covers, so listing stays one LIST plus a few GETs
and no reader (maintenance's walk included) ever lists neither the old blobs nor the new one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack

from repo_format import clock
from repo_format import constants as C
from repo_format.crypto import Aead
from repo_format.io_pool import parallel_map
from repo_format.errors import BlobNotFound, CorruptionError, KdistError
from repo_format.storage.base import BlobStorage

if TYPE_CHECKING:
    from repo_format.local_cache import LocalCache

MAX_MANIFEST_BLOB = 256 * 1024 * 1024


@dataclass(frozen=True)
class ManifestRecord:
    id: str
    labels: dict
    ts: int  # microseconds since the Unix epoch (writer's clock; see gc/README.md)
    payload: bytes = b""
    deleted: bool = False
    blob: str = field(default="", compare=False)

    def to_wire(self) -> dict:
        return {"id": self.id, "labels": self.labels, "ts": self.ts, "payload": self.payload, "deleted": self.deleted}


def _record(r: dict, blob: str) -> ManifestRecord:
    """One decoded record, its field types checked exactly: a conversion such as ``bytes(n)``
    or ``int(inf)`` of a hostile value would allocate without bound or raise untyped errors."""
    rec = ManifestRecord(r["id"], r["labels"], r["ts"], r["payload"], r["deleted"], blob)
    if not (type(rec.id) is str and type(rec.labels) is dict and type(rec.ts) is int
            and type(rec.payload) is bytes and type(rec.deleted) is bool):
        raise TypeError("manifest record field types")
    return rec


def newer(a: ManifestRecord, b: ManifestRecord) -> bool:
    if a.ts != b.ts:
        return a.ts > b.ts
    if a.deleted != b.deleted:
        return a.deleted
    return a.blob > b.blob


def new_manifest_id() -> str:
    return secrets.token_hex(16)


class ManifestStore:
    def __init__(self, storage: BlobStorage, aead: Aead, session: str, cache: "LocalCache | None" = None):
        self.storage = storage
        self._aead = aead
        self.session = session
        self.cache = cache  # copies of manifest blobs (immutable; authenticated when read)

    def _blob_name(self) -> str:
        return f"{C.MANIFEST_PREFIX}{secrets.token_hex(12)}-{self.session}"

    def write_records(self, records: list[ManifestRecord]) -> str:
        name = self._blob_name()
        plain = msgpack.packb({"v": 1, "records": [r.to_wire() for r in records]})
        sealed = self._aead.seal(plain, name.encode("ascii"))
        self.storage.put(name, sealed)
        if self.cache is not None:
            self.cache.store_blob(name, sealed)
        return name

    def put(self, labels: dict, payload: bytes, manifest_id: str | None = None) -> ManifestRecord:
        rec = ManifestRecord(manifest_id or new_manifest_id(), dict(labels), int(clock.now() * 1e6), payload)
        self.write_records([rec])
        return rec

    def delete(self, manifest_ids: list[str]) -> None:
        """Write one tombstone blob for the given ids. Each tombstone is timestamped after the
        record it deletes, whatever this client's clock says: newer records win, and a forget
        from a host whose clock is behind the snapshot's writer's must not be a no-op."""
        if not manifest_ids:
            return
        best, _ = self._current()
        now = int(clock.now() * 1e6)
        self.write_records([ManifestRecord(i, {}, max(now, best[i].ts + 1) if i in best else now, deleted=True)
                            for i in manifest_ids])

    def read_blob(self, name: str) -> list[ManifestRecord]:
        doc = self._read_doc(name)
        try:
            records = [_record(r, name) for r in doc["records"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"manifest blob {name} is malformed") from exc
        return records

    def _read_doc(self, name: str, cached: bool = True) -> dict:
        plain = None
        if cached and self.cache is not None and (sealed := self.cache.sealed_blob(name, MAX_MANIFEST_BLOB)) is not None:
            try:
                plain = self._aead.open(sealed, name.encode("ascii"), what=f"manifest blob {name}")
            except CorruptionError:
                self.cache.drop_blob(name)
        if plain is None:
            sealed = self.storage.get(name, 0, MAX_MANIFEST_BLOB + 1)  # never load more than the cap
            if len(sealed) > MAX_MANIFEST_BLOB:
                raise CorruptionError(f"manifest blob {name} is implausibly large")
            plain = self._aead.open(sealed, name.encode("ascii"), what=f"manifest blob {name}")
            if self.cache is not None:
                self.cache.store_blob(name, sealed)
        try:
            doc = msgpack.unpackb(plain, raw=False)
            if not isinstance(doc, dict) or doc["v"] != 1:
                raise CorruptionError(f"manifest blob {name} has an unknown version")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"manifest blob {name} is malformed") from exc
        return doc

    def _read_at(self, meta) -> float | None:
        """When a compacted blob's writer started reading the records it holds (storage clock);
        blobs from before this field: their put time. None if it is gone meanwhile."""
        try:
            doc = self._read_doc(meta.name, cached=False)  # whether it is still there matters here
        except BlobNotFound:
            return None
        read_at = doc.get("read_at")
        return float(read_at) if isinstance(read_at, (int, float)) else meta.timestamp

    def _current(self, live_ids: set | None = None) -> tuple[dict[str, ManifestRecord], list[str]]:
        """Every id's winning record. If a listed blob vanishes before it is read (a concurrent
        compaction merged it), list again: the merged blob is then in the listing. Never return
        a view that silently lacks records: maintenance decides what is live from it.
        ``live_ids`` gets every id a live (not tombstone) record of some listed blob has."""
        for _ in range(5):
            names = [m.name for m in self.storage.list(C.MANIFEST_PREFIX)]
            try:
                blobs = parallel_map(self.read_blob, names)
            except BlobNotFound:
                continue
            if self.cache is not None:
                self.cache.retain_blobs(C.MANIFEST_PREFIX, set(names))
            best: dict[str, ManifestRecord] = {}
            for records in blobs:
                for r in records:
                    if live_ids is not None and not r.deleted:
                        live_ids.add(r.id)
                    cur = best.get(r.id)
                    if cur is None or newer(r, cur):
                        best[r.id] = r
            return best, names
        raise KdistError("the manifests kept changing while they were being read; try again")

    def find(self, **labels) -> list[ManifestRecord]:
        """Live records whose labels include ``labels``, oldest first."""
        best, _ = self._current()
        out = [r for r in best.values() if not r.deleted and all(r.labels.get(k) == v for k, v in labels.items())]
        return sorted(out, key=lambda r: (r.ts, r.id))

    def compact(self, now: float, settle: float, min_blobs: int = 16, tombstone_rule: bool = True) -> int:
        """Merge manifest blobs, in two phases so that no listing ever misses a record.

        A blob is deleted only when a compacted blob whose writer started reading more than
        ``settle`` after the blob was written (so its listing surely included it) has itself been
        listed for ``settle``. The compacted blob records that start (``read_at``, ``now`` given by
        the caller before anything is read), not its put time: a writer paused between reading and
        putting must not cover what was published during the pause.
        A new compacted blob is written when at least ``min_blobs`` blobs would remain; it leaves
        out the tombstones that nothing needs any more (``_without_spent_tombstones``).
        ``now`` is the storage's time. Returns the number of blobs deleted."""
        metas = list(self.storage.list(C.MANIFEST_PREFIX))
        merged = [(m, self._read_at(m)) for m in metas if m.name.startswith(C.MANIFEST_COMPACTED_PREFIX)]
        merged = [(m, t) for m, t in merged if t is not None]

        def covered(b) -> bool:
            return any(m.name != b.name and read_at - settle > b.timestamp and now - m.timestamp >= settle
                       for m, read_at in merged)

        deletable = [b for b in metas if covered(b)]
        if len(metas) - len(deletable) >= min_blobs:
            live_ids: set[str] = set()
            best, _ = self._current(live_ids)
            if tombstone_rule:
                best = _without_spent_tombstones(best, live_ids, {m.name: m.timestamp for m in metas}, now, settle)
            else:  # the simulator's mutation: every tombstone dropped
                best = {i: r for i, r in best.items() if not r.deleted}
            name = f"{C.MANIFEST_COMPACTED_PREFIX}{secrets.token_hex(12)}-{self.session}"
            plain = msgpack.packb({"v": 1, "read_at": now, "records": [r.to_wire() for r in best.values()]})
            self.storage.put(name, self._aead.seal(plain, name.encode("ascii")))
        for b in deletable:
            self.storage.delete(b.name)
        return len(deletable)


def _without_spent_tombstones(best: dict[str, ManifestRecord], live_ids: set[str], listed: dict[str, float],
                              now: float, settle: float) -> dict[str, ManifestRecord]:
    """``best`` less the tombstones that no longer hide anything: no listed blob holds a live
    record of their id (``live_ids``), and the blob they were read from has been listed for
    ``settle``. A record a tombstone deletes was written before it, so a blob still holding one
    was written earlier still and is in the listing; once no blob holds one, nothing brings the
    record back, and readers that still see the tombstone and those that no longer do agree."""
    return {i: r for i, r in best.items()
            if not (r.deleted and i not in live_ids and now - listed.get(r.blob, now) >= settle)}
