"""Reading contents back: each one authenticated and checked against its id before it is
returned, wherever its bytes came from.

Owns: ``read``/``read_entry``; following a content that maintenance moved since the index was
loaded; the read-ahead cache of aligned pack blocks (``reading_ahead``); and the local cache's
copies of metadata contents on the read side (used when present, refilled after a download).

Must never: return bytes it did not authenticate (a cached copy or a read-ahead block is opened
like any download), write to the repository, or hold the shared lock during a storage request.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from repo_format import constants as C
from repo_format.errors import BlobNotFound, ContentNotFound, CorruptionError
from repo_format.index import IndexEntry, place_of
from repo_format.io_pool import parallel_map
from repo_format.index_view import IndexView
from repo_format.local_cache import LocalCache
from repo_format.records import ConvergentRecords, KeyedRecords
from repo_format.storage.base import BlobStorage


READ_AHEAD_BLOCK = 4 * 1024 * 1024
READ_AHEAD_BLOCKS = 8


class ContentReader:
    def __init__(self, storage: BlobStorage, records: KeyedRecords | ConvergentRecords, view: IndexView,
                 unflushed: Callable[[IndexEntry], bytes | None], lock: threading.Lock,
                 cache: LocalCache | None = None):
        """``unflushed`` gives a record from a pack the writer has not stored yet (or None);
        ``lock`` is the one the writer and the view share."""
        self.storage = storage
        self._records = records
        self._view = view
        self._unflushed = unflushed
        self._lock = lock
        # metadata contents (directories) read go to the local cache: the next incremental
        # backup and restore read the previous snapshot's tree from it (off to verify the storage)
        self.cache = cache
        self.cache_contents = cache is not None
        self._blocks: OrderedDict | None = None  # read-ahead cache, see ``reading_ahead``
        self._block_limit = 0

    def read(self, ref: bytes) -> bytes:
        """The plaintext of the content ``ref`` names (``repo_format.records``: its id, and in
        format 3 the seed that opens it). If the winning entry's record does not open (or its
        pack is gone), the content's other places in this index are tried, best first: a host
        with the index key can write an entry that wins and points anywhere, but no record other
        than the genuine one opens as this content. Only then, for a pack that is gone, is the index
        reloaded once (a pack rewrite moved the content after this index was loaded)."""
        if type(ref) is not bytes or len(ref) != self._records.ref_size:
            raise CorruptionError("malformed content reference")
        content_id = ref[:C.CONTENT_ID_SIZE]
        entry = self._view.lookup(content_id)
        if entry is None:
            raise ContentNotFound(f"content {content_id.hex()} is not in the index")
        try:
            return self._read_at(entry, ref)
        except (CorruptionError, BlobNotFound) as first:
            for other in self._view.locations(content_id):
                if place_of(other) == place_of(entry):
                    continue
                try:
                    return self._read_at(other, ref)
                except (CorruptionError, BlobNotFound):
                    continue
            moved = self._moved(entry) if isinstance(first, BlobNotFound) else None
            if moved is None:
                raise first
            return self._read_at(moved, ref)

    def authentic(self, entries: list[IndexEntry]) -> list[bool]:
        """``authentic_one`` of each entry, in parallel (maintenance's merges, before they let
        another place of a content go)."""
        return parallel_map(self.authentic_one, entries)

    def authentic_one(self, e: IndexEntry) -> bool:
        """Whether the entry's record is where it says: read from the storage (never a cached
        copy) and certified (``repo_format.records``: opened and checked against its id; format 3
        checks its hash, needing no seed). A missing pack or a record that does not certify is
        False; any other error raises."""
        try:
            sealed = self.storage.get(e.pack, e.offset, e.packed_length)
            if len(sealed) != e.packed_length:
                return False
            self._records.certify(e, sealed)
            return True
        except (BlobNotFound, CorruptionError):
            return False

    def read_entry(self, entry: IndexEntry, ref: bytes) -> bytes:
        """The plaintext of the content ``ref`` names, from the place ``entry`` says. If its pack
        is gone, the index may have moved the content meanwhile (a pack rewrite, then blob GC,
        after this index was loaded): reload the index once and read the new location."""
        try:
            return self._read_at(entry, ref)
        except BlobNotFound:
            moved = self._moved(entry)
            if moved is None:
                raise
            return self._read_at(moved, ref)

    def certify_entry(self, entry: IndexEntry) -> None:
        """``CorruptionError`` unless the entry's record is where it says and is the record its
        id names (``repo_format.records``: format 2 opens it, format 3 hashes it); what a reader
        without the content's reference checks (``repo check --read-data``). A pack that is gone
        is followed as ``read_entry`` follows it."""
        try:
            self._records.certify(entry, self._fetch(entry))
        except BlobNotFound:
            moved = self._moved(entry)
            if moved is None:
                raise
            self._records.certify(moved, self._fetch(moved))

    def _read_at(self, entry: IndexEntry, ref: bytes) -> bytes:
        """The record the entry points to, opened. Metadata contents come from the local cache
        when it has them (authenticated like any other copy; a copy that fails is dropped)."""
        if self._cached(entry):
            sealed = self.cache.content(entry.content_id, entry.packed_length)
            if sealed is not None:
                try:
                    return self._open(entry, sealed, ref)
                except CorruptionError:
                    self.cache.drop_content(entry.content_id)
        sealed = self._fetch(entry)
        data = self._open(entry, sealed, ref)
        if self._cached(entry):
            self.cache.store_content(entry.content_id, sealed)
        return data

    def _cached(self, entry: IndexEntry) -> bool:
        """Whether the entry's content goes through the local cache: metadata contents only."""
        return self.cache_contents and entry.pack.startswith(C.METADATA_PACK_PREFIX)

    def _moved(self, entry: IndexEntry) -> IndexEntry | None:
        """The content's winning entry in a freshly loaded index, if it points elsewhere."""
        now = self._view.refresh_index().lookup(entry.content_id)
        if now is None or (now.pack, now.offset) == (entry.pack, entry.offset):
            return None
        return now

    @contextlib.contextmanager
    def reading_ahead(self, blocks: int = READ_AHEAD_BLOCKS):
        """While reading a snapshot in order (restore, an incremental backup's previous
        directories), read small contents through a cache of ``blocks`` aligned pack blocks of
        ``READ_AHEAD_BLOCK`` bytes: contents written together lie together in a pack, so one
        request serves many small files instead of one each. Not by default: a single lookup
        would read a whole block for one content. Two threads missing the same block both read
        it (no in-flight sharing)."""
        with self._lock:
            saved = self._blocks, self._block_limit
            if self._blocks is None:
                self._blocks, self._block_limit = OrderedDict(), blocks
        try:
            yield
        finally:
            with self._lock:
                self._blocks, self._block_limit = saved

    def _get(self, entry: IndexEntry) -> bytes:
        blocks = self._blocks
        if blocks is None:
            return self.storage.get(entry.pack, entry.offset, entry.packed_length)
        start = entry.offset - entry.offset % READ_AHEAD_BLOCK
        key, rel = (entry.pack, start), entry.offset - start
        inside = rel + entry.packed_length <= READ_AHEAD_BLOCK
        with self._lock:
            block = blocks.get(key) if inside else None
            if block is not None:
                blocks.move_to_end(key)
        if block is None:
            if not inside or entry.packed_length > READ_AHEAD_BLOCK // 4:  # large: read it alone
                return self.storage.get(entry.pack, entry.offset, entry.packed_length)
            block = self.storage.get(entry.pack, start, READ_AHEAD_BLOCK)  # short at the pack's end
            with self._lock:
                blocks[key] = block
                while len(blocks) > self._block_limit:
                    blocks.popitem(last=False)
        return block[rel:rel + entry.packed_length]  # short if the pack is truncated: caught below

    def _fetch(self, entry: IndexEntry) -> bytes:
        sealed = self._unflushed(entry)
        if sealed is None:
            try:
                sealed = self._get(entry)
            except BlobNotFound:
                raise BlobNotFound(entry.pack, f"it holds content {entry.content_id.hex()}") from None
        if len(sealed) != entry.packed_length:
            raise CorruptionError(f"pack {entry.pack} is truncated: content {entry.content_id.hex()} is cut off")
        return sealed

    def _open(self, entry: IndexEntry, sealed: bytes, ref: bytes) -> bytes:
        return self._records.open(ref, entry, sealed)
