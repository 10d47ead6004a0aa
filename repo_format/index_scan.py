"""The winning index entries, one key range at a time, as numpy rows: maintenance over an index
that does not fit in memory as Python objects.

Content ids are keyed hashes, so the 64-bit key space (the first 8 bytes of an id) splits into
ranges holding about the same number of entries. For each range, every blob's slice is found by
a binary search of its sorted keys (memory-mapped from the local cache, or computed once per
blob), the slices' raw entries are gathered, and the conflict rule (``index.wins``) is applied
in numpy: newer timestamp, then live before deleted, then the smaller (pack name, offset, packed
length, original length, compression). Pack names are numbered in name order over every blob's
table, so that last tie-break is an integer comparison: the winners are exactly the ones
``MergedIndex.lookup`` returns. A range holds at most ``memory_limit / ROW_BYTES`` entries.

Rows keep the index encoding (``C.INDEX_ENTRY``) with one change: the pack field holds the
scan's own pack number (``IndexScan.packs``), not the blob's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from repo_format import constants as C
from repo_format.index import IndexBlob, IndexEntry, encode_index

if TYPE_CHECKING:
    from repo_format.epoch import EpochManager, IndexSet

Verify = Callable[[list[IndexEntry]], list[bool]]  # whether each entry's record is where it says
VERIFY_BATCH = 4096  # records read (and entries made) at once
ROW = C.INDEX_ENTRY.size
ROW_BYTES = 4 * ROW  # a gathered entry, its key, pack number and the sort's temporaries
# where each field of an entry (C.INDEX_ENTRY, >32sIIIIBBHq) starts in its row
PACK_AT, OFFSET_AT, PLEN_AT, OLEN_AT, COMP_AT, FLAGS_AT, TS_AT = 32, 36, 40, 44, 48, 49, 52
KEY_SPACE = 2**64


def column(rows: np.ndarray, at: int, dtype: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.ascontiguousarray(rows[:, at:at + size]).view(dtype).ravel()


@dataclass
class Winners:
    """The winning entry of every content id with a key in ``[lo, hi)``, sorted by id."""

    lo: int
    hi: int
    rows: np.ndarray  # (n, ROW) uint8, pack field = the scan's pack number
    keys: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def pack(self) -> np.ndarray:
        return column(self.rows, PACK_AT, ">u4").astype(np.int64)

    @property
    def deleted(self) -> np.ndarray:
        return (self.rows[:, FLAGS_AT] & C.INDEX_FLAG_DELETED).astype(bool)

    @property
    def timestamp(self) -> np.ndarray:
        return column(self.rows, TS_AT, ">i8").astype(np.int64)

    @property
    def packed_length(self) -> np.ndarray:
        return column(self.rows, PLEN_AT, ">u4").astype(np.int64)

    def entries(self, packs: list[str], mask: np.ndarray | None = None) -> list[IndexEntry]:
        rows = self.rows if mask is None else self.rows[mask]
        return entries_of(rows, packs)


def entries_of(rows: np.ndarray, packs: list[str]) -> list[IndexEntry]:
    """Index entries (Python objects) for rows whose pack field numbers ``packs``."""
    out = []
    for raw in rows:
        cid, pno, offset, plen, olen, comp, flags, _r, ts = C.INDEX_ENTRY.unpack(raw.tobytes())
        out.append(IndexEntry(cid, packs[pno], offset, plen, olen, comp, ts, bool(flags & C.INDEX_FLAG_DELETED)))
    return out


class IndexScan:
    """Winners over ``blobs`` (and loose ``extra`` entries) range by range; see the module doc."""

    def __init__(self, blobs: Iterable[IndexBlob], extra: Iterable[IndexEntry] = (),
                 memory_limit: int = 256 * 2**20, verify: "Verify | None" = None,
                 keep: Callable[[Winners], np.ndarray] | None = None):
        """``verify`` (merges): see ``_relocate``, which skips the winners ``keep`` drops; counts
        go to ``verified`` and ``relocated``."""
        self.verify, self.keep = verify, keep
        self.verified = self.relocated = 0
        self.blobs = [b for b in blobs if b.count]
        extra = list(extra)
        if extra:
            self.blobs.append(IndexBlob(encode_index(extra)))
        self.count = sum(b.count for b in self.blobs)
        names = set()
        for b in self.blobs:
            names.update(b.packs)
        self.packs: list[str] = sorted(names)
        number = {p: i for i, p in enumerate(self.packs)}
        self._to_scan = [np.array([number[p] for p in b.packs], dtype=">u4") for b in self.blobs]
        self._keys = [np.asarray(b.keys) if b.keys is not None else None for b in self.blobs]
        self.memory_limit = memory_limit
        per_range = max(1, memory_limit // ROW_BYTES)
        self.ranges_count = max(1, -(-self.count // per_range))

    def pack_number(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.packs)}

    def bounds(self) -> list[tuple[int, int]]:
        n = self.ranges_count
        edges = [i * KEY_SPACE // n for i in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def __iter__(self) -> Iterator[Winners]:
        for lo, hi in self.bounds():
            yield self.winners(lo, hi)

    def _blob_keys(self, i: int) -> np.ndarray:
        if self._keys[i] is None:  # a blob not from the local cache: its keys, once
            self._keys[i] = self.blobs[i].entry_keys()
        return self._keys[i]

    def _gather(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        rows, keys = [], []
        for i, b in enumerate(self.blobs):
            k = self._blob_keys(i)
            a = int(k.searchsorted(np.uint64(lo), "left"))
            z = b.count if hi >= KEY_SPACE else int(k.searchsorted(np.uint64(hi), "left"))
            if a == z:
                continue
            raw = np.frombuffer(b._buf, dtype=np.uint8, count=b.count * ROW, offset=b._start).reshape(b.count, ROW)
            part = raw[a:z].copy()
            part[:, PACK_AT:PACK_AT + 4] = self._to_scan[i][column(part, PACK_AT, ">u4")].view(np.uint8).reshape(-1, 4)
            rows.append(part)
            keys.append(np.asarray(k[a:z], dtype=np.uint64))
            b.release_pages()  # what this range read is copied: the mapping need not stay resident
        if not rows:
            return np.zeros((0, ROW), np.uint8), np.zeros(0, np.uint64)
        return np.concatenate(rows), np.concatenate(keys)

    def winners(self, lo: int, hi: int) -> Winners:
        rows, keys = self._gather(lo, hi)
        order = np.argsort(keys, kind="stable")
        rows, keys = rows[order], keys[order]
        same = keys[1:] == keys[:-1]
        if not same.any():
            return Winners(lo, hi, rows, keys)
        shared = np.zeros(len(keys), bool)
        shared[1:] |= same
        shared[:-1] |= same
        dup = np.flatnonzero(shared)
        r = rows[dup]
        words = [column(r, at, ">u8") for at in (8, 16, 24)]
        ts = column(r, TS_AT, ">i8")
        order = np.lexsort((r[:, COMP_AT], column(r, OLEN_AT, ">u4"), column(r, PLEN_AT, ">u4"), column(r, OFFSET_AT, ">u4"),
                            column(r, PACK_AT, ">u4"), r[:, FLAGS_AT] & C.INDEX_FLAG_DELETED, -ts,
                            words[2], words[1], words[0], keys[dup]))
        ids = np.column_stack([keys[dup][order]] + [w[order] for w in words])
        head = np.ones(len(order), bool)
        head[1:] = (ids[1:] != ids[:-1]).any(axis=1)  # the first row of each id wins
        if self.verify is not None:
            self._relocate(rows, dup[order], head)
        keep = np.ones(len(keys), bool)
        keep[dup] = False
        keep[dup[order][head]] = True
        rows, keys = rows[keep], keys[keep]
        if (keys[1:] == keys[:-1]).any():  # distinct ids sharing a key: order them by the whole id
            order = np.lexsort(tuple(column(rows, at, ">u8") for at in (24, 16, 8)) + (keys,))
            rows, keys = rows[order], keys[order]
        return Winners(lo, hi, rows, keys)

    def _relocate(self, rows: np.ndarray, at: np.ndarray, head: np.ndarray) -> None:
        """Before a merge keeps only the winners: for every id whose entries point to more than
        one place, read the winner's record (``verify``); if it is not there (a host's forged
        entry, or damage), give the winner the place of the best other entry whose record is,
        keeping the winner's timestamp and flags. So a merge never lets go of the last genuine
        place of a content. ``at``: the rows of the ids with several entries, each id's in
        conflict order; ``head``: which of them are winners. Changes ``rows`` in place."""
        place = rows[at][:, PACK_AT:COMP_AT + 1]
        group = np.cumsum(head) - 1
        first = np.flatnonzero(head)
        other = (place != place[first[group]]).any(axis=1)  # a place other than its winner's
        contested = np.unique(group[other])
        if self.keep is not None and len(contested):  # a winner the merge drops needs no place
            winners = rows[at[first[contested]]]
            contested = contested[self.keep(Winners(0, 0, winners, np.zeros(len(winners), np.uint64)))]
        if not len(contested):
            return
        candidates: dict[int, list[int]] = {}  # group -> positions in ``at``: the winner, then other places
        for g in contested.tolist():
            lo = int(first[g])
            hi = int(first[g + 1]) if g + 1 < len(first) else len(at)
            seen, order = set(), []
            for i in range(lo, hi):
                key = place[i].tobytes()
                if key not in seen:
                    seen.add(key)
                    order.append(i)
            candidates[g] = order
        tried = 0
        while candidates:  # round k tries each unresolved id's k-th place, VERIFY_BATCH at a time
            asked = [(g, c[tried]) for g, c in candidates.items() if tried < len(c)]
            if not asked:
                break
            for b in range(0, len(asked), VERIFY_BATCH):
                batch = asked[b:b + VERIFY_BATCH]
                ok = self.verify(entries_of(rows[at[[i for _g, i in batch]]], self.packs))
                self.verified += len(batch)
                for (g, i), good in zip(batch, ok):
                    if good:
                        if tried:  # the winner's record was not there: take this place
                            rows[at[first[g]], PACK_AT:COMP_AT + 1] = rows[at[i], PACK_AT:COMP_AT + 1]
                            self.relocated += 1
                        del candidates[g]
            tried += 1

    def referenced_packs(self) -> set[str]:
        """Every pack some entry points into, losers and deleted entries included."""
        return set(self.packs)


def encode_rows(rows: np.ndarray, packs: list[str]) -> bytes:
    """An index blob's plaintext (``encode_index``'s encoding) for rows sorted by id whose pack
    fields number ``packs`` (sorted by name, so the blob's table is too)."""
    numbers = column(rows, PACK_AT, ">u4")
    used = np.unique(numbers)
    out = rows.copy()
    out[:, PACK_AT:PACK_AT + 4] = np.searchsorted(used, numbers).astype(">u4").view(np.uint8).reshape(-1, 4)
    table = b"".join(C.INDEX_PACK_NAME_LENGTH.pack(len(raw)) + raw
                     for raw in (packs[i].encode("ascii") for i in used.tolist()))
    return C.INDEX_HEADER.pack(C.INDEX_MAGIC, C.INDEX_VERSION, 0, 0, len(out), len(used)) + table + out.tobytes()


def winner_blobs(blobs: list[IndexBlob], keep: Callable[[Winners], np.ndarray] | None = None,
                memory_limit: int = 256 * 2**20, per: int = C.INDEX_BLOB_MAX_ENTRIES,
                counts: list | None = None, verify: Verify | None = None) -> Iterator[bytes]:
    """The winners of ``blobs`` (those ``keep`` selects), encoded as blobs of ``per`` entries
    (the last one fewer; one empty blob for nothing), in id order. ``counts`` gets [kept, dropped].
    With ``verify``, a winner whose record is not where it says takes another entry's place
    (``IndexScan._relocate``)."""
    scan = IndexScan(blobs, memory_limit=memory_limit, verify=verify, keep=keep)
    kept = dropped = 0
    pending: list[np.ndarray] = []
    held = 0
    emitted = False
    for w in scan:
        rows = w.rows if keep is None else w.rows[keep(w)]
        kept += len(rows)
        dropped += len(w) - len(rows)
        pending.append(rows)
        held += len(rows)
        while held >= per:
            joined = np.concatenate(pending)
            yield encode_rows(joined[:per], scan.packs)
            emitted = True
            pending, held = [joined[per:]], held - per
    if counts is not None:
        counts[:] = [kept, dropped]
    if held or not emitted:
        yield encode_rows(np.concatenate(pending) if pending else np.zeros((0, ROW), np.uint8), scan.packs)


def merged_plaintexts(blobs: list[IndexBlob], memory_limit: int = 256 * 2**20,
                      verify: Verify | None = None) -> Iterator[bytes]:
    """Every winner of ``blobs``, as index blob plaintexts of at most 200,000 entries."""
    for plaintext in winner_blobs(blobs, memory_limit=memory_limit, verify=verify):
        if C.INDEX_HEADER.unpack_from(plaintext)[4]:  # (no empty blob for nothing)
            yield plaintext


def merge_into_set(epochs: "EpochManager", kind: str, epoch: int, blobs: list[IndexBlob],
                   keep: Callable[[Winners], np.ndarray] | None = None, memory_limit: int = 256 * 2**20,
                   before_put: Callable[[], None] | None = None,
                   verify: Verify | None = None) -> tuple["IndexSet", int, int]:
    """Merge ``blobs`` (the conflict rule: winners only) into one set ``kind``/``epoch``, keeping
    the winners ``keep`` selects (all by default), in bounded memory: the scan goes range by
    range and full members wait in temporary files until their number is known. ``before_put``
    runs before the first member is put (maintenance's storage-clock check). Returns the set,
    the entries kept and the entries dropped."""
    counts = [0, 0]
    with tempfile.TemporaryDirectory(prefix="kdist-merge-") as tmp:
        files: list[str] = []
        for plaintext in winner_blobs(blobs, keep, memory_limit, counts=counts, verify=verify):
            path = os.path.join(tmp, f"{len(files)}.bin")
            with open(path, "wb") as f:
                f.write(plaintext)
            files.append(path)
        if before_put is not None:
            before_put()

        def member(path: str) -> Callable[[], bytes]:
            def read() -> bytes:
                with open(path, "rb") as f:
                    return f.read()
            return read

        return epochs.put_set(kind, epoch, [member(p) for p in files]), counts[0], counts[1]
