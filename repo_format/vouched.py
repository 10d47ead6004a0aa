"""Which index entries a writer may deduplicate against: only places it has authenticated.

Every key holds the index key and the hash secret, so any host can write an index entry for a
content nobody has stored yet (it computes the id of a file it guesses another host has),
pointing at junk. A writer that later met that content and deduplicated against the entry would
upload nothing and publish a snapshot whose file cannot be restored ("dedup poisoning",
SECURITY.md). So in a signed repository a writer deduplicates only against a place it vouches
for: a record it wrote itself, or one it read and certified against its id (the reader's own
check, ``repo_format.records``: in format 2 the AAD binds the id and the plaintext hashes to it;
in format 3 the id is the hash of the record). Anything else is stored again, as
a content marked deleted is, with an entry that wins over the one it passed over.

What it authenticated stays authentic as long as the pack is the same blob: blobs are never
modified, and a name that maintenance deleted and a host put again has a later storage time.
So a vouched place is remembered with its pack's length and storage time (``stat``, taken
before the record is read): in memory for this client's run, and in the local cache for later
runs (``VouchedPlaces``), so that the unchanged chunks of a changed file, written by this host
before, are not read back every night. A pack's ``stat`` is trusted for ``STAMP_TTL`` seconds:
what a run keeps in memory without a new one is only what it refers to already (writer rules
5 to 7 keep those contents), never another record of the same pack.

Must never: vouch for a place whose record it did not authenticate or write, or one in a pack
whose storage time or length differ from those it was authenticated with.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack

from repo_format import clock
from repo_format.errors import BlobNotFound, KdistError
from repo_format.index import IndexEntry, place_of
from repo_format.storage.base import BlobStorage

log = logging.getLogger("kdist.vouched")

MEMORY_PLACES = 131_072  # places a run keeps in memory, of each kind (then the local cache, or a read, vouches again)
STAMP_TTL = 60.0  # seconds a pack's stat is trusted for (consecutive chunks of a file share packs)
DECODED_PACKS = 16  # packs' rows of the local cache kept decoded
PRUNE_AFTER = 2 * 86400.0  # seconds after its storage time a pack the index does not name loses its rows
PRUNE_EVERY = 86400.0  # seconds of storage time between two prunes (each reads every row)
_Stamp = tuple[int, float]  # a pack's length and storage time


@dataclass
class VouchStats:
    read: int = 0  # places authenticated by reading their record
    refused: int = 0  # entries whose record was not where they said: the content was stored again
    remembered: int = 0  # places vouched for by the local cache (their pack unchanged)


class VouchedPlaces:
    """The local cache's memory of authenticated places, in SQLite: a row per pack this host
    wrote (its length and storage time, and its records' places: one insert per pack, so a
    backup of many small files pays next to nothing), and a row per content whose place it read
    back (another writer's record). Every row is under a MAC keyed like the cache's other files
    (a file of another repository, or a row edited in place, does not count). Every failure is
    a miss (a cache never stops a run); a process that forks opens its own connection."""

    def __init__(self, path: Path, mac_key: bytes, repository_id: bytes):
        self.path = path
        self._mac_key = mac_key
        self._repository_id = repository_id
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._broken = False
        # the last packs' rows, decoded (a pack of small files holds thousands of records, and
        # the next look-up is likely in the same pack); what they say is still checked per use
        self._decoded: OrderedDict[str, tuple[_Stamp, dict[bytes, tuple]] | None] = OrderedDict()

    def _connection(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._db is None or self._pid != os.getpid():
            try:
                # a short wait: a query holds this object's lock, which every writer thread shares
                db = sqlite3.connect(self.path, timeout=5, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS packs (name TEXT PRIMARY KEY, length INTEGER, stored REAL, "
                           "records BLOB, mac BLOB)")
                db.execute("CREATE TABLE IF NOT EXISTS places (cid BLOB PRIMARY KEY, pack TEXT, offset INTEGER, "
                           "packed INTEGER, original INTEGER, compression INTEGER, pack_length INTEGER, "
                           "stored REAL, mac BLOB) WITHOUT ROWID")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            except sqlite3.Error as exc:
                self._fail(exc)
                return None
            self._db, self._pid = db, os.getpid()
        return self._db

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
            return  # another process holds it (after the 5 s timeout): this once a miss, not for good
        self._broken = True
        log.warning("kdist: the local cache's record of authenticated places (%s) is not usable (%s); "
                    "contents deduplicated against are read back once per run", self.path, exc)

    def _mac(self, kind: bytes, key: bytes, *parts) -> bytes:
        h = blake3.blake3(key=self._mac_key)
        h.update(b"kdist/vouched-" + kind + b"\0" + self._repository_id + len(key).to_bytes(2, "big") + key)
        for p in parts:
            h.update(p if isinstance(p, bytes) else repr(p).encode())
        return h.digest()

    def _query(self, sql: str, args: tuple):
        with self._lock:
            db = self._connection()
            if db is None:
                return None
            try:
                return db.execute(sql, args).fetchone()
            except sqlite3.Error as exc:
                self._fail(exc)
                return None

    def _insert(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock:
            db = self._connection()
            if db is None:
                return
            try:
                with db:
                    db.execute("BEGIN")
                    db.executemany(sql, rows)
            except sqlite3.Error as exc:
                self._fail(exc)

    def place(self, cid: bytes) -> tuple[tuple, _Stamp] | None:
        """The place read back for ``cid`` and its pack's stamp then, or None."""
        row = self._query("SELECT pack, offset, packed, original, compression, pack_length, stored, mac "
                          "FROM places WHERE cid = ?", (cid,))
        if row is None:
            return None
        place, stamp = tuple(row[:5]), (row[5], row[6])
        return (place, stamp) if row[7] == self._mac(b"place", cid, (place, stamp)) else None

    def add_places(self, rows: list[tuple[bytes, tuple, _Stamp]]) -> None:
        self._insert("INSERT OR REPLACE INTO places VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(cid, *place, *stamp, self._mac(b"place", cid, (place, stamp))) for cid, place, stamp in rows])

    def pack(self, name: str) -> tuple[_Stamp, dict[bytes, tuple]] | None:
        """A pack this host wrote: its stamp then, and its records' places by content id."""
        with self._lock:
            if name in self._decoded:
                self._decoded.move_to_end(name)
                return self._decoded[name]
        found = self._read_pack(name)
        with self._lock:
            self._decoded[name] = found
            if len(self._decoded) > DECODED_PACKS:
                self._decoded.popitem(last=False)
        return found

    def _read_pack(self, name: str) -> tuple[_Stamp, dict[bytes, tuple]] | None:
        row = self._query("SELECT length, stored, records, mac FROM packs WHERE name = ?", (name,))
        if row is None or type(row[2]) is not bytes:
            return None
        stamp = (row[0], row[1])
        if row[3] != self._mac(b"pack", name.encode(), stamp, row[2]):
            return None
        try:
            records = {cid: (name, *rest) for cid, *rest in msgpack.unpackb(row[2])}
        except (ValueError, TypeError):
            return None
        return stamp, records

    def add_packs(self, packs: list[tuple[str, _Stamp, list[IndexEntry]]]) -> None:
        rows = []
        for name, stamp, entries in packs:
            records = msgpack.packb([(e.content_id, e.offset, e.packed_length, e.original_length, e.compression)
                                     for e in entries])  # place_of(e) but the pack
            rows.append((name, *stamp, records, self._mac(b"pack", name.encode(), stamp, records)))
        self._insert("INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, ?)", rows)
        with self._lock:
            for name, _stamp, _entries in packs:
                self._decoded.pop(name, None)

    def prune_due(self) -> float | None:
        """The storage time before which a pack's rows may go (``PRUNE_AFTER`` before the newest
        storage time this file records: the storage's clock, not this client's), if the last
        prune was a day or more before that newest time; else None (pruning reads every row)."""
        row = self._query("SELECT max(stored) FROM (SELECT stored FROM packs UNION ALL SELECT stored FROM places) "
                          "WHERE typeof(stored) = 'real'", ())
        newest = row[0] if row is not None else None
        if type(newest) is not float:
            return None
        last = self._query("SELECT value FROM meta WHERE key = 'pruned'", ())
        if last is not None and type(last[0]) is float and newest - last[0] < PRUNE_EVERY:
            return None
        return newest - PRUNE_AFTER

    def prune(self, live: set[str], before: float) -> int:
        """Forget the rows of every pack not in ``live`` (the packs the index names) stored
        before ``before`` (storage time): maintenance deleted it, or it was never published, so
        no entry will point there again but a forged one, which the pack's stamp refuses anyway.
        (A pack stored since may be another process's of this host, not yet in this one's
        index.) Returns how many rows went. Losing a row costs a read back at worst, never
        safety; a row that is not what this file writes (damage) goes too. Freed pages are
        reused by later rows; the file does not shrink."""
        with self._lock:
            db = self._connection()
            if db is None:
                return 0
            try:
                packs = [(n, stored) for n, stored in db.execute("SELECT name, stored FROM packs")
                         if n not in live and not (type(stored) is float and stored >= before)]
                places = [(c, pack, stored) for c, pack, stored in db.execute("SELECT cid, pack, stored FROM places")
                          if pack not in live and not (type(stored) is float and stored >= before)]
                with db:
                    db.execute("BEGIN")
                    # (a row a concurrent process wrote meanwhile has another stamp: it stays)
                    db.executemany("DELETE FROM packs WHERE name IS ? AND stored IS ?", packs)
                    db.executemany("DELETE FROM places WHERE cid IS ? AND pack IS ? AND stored IS ?", places)
                    newest = before + PRUNE_AFTER
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('pruned', ?)", (newest,))
            except (sqlite3.Error, TypeError, ValueError) as exc:
                self._fail(exc)
                return 0
            for name, _stored in packs:
                self._decoded.pop(name, None)
            return len(packs) + len(places)

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


class DedupGuard:
    """Whether a writer may deduplicate against an index entry (``vouches``), and the packs it
    wrote itself (``wrote``). ``enabled`` is False for a repository whose keys are all one
    writer's (format version 1): nothing there can forge an entry. Thread-safe.

    What it keeps in memory, and why each is safe to trust without another request: a place it
    vouched for (then deduplicated against, so the content is referenced by this writer and
    kept by maintenance: writer rules 5 to 7), and the records of packs this run wrote (also
    referenced). A pack's stamp is trusted for ``STAMP_TTL`` seconds only: a record this run
    has not referenced could lose its pack to maintenance meanwhile, and the name be put again.
    Nothing is promoted from the local cache but the one place asked about."""

    def __init__(self, storage: BlobStorage, authentic: Callable[[IndexEntry], bool],
                 store: VouchedPlaces | None, enabled: bool):
        self.storage = storage
        self._authentic = authentic
        self.store = store
        self.enabled = enabled
        self.stats = VouchStats()
        self._lock = threading.Lock()
        self._places: OrderedDict[bytes, tuple] = OrderedDict()  # content id -> a place vouched for in this run
        self._refused: OrderedDict[bytes, tuple] = OrderedDict()  # content id -> a place refused in this run
        # pack -> its records' places, for packs this run wrote; the least recently used go
        # first past MEMORY_PLACES records
        self._packs: OrderedDict[str, dict[bytes, tuple]] = OrderedDict()
        self._held = 0
        self._stamps: dict[str, tuple[_Stamp | None, float]] = {}  # pack -> (stamp or None: missing, when taken)
        self._unsaved_places: list[tuple[bytes, tuple, _Stamp]] = []
        self._unsaved_packs: list[tuple[str, _Stamp, list[IndexEntry]]] = []
        self._used = False  # whether this run saved anything in the local cache (then ``prune``)

    def vouches(self, entry: IndexEntry) -> bool:
        if not self.enabled:
            return True
        cid, place = entry.content_id, place_of(entry)
        with self._lock:
            if self._places.get(cid) == place or self._own(entry.pack, cid) == place:
                return True
            if self._refused.get(cid) == place:  # refused before in this run: not read again
                self.stats.refused += 1
                return False
        stamp = self._stamp(entry.pack)  # before the record is read: see the module docstring
        ok = remembered = False
        if stamp is not None:
            remembered = self._remembered(entry, stamp)
            ok = remembered or self._authentic(entry)
        with self._lock:
            if not ok:
                self.stats.refused += 1
                _bounded_put(self._refused, cid, place)
                if self.stats.refused == 1:  # once per run: the operator should know, not be flooded
                    log.warning("kdist: the index entry of content %s points into pack %s, where its record is "
                                "not; the content is stored again. A key of this repository may have forged "
                                "it (SECURITY.md, item 12), maintenance may have moved it meanwhile, or the "
                                "pack is damaged: `kdist repo check` tells", cid.hex(), entry.pack)
                return False
            if remembered:
                self.stats.remembered += 1
            else:
                self.stats.read += 1
                self._unsaved_places.append((cid, place, stamp))
            _bounded_put(self._places, cid, place)
        return True

    def _remembered(self, entry: IndexEntry, stamp: _Stamp) -> bool:
        """Whether the local cache vouches for the entry's place: a record of a pack this host
        wrote, or a place it read back, with the pack's stamp unchanged."""
        if self.store is None:
            return False
        cid, place = entry.content_id, place_of(entry)
        own = self.store.pack(entry.pack)
        if own is not None and own[0] == stamp and own[1].get(cid) == place:
            return True
        return self.store.place(cid) == (place, stamp)

    def wrote(self, pack: str, entries: list[IndexEntry]) -> None:
        """This writer stored ``pack`` with these records: their places are vouched for (the
        pack is stat'ed once, to remember them in the local cache)."""
        if not self.enabled:
            return
        try:
            stamp = self._stamp(pack) if self.store is not None else None
        except KdistError:  # vouched for in this run all the same; only not remembered for later ones
            stamp = None
        with self._lock:
            self._keep_pack(pack, {e.content_id: place_of(e) for e in entries})
            if stamp is not None:
                self._unsaved_packs.append((pack, stamp, list(entries)))

    def _own(self, pack: str, cid: bytes) -> tuple | None:
        """(lock held) The place of ``cid`` in a pack this run wrote, if it holds it."""
        records = self._packs.get(pack)
        if records is None:
            return None
        self._packs.move_to_end(pack)
        return records.get(cid)

    def _keep_pack(self, pack: str, records: dict[bytes, tuple]) -> None:
        """(lock held) Keep a pack's records for this run, the least recently used going first
        past the bound (the local cache, or a read, vouches for them again)."""
        old = self._packs.pop(pack, None)
        self._held += len(records) - (len(old) if old is not None else 0)
        self._packs[pack] = records
        while self._held > MEMORY_PLACES and len(self._packs) > 1:
            self._held -= len(self._packs.popitem(last=False)[1])

    def prune(self, live: Callable[[], set[str]]) -> int:
        """At the end of a run that saved rows, once a day: forget in the local cache the packs
        not in ``live()`` (``VouchedPlaces.prune``)."""
        with self._lock:
            used = self._used
        if self.store is None or not self.enabled or not used:
            return 0
        before = self.store.prune_due()
        return self.store.prune(live(), before) if before is not None else 0

    def save(self) -> None:
        """Remember in the local cache what this run vouched for (at each flush)."""
        with self._lock:
            places, self._unsaved_places = self._unsaved_places, []
            packs, self._unsaved_packs = self._unsaved_packs, []
            self._used = self._used or bool(places or packs)
        if self.store is not None:
            self.store.add_packs(packs)
            self.store.add_places(places)

    def _stamp(self, pack: str) -> _Stamp | None:
        """The pack's length and storage time, stat'ed at most ``STAMP_TTL`` seconds ago."""
        now = clock.monotonic()
        with self._lock:
            known = self._stamps.get(pack)
            if known is not None and now - known[1] < STAMP_TTL:
                return known[0]
        try:
            meta = self.storage.stat(pack)
            stamp = (meta.length, meta.timestamp)
        except BlobNotFound:
            stamp = None
        with self._lock:
            self._stamps[pack] = (stamp, now)
        return stamp


def _bounded_put(d: OrderedDict, key, value) -> None:
    """Keep ``key`` in ``d``, the oldest going first past ``MEMORY_PLACES``."""
    d[key] = value
    d.move_to_end(key)
    if len(d) > MEMORY_PLACES:
        d.popitem(last=False)
