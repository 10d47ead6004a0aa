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

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from repo_format import constants as C
from repo_format.crypto import Aead, ContentHasher
from repo_format.errors import CorruptionError, InvalidBlobName, UnsupportedVersion
from repo_format.storage.base import validate_name

_ENTRY = C.INDEX_ENTRY
_ID = C.CONTENT_ID_SIZE


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


def wins(a: IndexEntry, b: IndexEntry) -> bool:
    """True if ``a`` takes precedence over ``b`` for the same content id."""
    if a.timestamp_us != b.timestamp_us:
        return a.timestamp_us > b.timestamp_us
    if a.deleted != b.deleted:
        return not a.deleted
    return ((a.pack, a.offset, a.packed_length, a.original_length, a.compression)
            < (b.pack, b.offset, b.packed_length, b.original_length, b.compression))


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


def _check_entries_vectorised(buf, start: int, count: int, npacks: int) -> None:
    """The decoder's entry checks (ids strictly sorted, pack numbers in the table) in numpy:
    a Python loop costs 0.6 s per million entries."""
    import numpy as np

    rows = np.frombuffer(buf, dtype=np.uint8, count=count * _ENTRY.size, offset=start).reshape(count, _ENTRY.size)
    ids = rows[:, :_ID]
    differ = ids[1:] != ids[:-1]
    if not differ.any(axis=1).all():
        raise CorruptionError("index entries are not strictly sorted")
    first = differ.argmax(axis=1)  # the first byte where neighbours differ decides their order
    r = np.arange(count - 1)
    if not (ids[1:][r, first] > ids[:-1][r, first]).all():
        raise CorruptionError("index entries are not strictly sorted")
    if np.ascontiguousarray(rows[:, _ID:_ID + 4]).view(">u4").max() >= npacks:
        raise CorruptionError("index entry names a pack outside its table")


class IndexBlob:
    """A decoded index: binary search over the sorted fixed-size entries."""

    __slots__ = ("packs", "_buf", "_start", "count")

    def __init__(self, data: bytes):
        hdr = C.INDEX_HEADER
        if len(data) < hdr.size:
            raise CorruptionError("index is truncated")
        magic, version, _flags, _res, count, npacks = hdr.unpack_from(data)
        if magic != C.INDEX_MAGIC:
            raise CorruptionError("index has a bad magic")
        if version != C.INDEX_VERSION:
            raise UnsupportedVersion(f"index format version {version} is not supported")
        if count > C.MAX_INDEX_ENTRIES or npacks > count + 1:
            raise CorruptionError(f"index declares an absurd size ({count} entries, {npacks} packs)")
        pos = hdr.size
        packs = []
        for _ in range(npacks):
            if pos + 2 > len(data):
                raise CorruptionError("index pack table is truncated")
            (n,) = C.INDEX_PACK_NAME_LENGTH.unpack_from(data, pos)
            pos += 2
            if n == 0 or n > C.MAX_PACK_NAME_LENGTH or pos + n > len(data):
                raise CorruptionError("index pack table is malformed")
            try:
                packs.append(validate_name(data[pos:pos + n].decode("ascii")))
            except (UnicodeDecodeError, InvalidBlobName):  # a name that could leave the storage root
                raise CorruptionError("index pack table holds an invalid blob name") from None
            pos += n
        if len(data) - pos != count * _ENTRY.size:
            raise CorruptionError("index entry table has the wrong length")
        self.packs = packs
        self._buf = memoryview(data)
        self._start = pos
        self.count = count
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
            rows = np.frombuffer(b._buf, dtype=np.uint8, count=b.count * _ENTRY.size,
                                 offset=b._start).reshape(b.count, _ENTRY.size)
            keys.append(np.ascontiguousarray(rows[:, :8]).view(">u8").ravel().astype(np.uint64))
            blob_no.append(np.full(b.count, i, dtype=np.int32))
            pos.append(np.arange(b.count, dtype=np.int32))
        if not keys:
            keys, blob_no, pos = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        k = np.concatenate(keys)
        order = np.argsort(k, kind="stable")
        self._np = np
        self.keys, self.blob_no, self.pos = k[order], np.concatenate(blob_no)[order], np.concatenate(pos)[order]

    def find(self, blobs: list[IndexBlob], content_id: bytes) -> list[IndexEntry]:
        """Every entry of ``content_id`` in the blobs."""
        key = self._np.uint64(int.from_bytes(content_id[:8], "big"))
        i, n, found = int(self.keys.searchsorted(key)), len(self.keys), []
        while i < n and self.keys[i] == key:
            b, p = blobs[self.blob_no[i]], int(self.pos[i])
            if b._id_at(p) == content_id:
                found.append(b._entry_at(p))
            i += 1
        return found


class MergedIndex:
    """A read view over many index blobs plus in-memory entries, applying the conflict rule.

    Up to ``DICT_LIMIT`` entries, lookups go through a dict of winners built on first use (one
    hash probe); larger indexes stay as sorted raw bytes, found through one sorted array of
    keys over all blobs (``_SortedKeys``, 16 bytes per entry).
    """

    DICT_LIMIT = 200_000

    def __init__(self, blobs: Iterable[IndexBlob] = ()):
        self._blobs: list[IndexBlob] = list(blobs)
        self._count = sum(b.count for b in self._blobs)  # the blobs never change
        self._overlay: dict[bytes, IndexEntry] = {}
        self._winners: dict[bytes, IndexEntry] | None = None
        self._keys: _SortedKeys | None = None
        self._lock = threading.Lock()  # lookups come from many threads while entries are added

    def add_entries(self, entries: Iterable[IndexEntry]) -> None:
        with self._lock:
            self._add_entries(entries)

    def _add_entries(self, entries: Iterable[IndexEntry]) -> None:
        for e in entries:
            cur = self._overlay.get(e.content_id)
            if cur is None or wins(e, cur):
                self._overlay[e.content_id] = e
            if self._winners is not None:
                w = self._winners.get(e.content_id)
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
            return winners.get(content_id)
        if self._keys is None:
            with self._lock:
                if self._keys is None:
                    self._keys = _SortedKeys(self._blobs)
        candidates = self._keys.find(self._blobs, content_id)
        candidates.append(self._overlay.get(content_id))
        return pick(c for c in candidates if c is not None)

    def physical_entries(self) -> Iterator[IndexEntry]:
        """Every entry of every blob, losers included (maintenance: what points into which pack)."""
        with self._lock:
            overlay = list(self._overlay.values())
        yield from overlay
        for b in self._blobs:
            yield from b

    def _winning_entries(self) -> dict[bytes, IndexEntry]:
        best: dict[bytes, IndexEntry] = dict(self._overlay)
        for b in self._blobs:
            for e in b:
                cur = best.get(e.content_id)
                if cur is None or wins(e, cur):
                    best[e.content_id] = e
        return best

    def __iter__(self) -> Iterator[IndexEntry]:
        """Every winning entry (deleted ones included), in no particular order."""
        with self._lock:
            winners = self._winners if self._winners is not None else self._winning_entries()
            return iter(list(winners.values()))
