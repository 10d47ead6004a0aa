"""The content store: hash -> dedup -> compress -> encrypt -> pack, and authenticated reads.

``write(data)`` returns the content id (keyed hash of the plaintext) and stores the content once.
``flush()`` uploads open packs, then writes one index blob that points into them: packs always
before the index that names them (SPEC.md, ordering rules). ``read(id)`` authenticates the
ciphertext and checks the plaintext against its id before returning it.

Safe for many threads: hashing, compression and encryption run outside the lock (the libraries
release the GIL), only appending to a pack is serialised. Packs are uploaded by the thread that
filled them, outside the lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from repo_format import clock
from repo_format import constants as C
from repo_format.compression import compress, decompress
from repo_format.errors import BlobNotFound, ContentNotFound, CorruptionError, StorageError
from repo_format.format_blob import FormatBlob
from repo_format.index import IndexEntry, MergedIndex, index_blob_name, open_index, seal_index, encode_index
from repo_format.pack import PackWriter, content_aad, new_pack_name
from repo_format.storage.base import BlobStorage


@dataclass
class WriteStats:
    """What this store wrote (for reports): contents and bytes, new versus deduplicated."""

    contents_written: int = 0
    contents_deduplicated: int = 0
    bytes_original: int = 0
    bytes_packed: int = 0
    packs_written: int = 0
    index_blobs_written: int = 0


def load_committed_index(storage: BlobStorage, fmt: FormatBlob, workers: int = 8) -> MergedIndex:
    """Read every index blob (``xn*``) into a merged view."""
    aead = fmt.keys.index_aead()
    names = [m.name for m in storage.list(C.INDEX_PREFIX)]

    def load(name):
        try:
            return open_index(aead, name, storage.get(name))
        except BlobNotFound:
            return None  # removed by a concurrent compaction after the listing; its set replaces it

    merged = MergedIndex()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for blob in pool.map(load, names):
            if blob is not None:
                merged.add_blob(blob)
    return merged


class ContentStore:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, session: str,
                 committed: MergedIndex | None = None, epoch: int = 0):
        self.storage = storage
        self.session = session
        self.epoch = epoch
        p = fmt.parameters
        self._zstd_level = p.zstd_level
        self._pack_size = {False: p.pack_size, True: p.metadata_pack_size}
        self._hash = fmt.keys.content_hasher()
        self._content_aead = fmt.keys.content_aead()
        self._index_aead = fmt.keys.index_aead()
        self._name_hash = fmt.keys.name_hasher()
        self.committed = committed if committed is not None else load_committed_index(storage, fmt)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writers: dict[bool, PackWriter] = {}
        self._unflushed: dict[str, PackWriter] = {}  # packs not yet confirmed stored
        self._uploading = 0
        self._pending: dict[bytes, IndexEntry] = {}  # written since the last flush
        self._uploaded: list[IndexEntry] = []  # in stored packs, not yet in an index blob
        self._lost_packs = 0  # packs whose upload failed: ids returned for them are not stored
        self.stats = WriteStats()

    # ---- writing -------------------------------------------------------------------------
    def content_id(self, data) -> bytes:
        return self._hash(data)

    def contains(self, content_id: bytes) -> bool:
        """True if the content is stored (or pending) and not marked deleted."""
        with self._lock:
            if content_id in self._pending:
                return True
        e = self.committed.lookup(content_id)
        return e is not None and not e.deleted

    def write(self, data, metadata: bool = False) -> bytes:
        cid = self._hash(data)
        if self.contains(cid):
            with self._lock:
                self.stats.contents_deduplicated += 1
            return cid
        compression, payload = compress(data, self._zstd_level)
        sealed = self._content_aead.seal(payload, content_aad(cid, compression))
        full = None
        with self._lock:
            if cid in self._pending:
                self.stats.contents_deduplicated += 1
                return cid
            writer = self._writers.get(metadata)
            if writer is None:
                writer = self._writers[metadata] = PackWriter(new_pack_name(metadata, self.session))
                self._unflushed[writer.name] = writer
            self._pending[cid] = writer.add(cid, compression, sealed, len(data), int(clock.now() * 1e6))
            self.stats.contents_written += 1
            self.stats.bytes_original += len(data)
            self.stats.bytes_packed += len(sealed)
            if len(writer) >= self._pack_size[metadata]:
                full = self._writers.pop(metadata)
                self._uploading += 1
        if full is not None:
            self._upload(full)
        return cid

    def _upload(self, writer: PackWriter) -> None:
        """Store one pack; called with ``_uploading`` already counted for it.

        On failure its contents are forgotten (not left as pending), so a later write of the
        same data stores it again instead of deduplicating against a pack that does not exist.
        """
        ok = False
        try:
            self.storage.put(writer.name, writer.finish(self._index_aead))
            ok = True
        finally:
            with self._lock:
                self._unflushed.pop(writer.name, None)
                if ok:
                    self._uploaded.extend(writer.entries)
                    self.stats.packs_written += 1
                else:
                    self._lost_packs += 1
                    for e in writer.entries:
                        if self._pending.get(e.content_id) is e:
                            del self._pending[e.content_id]
                self._uploading -= 1
                self._idle.notify_all()

    def flush(self) -> str | None:
        """Store open packs, then one index blob naming them. Returns the index blob's name."""
        with self._lock:
            writers = list(self._writers.values())
            self._writers.clear()
            self._uploading += len(writers)
        errors = []
        for w in writers:
            try:
                self._upload(w)
            except Exception as exc:  # upload every pack we can, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]
        with self._lock:
            while self._uploading:
                self._idle.wait()
            if self._lost_packs:
                raise StorageError(
                    f"{self._lost_packs} pack(s) failed to upload; contents written into them are "
                    "not stored, so nothing that refers to them may be published"
                )
            entries, self._uploaded = self._uploaded, []
        if not entries:
            return None
        plaintext = encode_index(entries)
        name = index_blob_name(self._name_hash, plaintext, self.epoch, self.session)
        try:
            self.storage.put(name, seal_index(self._index_aead, name, plaintext))
        except BaseException:
            with self._lock:  # keep them for the next flush: they are still pending (deduplicated)
                self._uploaded[:0] = entries
            raise
        with self._lock:
            self.committed.add_entries(entries)
            for e in entries:
                if self._pending.get(e.content_id) is e:
                    del self._pending[e.content_id]
            self.stats.index_blobs_written += 1
        return name

    # ---- reading -------------------------------------------------------------------------
    def lookup(self, content_id: bytes) -> IndexEntry | None:
        with self._lock:
            e = self._pending.get(content_id)
        return e if e is not None else self.committed.lookup(content_id)

    def read(self, content_id: bytes) -> bytes:
        entry = self.lookup(content_id)
        if entry is None:
            raise ContentNotFound(f"content {content_id.hex()} is not in the index")
        return self.read_entry(entry)

    def read_entry(self, entry: IndexEntry) -> bytes:
        with self._lock:
            writer = self._unflushed.get(entry.pack)
            sealed = writer.read_pending(entry) if writer is not None else None
        if sealed is None:
            try:
                sealed = self.storage.get(entry.pack, entry.offset, entry.packed_length)
            except BlobNotFound:
                raise BlobNotFound(entry.pack, f"it holds content {entry.content_id.hex()}") from None
        if len(sealed) != entry.packed_length:
            raise CorruptionError(f"pack {entry.pack} is truncated: content {entry.content_id.hex()} is cut off")
        payload = self._content_aead.open(sealed, content_aad(entry.content_id, entry.compression),
                                          what=f"content {entry.content_id.hex()} in pack {entry.pack}")
        data = decompress(entry.compression, payload, entry.original_length)
        if self._hash(data) != entry.content_id:
            raise CorruptionError(f"content {entry.content_id.hex()} does not match its id")
        return data
