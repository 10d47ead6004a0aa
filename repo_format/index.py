"""Index blobs: where each content lives.

An index maps a content id to (pack, offset, packed length, original length, compression,
timestamp, deleted). The encoding is a header, a table of pack names, then fixed-size entries
sorted by content id, so a lookup is a binary search over the raw bytes with no per-entry Python
objects. The same encoding, sealed with the pack's name, is the local index at the end of a pack.

Conflict rule when several index blobs mention one content id (``wins``): the newer timestamp
wins; on a tie a live entry beats a deleted one; on a full tie the smaller (pack, offset) wins, so
every reader picks the same entry.
"""

from __future__ import annotations

import functools
import mmap
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from repo_format import constants as C
from repo_format.crypto import Aead, ContentHasher
from repo_format.errors import CorruptionError, InvalidBlobName, UnsupportedVersion
from repo_format.storage.base import validate_name

_ENTRY = C.INDEX_ENTRY
_ID = C.CONTENT_ID_SIZE
_FLAGS_AT = _ID + 4 * 4 + 1  # the flags byte of an entry (after compression)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    content_id: bytes
    pack: str
    offset: int
    packed_length: int
    original_length: int
    compression: int
    timestamp_us: int
    deleted: bool = False


MAX_TIMESTAMP_US = 2**63 - 1  # the entry field's largest value (i64)


def stamp_after(timestamp_us: int) -> int:
    """One microsecond after ``timestamp_us`` (an entry that wins over it), at most the field's
    largest value: any host can date an entry at the very end, and the next entry a writer or
    maintenance makes of that content must still encode. It then ties, and the tie rule decides
    (live over deleted, then the place); readers and merges pass over a winner whose record is
    not where it says."""
    return min(timestamp_us + 1, MAX_TIMESTAMP_US)


def wins(a: IndexEntry, b: IndexEntry) -> bool:
    """True if ``a`` takes precedence over ``b`` for the same content id."""
    if a.timestamp_us != b.timestamp_us:
        return a.timestamp_us > b.timestamp_us
    if a.deleted != b.deleted:
        return not a.deleted
    return ((a.pack, a.offset, a.packed_length, a.original_length, a.compression)
            < (b.pack, b.offset, b.packed_length, b.original_length, b.compression))


def _conflict_order(a: IndexEntry, b: IndexEntry) -> int:
    return -1 if wins(a, b) else (1 if wins(b, a) else 0)


def place_of(e: IndexEntry) -> tuple:
    """Where an entry says its record is, and how to open it."""
    return e.pack, e.offset, e.packed_length, e.original_length, e.compression


def pick(entries: Iterable[IndexEntry]) -> IndexEntry | None:
    best = None
    for e in entries:
        if best is None or wins(e, best):
            best = e
    return best


def encode_index(entries: Iterable[IndexEntry]) -> bytes:
    """Encode entries (at most one per content id: the winner is kept) sorted by id."""
    by_id: dict[bytes, IndexEntry] = {}
    for e in entries:
        cur = by_id.get(e.content_id)
        if cur is None or wins(e, cur):
            by_id[e.content_id] = e
    packs = sorted({e.pack for e in by_id.values()})
    pack_no = {p: i for i, p in enumerate(packs)}
    out = bytearray(C.INDEX_HEADER.pack(C.INDEX_MAGIC, C.INDEX_VERSION, 0, 0, len(by_id), len(packs)))
    for p in packs:
        raw = p.encode("ascii")
        out += C.INDEX_PACK_NAME_LENGTH.pack(len(raw)) + raw
    for cid in sorted(by_id):
        e = by_id[cid]
        flags = C.INDEX_FLAG_DELETED if e.deleted else 0
        out += _ENTRY.pack(cid, pack_no[e.pack], e.offset, e.packed_length, e.original_length,
                           e.compression, flags, 0, e.timestamp_us)
    return bytes(out)


_VECTOR_CHECK_FROM = 4096  # entries; below this the loop is cheaper than importing numpy


_VECTOR_CHECK_ROWS = 32_768  # rows per step: bounds the temporaries (32 bytes of flags per row)


def _check_entries_vectorised(buf, start: int, count: int, npacks: int) -> None:
    """The decoder's entry checks (ids strictly sorted, pack numbers in the table) in numpy:
    a Python loop costs 0.6 s per million entries. In steps that overlap by one row, so the
    temporaries stay small whatever the blob's size."""
    import numpy as np

    rows = np.frombuffer(buf, dtype=np.uint8, count=count * _ENTRY.size, offset=start).reshape(count, _ENTRY.size)
    for lo in range(0, count - 1, _VECTOR_CHECK_ROWS):
        ids = rows[lo:lo + _VECTOR_CHECK_ROWS + 1, :_ID]
        differ = ids[1:] != ids[:-1]
        if not differ.any(axis=1).all():
            raise CorruptionError("index entries are not strictly sorted")
        first = differ.argmax(axis=1)  # the first byte where neighbours differ decides their order
        r = np.arange(len(first))
        if not (ids[1:][r, first] > ids[:-1][r, first]).all():
            raise CorruptionError("index entries are not strictly sorted")
    for lo in range(0, count, _VECTOR_CHECK_ROWS):
        if np.ascontiguousarray(rows[lo:lo + _VECTOR_CHECK_ROWS, _ID:_ID + 4]).view(">u4").max() >= npacks:
            raise CorruptionError("index entry names a pack outside its table")


def _decode_tables(buf) -> tuple[list[str], int, int]:
    """The pack table, where the entries start, and how many there are; checks sizes."""
    hdr = C.INDEX_HEADER
    if len(buf) < hdr.size:
        raise CorruptionError("index is truncated")
    magic, version, _flags, _res, count, npacks = hdr.unpack_from(buf)
    if magic != C.INDEX_MAGIC:
        raise CorruptionError("index has a bad magic")
    if version != C.INDEX_VERSION:
        raise UnsupportedVersion(f"index format version {version} is not supported")
    if count > C.MAX_INDEX_ENTRIES or npacks > count + 1:
        raise CorruptionError(f"index declares an absurd size ({count} entries, {npacks} packs)")
    pos = hdr.size
    packs = []
    for _ in range(npacks):
        if pos + 2 > len(buf):
            raise CorruptionError("index pack table is truncated")
        (n,) = C.INDEX_PACK_NAME_LENGTH.unpack_from(buf, pos)
        pos += 2
        if n == 0 or n > C.MAX_PACK_NAME_LENGTH or pos + n > len(buf):
            raise CorruptionError("index pack table is malformed")
        try:
            packs.append(validate_name(bytes(buf[pos:pos + n]).decode("ascii")))
        except (UnicodeDecodeError, InvalidBlobName):  # a name that could leave the storage root
            raise CorruptionError("index pack table holds an invalid blob name") from None
        pos += n
    if len(buf) - pos != count * _ENTRY.size:
        raise CorruptionError("index entry table has the wrong length")
    return packs, pos, count


class MappedPackTable:
    """A blob's pack table read in place: name ``i`` is decoded when asked for (names were
    validated when the blob was first decoded; the copy is authenticated)."""

    __slots__ = ("_buf", "_offsets")

    def __init__(self, buf, offsets):
        self._buf, self._offsets = buf, offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> str:
        pos = int(self._offsets[i])
        (n,) = C.INDEX_PACK_NAME_LENGTH.unpack_from(self._buf, pos)
        return bytes(self._buf[pos + 2:pos + 2 + n]).decode("ascii")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class IndexBlob:
    """A decoded index: binary search over the sorted fixed-size entries.

    ``data`` may be any buffer, a memory-mapped file of the local cache included. ``keys``, when
    set, is a sorted array of the first 8 bytes of every id as a number (see ``entry_keys``),
    so a lookup can search it without building one over every blob.
    """

    __slots__ = ("packs", "_buf", "_start", "count", "keys", "source", "_search_keys")

    def __init__(self, data):
        self._search_keys = None
        self._buf = memoryview(data)
        self.packs, self._start, self.count = _decode_tables(self._buf)
        self.keys = None
        self.source = None  # the local cache's file, for a mapped blob (authenticated again on reloads)
        count, npacks, pos = self.count, len(self.packs), self._start
        if count > _VECTOR_CHECK_FROM:
            _check_entries_vectorised(self._buf, pos, count, npacks)
            return
        prev = b""
        for i in range(count):  # validate once: sorted ids and pack numbers in range
            off = pos + i * _ENTRY.size
            cid = bytes(self._buf[off:off + _ID])
            if cid <= prev:
                raise CorruptionError("index entries are not strictly sorted")
            if int.from_bytes(self._buf[off + _ID:off + _ID + 4], "big") >= npacks:
                raise CorruptionError("index entry names a pack outside its table")
            prev = cid

    @classmethod
    def mapped(cls, buf, start: int, count: int, packs, keys, source) -> "IndexBlob":
        """A blob over an authenticated copy (the local cache's file ``source``): entries at
        ``start``, the pack table as a lazy sequence, the sorted keys given; nothing is decoded
        or checked here."""
        blob = cls.__new__(cls)
        blob._buf, blob._start, blob.count, blob.packs, blob.keys = memoryview(buf), start, count, packs, keys
        blob.source, blob._search_keys = source, None
        return blob

    def release_pages(self) -> None:
        """Let go of a mapped blob's pages (they stay in the page cache, and come back on the next
        read): a scan over a whole index otherwise ends with all of it in this process's RSS."""
        mm = getattr(self.source, "obj", None)
        if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or not supported here: only memory
                pass

    def pack_name_offsets(self) -> bytes:
        """Where each pack name of the table starts (its 2-byte length), as little-endian u32s:
        the local cache stores them so a mapped blob decodes a pack name only when an entry
        needs it (a compacted blob names nearly every pack of the repository)."""
        out, pos = [], C.INDEX_HEADER.size
        for name in self.packs:
            out.append(pos)
            pos += 2 + len(name)
        return struct.pack(f"<{len(out)}I", *out)

    def entry_key_bytes(self) -> bytes:
        """``entry_keys`` as little-endian u64s (the local cache's key array); small blobs
        without numpy, whose import costs a small command a tenth of a second."""
        if self.count > _VECTOR_CHECK_FROM:
            return self.entry_keys().tobytes()
        start, size = self._start, _ENTRY.size
        return struct.pack(f"<{self.count}Q", *(int.from_bytes(self._buf[start + i * size:start + i * size + 8], "big")
                                                 for i in range(self.count)))

    def entry_keys(self):
        """The first 8 bytes of each id as an unsigned number (little-endian uint64 array):
        sorted, since the ids are. The local cache stores them next to the entries."""
        import numpy as np

        rows = np.frombuffer(self._buf, dtype=np.uint8, count=self.count * _ENTRY.size,
                             offset=self._start).reshape(self.count, _ENTRY.size)
        return np.ascontiguousarray(rows[:, :8]).view(">u8").ravel().astype("<u8")

    def live_hits(self, keys, ids):
        """Which of the ids (``ids``: an (n, 32) uint8 array; ``keys``: their first 8 bytes as
        little-endian u64s) this blob holds: ``(held, deleted, unsure)`` boolean arrays, one
        search for all of them. ``unsure``: the key matches an entry whose id differs (a shared
        64-bit prefix); only an exact ``lookup`` can tell."""
        import numpy as np

        n = len(keys)
        if self.count == 0:
            return (np.zeros(n, bool),) * 3
        if self._search_keys is None:
            self._search_keys = np.asarray(self.keys) if self.keys is not None else self.entry_keys()
        sk = self._search_keys
        pos = np.minimum(np.searchsorted(sk, keys), self.count - 1)
        same_key = sk[pos] == keys
        rows = np.frombuffer(self._buf, dtype=np.uint8, count=self.count * _ENTRY.size,
                             offset=self._start).reshape(self.count, _ENTRY.size)
        picked = rows[pos]
        held = same_key & np.all(picked[:, :_ID] == ids, axis=1)
        deleted = held & ((picked[:, _FLAGS_AT] & C.INDEX_FLAG_DELETED) != 0)
        return held, deleted, same_key & ~held

    def ids(self) -> list[bytes]:
        """Every entry's id, in order."""
        size = _ENTRY.size
        data = bytes(self._buf[self._start:self._start + self.count * size])
        return [data[off:off + _ID] for off in range(0, len(data), size)]

    def _id_at(self, i: int) -> bytes:
        off = self._start + i * _ENTRY.size
        return self._buf[off:off + _ID].tobytes()

    def _entry_at(self, i: int) -> IndexEntry:
        cid, pno, offset, plen, olen, comp, flags, _r, ts = _ENTRY.unpack_from(self._buf, self._start + i * _ENTRY.size)
        return IndexEntry(cid, self.packs[pno], offset, plen, olen, comp, ts, bool(flags & C.INDEX_FLAG_DELETED))

    def lookup(self, content_id: bytes) -> IndexEntry | None:
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self._id_at(mid) < content_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.count and self._id_at(lo) == content_id:
            return self._entry_at(lo)
        return None

    def __iter__(self) -> Iterator[IndexEntry]:
        for i in range(self.count):
            yield self._entry_at(i)

    def __len__(self) -> int:
        return self.count


def index_blob_name(name_hasher: ContentHasher, plaintext: bytes, epoch: int, session: str) -> str:
    """``xn<epoch>_<keyed hash of the plaintext>-<session>``: deterministic for equal contents."""
    return f"{C.INDEX_PREFIX}{epoch}_{name_hasher(plaintext)[:16].hex()}-{session}"


def seal_index(aead: Aead, name: str, plaintext: bytes) -> bytes:
    return aead.seal(plaintext, name.encode("ascii"))


def open_index(aead: Aead, name: str, sealed: bytes) -> IndexBlob:
    plaintext = aead.open(sealed, name.encode("ascii"), what=f"index blob {name}")
    try:
        return IndexBlob(plaintext)
    except (CorruptionError, UnsupportedVersion) as exc:  # say which blob
        raise type(exc)(f"index blob {name}: {exc}") from None


class _SortedKeys:
    """Where every id of many index blobs is, in one sorted array: the first 8 bytes of each id
    as a 64-bit key (ids are keyed hashes: uniform), with the blob and position holding it.
    16 bytes per entry; a lookup is one binary search (numpy) instead of one per blob."""

    def __init__(self, blobs: list[IndexBlob]):
        import numpy as np  # only for indexes too large for a dict of winners

        keys, blob_no, pos = [], [], []
        for i, b in enumerate(blobs):
            if not b.count:
                continue
            keys.append(np.asarray(b.keys) if b.keys is not None else b.entry_keys())
            blob_no.append(np.full(b.count, i, dtype=np.int32))
            pos.append(np.arange(b.count, dtype=np.int32))
        if not keys:
            keys, blob_no, pos = [np.zeros(0, "<u8")], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        k = np.concatenate(keys)
        order = np.argsort(k, kind="stable")
        self._np = np
        self.keys, self.blob_no, self.pos = k[order], np.concatenate(blob_no)[order], np.concatenate(pos)[order]

    def find(self, blobs: list[IndexBlob], content_id: bytes, found: list[IndexEntry]) -> None:
        """Append every entry of ``content_id`` in the blobs to ``found``."""
        key = self._np.uint64(int.from_bytes(content_id[:8], "big"))
        i, n = int(self.keys.searchsorted(key)), len(self.keys)
        while i < n and self.keys[i] == key:
            b, p = blobs[self.blob_no[i]], int(self.pos[i])
            if b._id_at(p) == content_id:
                found.append(b._entry_at(p))
            i += 1


class _Runs:
    """Lookups over many index blobs without holding the index in memory.

    Blobs that carry their own sorted key array (``IndexBlob.keys``, memory-mapped from the
    local cache) and are large are searched one by one, skipping those whose key range does
    not hold the key: the members of a compacted set cover disjoint ranges, so a set costs one
    search. Small blobs (raw ones of recent epochs, often many) and blobs without keys share
    one in-memory ``_SortedKeys``, bounded to ``SMALL_TOTAL`` entries unless some lack keys.
    """

    SMALL = 50_000
    SMALL_TOTAL = 100_000  # 1.6 MiB of keys, 4 MiB while it is built: the flat-memory bound

    def __init__(self, blobs: list[IndexBlob]):
        import numpy as np

        budget = self.SMALL_TOTAL
        self.small: list[IndexBlob] = []
        self.large: list[IndexBlob] = []
        for b in sorted(blobs, key=lambda b: b.count):
            if b.keys is None or (b.count < self.SMALL and b.count <= budget):
                self.small.append(b)
                budget -= b.count if b.keys is not None else 0
            elif b.count:
                self.large.append(b)
        self._np = np
        self._small_keys = _SortedKeys(self.small) if self.small else None
        self._keys = [np.asarray(b.keys) for b in self.large]  # mapped memory, not copies
        self._lo = np.array([k[0] for k in self._keys], dtype="<u8")
        self._hi = np.array([k[-1] for k in self._keys], dtype="<u8")

    def find(self, content_id: bytes) -> list[IndexEntry]:
        found: list[IndexEntry] = []
        if self._small_keys is not None:
            self._small_keys.find(self.small, content_id, found)
        if not self.large:
            return found
        key = self._np.uint64(int.from_bytes(content_id[:8], "big"))
        for j in self._np.flatnonzero((self._lo <= key) & (key <= self._hi)):
            b, keys = self.large[j], self._keys[j]
            i = int(keys.searchsorted(key))
            while i < b.count and keys[i] == key:
                if b._id_at(i) == content_id:
                    found.append(b._entry_at(i))
                i += 1
        return found


class MergedIndex:
    """A read view over many index blobs plus in-memory entries, applying the conflict rule.

    Up to ``DICT_LIMIT`` entries, lookups go through a dict of winners built on first use (one
    hash probe); larger indexes stay as sorted raw bytes (memory-mapped ones from the local
    cache included), searched through ``_Runs``.
    """

    DICT_LIMIT = 200_000
    # live_many below this many entries and ids: one lookup each (importing numpy costs a small
    # command a tenth of a second)
    LIVE_SCALAR_LIMIT = 20_000

    def __init__(self, blobs: Iterable[IndexBlob] = (), names: list[str] | None = None):
        self._blobs: list[IndexBlob] = list(blobs)
        self.names = names  # the blobs' names, when an assembly made it (another process can read the same)
        self._count = sum(b.count for b in self._blobs)  # the blobs never change
        self._overlay: dict[bytes, IndexEntry] = {}
        # id -> the winning entry, or where it is (``_ref``) while no other entry competes with it
        self._winners: dict[bytes, IndexEntry | int] | None = None
        self._runs: _Runs | None = None
        self._lock = threading.Lock()  # lookups come from many threads while entries are added

    def named_blobs(self) -> list[tuple[str, IndexBlob]]:
        """(name, blob) of each blob, when an assembly named them (else none)."""
        return list(zip(self.names, self._blobs)) if self.names is not None else []

    def add_entries(self, entries: Iterable[IndexEntry]) -> None:
        with self._lock:
            self._add_entries(entries)

    def _add_entries(self, entries: Iterable[IndexEntry]) -> None:
        for e in entries:
            cur = self._overlay.get(e.content_id)
            if cur is None or wins(e, cur):
                self._overlay[e.content_id] = e
            if self._winners is not None:
                w = self._entry(self._winners.get(e.content_id))
                if w is None or wins(e, w):
                    self._winners[e.content_id] = e

    def lookup(self, content_id: bytes) -> IndexEntry | None:
        winners = self._winners
        if winners is None and self._count <= self.DICT_LIMIT:
            with self._lock:
                if self._winners is None:
                    self._winners = self._winning_entries()
                winners = self._winners
        if winners is not None:
            return self._entry(winners.get(content_id))
        if self._runs is None:
            with self._lock:
                if self._runs is None:
                    self._runs = _Runs(self._blobs)
        candidates = self._runs.find(content_id)
        candidates.append(self._overlay.get(content_id))
        return pick(c for c in candidates if c is not None)

    def live_many(self, content_ids: list[bytes]) -> list[bool]:
        """``[e is not None and not e.deleted for e in map(self.lookup, content_ids)]``, without
        building a dict of every winner (a second per 200,000 entries) or searching once per id:
        one vectorised search per blob. An id whose every entry (in the blobs and the overlay) is
        undeleted is live whatever the conflict rule picks; the few that have a deleted entry, or
        share a key with another id, are looked up exactly."""
        if not content_ids:
            return []
        if self._count + len(content_ids) <= self.LIVE_SCALAR_LIMIT:  # small: no numpy to import
            return [e is not None and not e.deleted for e in map(self.lookup, content_ids)]
        import numpy as np

        ids = np.frombuffer(b"".join(content_ids), dtype=np.uint8).reshape(len(content_ids), _ID)
        keys = np.ascontiguousarray(ids[:, :8]).view(">u8").ravel().astype("<u8")
        held = np.zeros(len(content_ids), bool)
        doubt = np.zeros(len(content_ids), bool)
        for b in self._blobs:
            h, deleted, unsure = b.live_hits(keys, ids)
            held |= h
            doubt |= deleted | unsure
        with self._lock:
            overlay = self._overlay
            if overlay:
                found = [overlay.get(c) for c in content_ids]
                held |= np.fromiter((e is not None for e in found), bool, len(found))
                doubt |= np.fromiter((e is not None and e.deleted for e in found), bool, len(found))
        live = held & ~doubt
        for i in np.flatnonzero(doubt):
            e = self.lookup_exact(content_ids[i])
            live[i] = e is not None and not e.deleted
        return live.tolist()

    def lookup_exact(self, content_id: bytes) -> IndexEntry | None:
        """``lookup`` by one binary search per blob, for a few ids (what ``live_many`` is unsure
        of): the first ``lookup`` of a small index builds a dict of every winner."""
        with self._lock:
            candidates = [self._overlay.get(content_id)]
        candidates += [b.lookup(content_id) for b in self._blobs]
        return pick(c for c in candidates if c is not None)

    def locations(self, content_id: bytes) -> list[IndexEntry]:
        """Every entry of ``content_id`` at a place of its own (pack, offset and record fields),
        best first by the conflict rule: where a reader looks when the winner's record does not
        open (a host's forged entry wins by its timestamp; a genuine copy may still be listed)."""
        with self._lock:
            found = [self._overlay.get(content_id)]
        found += [b.lookup(content_id) for b in self._blobs]
        out: list[IndexEntry] = []
        seen: set[tuple] = set()
        for e in sorted((e for e in found if e is not None), key=functools.cmp_to_key(_conflict_order)):
            if (place := place_of(e)) not in seen:
                seen.add(place)
                out.append(e)
        return out

    def referenced_packs(self) -> set[str]:
        """Every pack an entry of any blob points into, losers and deleted entries included: a
        blob's pack table names exactly the packs its entries use."""
        with self._lock:
            out = {e.pack for e in self._overlay.values()}
        for b in self._blobs:
            out.update(b.packs)
        return out

    def physical_entries(self) -> Iterator[IndexEntry]:
        """Every entry of every blob, losers included (maintenance: what points into which pack)."""
        with self._lock:
            overlay = list(self._overlay.values())
        yield from overlay
        for b in self._blobs:
            yield from b

    def scan(self, memory_limit: int):
        """The winners range by range in bounded memory (``repo_format.index_scan``)."""
        from repo_format.index_scan import IndexScan

        with self._lock:
            overlay = list(self._overlay.values())
        return IndexScan(self._blobs, overlay, memory_limit)

    def _winning_entries(self) -> dict[bytes, IndexEntry | int]:
        """id -> winner, as ``_ref(blob, row)`` for an id that one entry alone holds (an entry is
        made only when looked up: making all of them cost a second per 200,000), else the entry
        the conflict rule picks."""
        best: dict[bytes, IndexEntry | int] = {}
        contested: list[tuple[bytes, int]] = []
        for bno, b in enumerate(self._blobs):
            ref = bno << 32
            for cid in b.ids():
                if cid in best:
                    contested.append((cid, ref))
                else:
                    best[cid] = ref
                ref += 1
        for cid, ref in contested:
            e, cur = self._entry(ref), self._entry(best[cid])
            best[cid] = e if wins(e, cur) else cur
        for cid, e in self._overlay.items():
            cur = self._entry(best.get(cid))
            if cur is None or wins(e, cur):
                best[cid] = e
        return best

    def _entry(self, w: IndexEntry | int | None) -> IndexEntry | None:
        """A ``_winners`` value as an entry."""
        if type(w) is int:
            return self._blobs[w >> 32]._entry_at(w & 0xFFFFFFFF)
        return w

    def __iter__(self) -> Iterator[IndexEntry]:
        """Every winning entry (deleted ones included), in no particular order."""
        with self._lock:
            winners = self._winners if self._winners is not None else self._winning_entries()
            return iter([self._entry(w) for w in winners.values()])
