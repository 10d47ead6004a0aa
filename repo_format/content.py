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

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from repo_format import clock
from repo_format import constants as C
from repo_format.compression import compress, decompress
from repo_format.errors import BlobNotFound, ContentNotFound, CorruptionError, KdistError, StorageError
from repo_format.format_blob import FormatBlob
from repo_format.epoch import EpochManager
from repo_format.index import IndexEntry, MergedIndex
from repo_format.pack import PackWriter, content_aad, new_pack_name
from repo_format.safety import safety_of
from repo_format.session import SessionMarker
from repo_format.storage.base import BlobStorage


READ_AHEAD_BLOCK = 4 * 1024 * 1024
READ_AHEAD_BLOCKS = 8


class ContentLost(KdistError):
    """Maintenance removed a content that an unpublished backup refers to; it must not publish."""


@dataclass
class WriteStats:
    """What this store wrote (for reports): contents and bytes, new versus deduplicated."""

    contents_written: int = 0
    contents_deduplicated: int = 0
    bytes_original: int = 0
    bytes_packed: int = 0
    packs_written: int = 0
    index_blobs_written: int = 0


def make_epoch_manager(storage: BlobStorage, fmt: FormatBlob, session: str) -> EpochManager:
    keys = fmt.keys
    return EpochManager(storage, keys.index_aead(), keys.name_hasher(), keys.manifest_aead(),
                        safety_of(fmt.parameters), session)


def load_committed_index(storage: BlobStorage, fmt: FormatBlob) -> MergedIndex:
    """The repository's current index, assembled from its epochs (see ``repo_format.epoch``)."""
    return make_epoch_manager(storage, fmt, "0" * 2 * C.SESSION_ID_BYTES).load_index()


class ContentStore:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, session: str,
                 committed: MergedIndex | None = None, heartbeat_thread: bool = True):
        self.storage = storage
        self.session = session
        self.safety = safety_of(fmt.parameters)
        self.epochs = make_epoch_manager(storage, fmt, session)
        self.marker = SessionMarker(storage, fmt.keys.manifest_aead(), session,
                                    self.safety.session_heartbeat, self.safety.session_expiry,
                                    auto=heartbeat_thread)
        # a writer stalled on a slow read still refreshes its view, undeleting what it refers to
        self.marker.on_beat = self._committed_view
        self._marker_started = False
        p = fmt.parameters
        self._zstd_level = p.zstd_level
        self._pack_size = {False: p.pack_size, True: p.metadata_pack_size}
        self._hash = fmt.keys.content_hasher()
        self._content_aead = fmt.keys.content_aead()
        self._index_aead = fmt.keys.index_aead()
        self.committed = committed if committed is not None else self.epochs.load_index()
        self._committed_at = clock.monotonic()
        self._refresh_lock = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writers: dict[bool, PackWriter] = {}
        self._unflushed: dict[str, PackWriter] = {}  # packs not yet confirmed stored
        self._uploading = 0
        self._pending: dict[bytes, IndexEntry] = {}  # written since the last flush
        self._uploaded: list[IndexEntry] = []  # in stored packs, not yet in an index blob
        self._referenced: set[bytes] = set()  # ids this store wrote or deduplicated against
        # what this store published, with when: kept on top of reloaded indexes until a listing
        # is sure to show it (listing_settle), so a lagging listing never hides our own entries
        self._committed_overlay: list[tuple[float, IndexEntry]] = []
        self.revalidated_at = float("-inf")
        self._blocks: OrderedDict | None = None  # read-ahead cache, see ``read_ahead``
        self._block_limit = 0
        self._lost_packs = 0  # packs whose upload failed: ids returned for them are not stored
        self._lost_cause = ""  # the first such failure, for the message
        self.stats = WriteStats()

    # ---- writing -------------------------------------------------------------------------
    def content_id(self, data) -> bytes:
        return self._hash(data)

    def contains(self, content_id: bytes) -> bool:
        """True if the content is stored (or pending) and not marked deleted."""
        with self._lock:
            if content_id in self._pending:
                return True
        e = self._committed_view().lookup(content_id)
        return e is not None and not e.deleted

    def _committed_view(self) -> MergedIndex:
        """The committed index, reloaded once it is ``index_refresh`` old so that deletions made
        by maintenance are seen before this writer deduplicates against them (gc/README.md)."""
        if clock.monotonic() - self._committed_at >= self.safety.index_refresh and self._refresh_lock.acquire(blocking=False):
            try:
                fresh = self._reload()
                self._undelete_referenced(fresh)
            finally:
                self._refresh_lock.release()
        return self.committed

    def write(self, data, metadata: bool = False) -> bytes:
        if not self._marker_started:
            # A writer's session (and the heartbeat that keeps its index view fresh, undeleting
            # what it refers to) starts with its first write, deduplicated ones included.
            self._ensure_session()
        cid = self._hash(data)
        with self._lock:
            pending = cid in self._pending
        old = None if pending else self._committed_view().lookup(cid)  # one lookup per content
        if pending or (old is not None and not old.deleted):
            with self._lock:
                self.stats.contents_deduplicated += 1
                self._referenced.add(cid)
            return cid
        compression, payload = compress(data, self._zstd_level)
        sealed = self._content_aead.seal(payload, content_aad(cid, compression))
        # newer than a deletion marker of the same content: a rewrite must win over it whatever
        # this client's clock says (the conflict rule orders by timestamp)
        stamp = int(clock.now() * 1e6)
        if old is not None:
            stamp = max(stamp, old.timestamp_us + 1)
        with self._lock:
            self._referenced.add(cid)
            if cid in self._pending:
                self.stats.contents_deduplicated += 1
                return cid
            full = self._append(metadata, cid, compression, sealed, len(data), stamp)
        if full is not None:
            self._upload(full)
        return cid

    def rewrite(self, entries: list[IndexEntry]) -> int:
        """Maintenance (pack rewrite): copy these contents into new packs of this session, as
        entries that win over the given ones; ``flush`` then publishes them, packs first. Each
        record is authenticated, then copied sealed as it is: its AAD binds the content id and
        compression, not the pack. Not deduplicated, and not counted as referenced by this
        store (a rewrite must not keep garbage alive). Reads one span per source pack. Returns
        the bytes copied."""
        self._ensure_session()
        by_pack: dict[str, list[IndexEntry]] = {}
        for e in entries:
            by_pack.setdefault(e.pack, []).append(e)
        copied = 0
        for pack, group in by_pack.items():
            lo = min(e.offset for e in group)
            span = self.storage.get(pack, lo, max(e.offset + e.packed_length for e in group) - lo)
            for e in group:
                sealed = span[e.offset - lo:e.offset - lo + e.packed_length]
                if len(sealed) != e.packed_length:
                    raise CorruptionError(f"pack {pack} is truncated: content {e.content_id.hex()} is cut off")
                self._open(e, sealed)
                stamp = max(int(clock.now() * 1e6), e.timestamp_us + 1)  # wins over the old entry
                metadata = pack.startswith(C.METADATA_PACK_PREFIX)
                with self._lock:
                    full = self._append(metadata, e.content_id, e.compression, sealed, e.original_length, stamp)
                if full is not None:
                    self._upload(full)
                copied += len(sealed)
        return copied

    def _append(self, metadata: bool, cid: bytes, compression: int, sealed: bytes, original_length: int,
                timestamp_us: int) -> PackWriter | None:
        """Add one sealed record to the open pack (lock held); returns the pack if it is now full
        and must be uploaded (already counted in ``_uploading``)."""
        writer = self._writers.get(metadata)
        if writer is None:
            writer = self._writers[metadata] = PackWriter(new_pack_name(metadata, self.session))
            self._unflushed[writer.name] = writer
        self._pending[cid] = writer.add(cid, compression, sealed, original_length, timestamp_us)
        self.stats.contents_written += 1
        self.stats.bytes_original += original_length
        self.stats.bytes_packed += len(sealed)
        if len(writer) < self._pack_size[metadata]:
            return None
        self._uploading += 1
        return self._writers.pop(metadata)

    def _upload(self, writer: PackWriter) -> None:
        """Store one pack; called with ``_uploading`` already counted for it.

        On failure its contents are forgotten (not left as pending), so a later write of the
        same data stores it again instead of deduplicating against a pack that does not exist.
        """
        ok = False
        try:
            self._ensure_session()
            self.storage.put(writer.name, writer.finish(self._index_aead))
            ok = True
        except BaseException as exc:
            with self._lock:
                self._lost_cause = self._lost_cause or str(exc) or type(exc).__name__
            raise
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
        with self._lock:
            while self._uploading:
                self._idle.wait()
            lost, cause = self._lost_packs, self._lost_cause  # sticky: never publish after a loss
            entries, self._uploaded = self._uploaded, []
        # The packs that were stored are indexed even if others failed, so that the next run
        # reuses them instead of uploading everything again; then the failure is raised.
        try:
            name = self._write_index(entries) if entries else None
        except BaseException:
            if errors:  # the upload's failure is the one to report
                raise errors[0] from None
            raise
        if errors:
            raise errors[0]
        if lost:
            raise StorageError(
                f"{lost} pack(s) failed to upload (first: {cause}); contents written into them are "
                "not stored, so nothing that refers to them may be published"
            )
        return name

    def _write_index(self, entries: list[IndexEntry]) -> str:
        try:
            self.marker.check_alive()  # a lapsed session may have lost its packs to maintenance
            name = self.epochs.write_index(entries)
            self.marker.check_alive()
        except BaseException:
            with self._lock:  # keep them for the next flush: they are still pending (deduplicated)
                self._uploaded[:0] = entries
            raise
        with self._lock:
            self.committed.add_entries(entries)
            now = clock.monotonic()
            self._committed_overlay.extend((now, e) for e in entries)
            for e in entries:
                if self._pending.get(e.content_id) is e:
                    del self._pending[e.content_id]
            self.stats.index_blobs_written += 1
        return name

    def note_reference(self, content_id: bytes) -> None:
        """Record that what is about to be published refers to this content (reused files)."""
        with self._lock:
            self._referenced.add(content_id)

    def revalidate(self) -> int:
        """Before publishing: make sure every content this store wrote or deduplicated against
        is still in the index and live. Deleted ones (maintenance marked them while this backup
        ran) are undeleted; a missing one raises ``ContentLost`` so nothing refers to it.
        Returns the number undeleted."""
        if self._marker_started:  # our own packs are only safe while our session is live
            self.marker.check_alive()
        fresh = self._reload()
        undeleted = self._undelete_referenced(fresh, raise_lost=True)
        self.revalidated_at = clock.monotonic()
        return undeleted

    def confirm_published(self) -> None:
        """After the manifest is written: if this client was paused between ``revalidate`` and
        the write (longer than ``index_refresh``), maintenance may have acted meanwhile, so
        revalidate again; ``ContentLost`` tells the caller to withdraw what it published."""
        if clock.monotonic() - self.revalidated_at > self.safety.index_refresh:
            self.revalidate()

    def refresh_index(self) -> MergedIndex:
        """Load the committed index afresh now (undeleting what this store refers to, as every
        reload does, gc/README.md writer rule 5); returns it."""
        with self._refresh_lock:
            fresh = self._reload()
            self._undelete_referenced(fresh)
        return fresh

    def _reload(self) -> MergedIndex:
        """Swap in a freshly assembled index, plus what we published too recently to be surely
        listed; in one critical section with flush(), so no published entry falls between."""
        started = clock.monotonic()
        fresh = self.epochs.load_index()
        with self._lock:
            settled = started - self.safety.listing_settle
            self._committed_overlay = [(t, e) for t, e in self._committed_overlay if t >= settled]
            fresh.add_entries(e for _, e in self._committed_overlay)
            self.committed = fresh
            self._committed_at = clock.monotonic()
        return fresh

    def _undelete_referenced(self, index: MergedIndex, raise_lost: bool = False) -> int:
        """Undelete what this store refers to and maintenance marked deleted meanwhile (every
        index refresh does this, so a live backup's references outlast the drop margin)."""
        with self._lock:
            refs = [c for c in self._referenced if c not in self._pending]
        undelete, lost = [], []
        for cid in refs:
            e = index.lookup(cid)
            if e is None:
                lost.append(cid)
            elif e.deleted:
                undelete.append(replace(e, deleted=False, timestamp_us=e.timestamp_us + 1))
        if lost and raise_lost:
            raise ContentLost(f"{len(lost)} content(s) this backup refers to were removed by maintenance "
                              f"while it ran (first: {lost[0].hex()}); nothing was published, run it again")
        refresh = self.safety.index_refresh
        if undelete and refresh > 0 and clock.monotonic() - self._committed_at >= refresh:
            # paused since the load: undeletes come from a view at most index_refresh old (two-phase
            # blob GC counts on it, gc/README.md), so decide again from a fresh one
            return self._undelete_referenced(self._reload(), raise_lost)
        if undelete:
            self.epochs.write_index(undelete)
            with self._lock:
                index.add_entries(undelete)
                now = clock.monotonic()
                self._committed_overlay.extend((now, e) for e in undelete)
        return len(undelete)

    def _ensure_session(self) -> None:
        with self._lock:
            if self._marker_started:
                return
            self._marker_started = True
        self.marker.start()

    def close(self) -> None:
        """Flush, then retire this writer's session marker (also when the flush fails: a
        session left beating would keep its packs from maintenance for as long as the process
        lives)."""
        try:
            self.flush()
        except BaseException:
            try:
                self._retire()
            except KdistError:
                pass  # the flush's failure is the one to report
            raise
        self._retire()

    def _retire(self) -> None:
        with self._lock:
            started, self._marker_started = self._marker_started, False
        if started:
            self.marker.stop()

    # ---- reading -------------------------------------------------------------------------
    def lookup(self, content_id: bytes) -> IndexEntry | None:
        with self._lock:
            e = self._pending.get(content_id)
        return e if e is not None else self._committed_view().lookup(content_id)

    def read(self, content_id: bytes) -> bytes:
        entry = self.lookup(content_id)
        if entry is None:
            raise ContentNotFound(f"content {content_id.hex()} is not in the index")
        return self.read_entry(entry)

    def read_entry(self, entry: IndexEntry) -> bytes:
        """The content's plaintext, authenticated. If its pack is gone, the index may have moved
        the content meanwhile (a pack rewrite, then blob GC, after this index was loaded): reload
        the index once and read the new location."""
        try:
            sealed = self._fetch(entry)
        except BlobNotFound:
            moved = self._moved(entry)
            if moved is None:
                raise
            entry, sealed = moved, self._fetch(moved)
        return self._open(entry, sealed)

    def _moved(self, entry: IndexEntry) -> IndexEntry | None:
        """The content's winning entry in a freshly loaded index, if it points elsewhere."""
        now = self.refresh_index().lookup(entry.content_id)
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
        with self._lock:
            writer = self._unflushed.get(entry.pack)
            sealed = writer.read_pending(entry) if writer is not None else None
        if sealed is None:
            try:
                sealed = self._get(entry)
            except BlobNotFound:
                raise BlobNotFound(entry.pack, f"it holds content {entry.content_id.hex()}") from None
        if len(sealed) != entry.packed_length:
            raise CorruptionError(f"pack {entry.pack} is truncated: content {entry.content_id.hex()} is cut off")
        return sealed

    def _open(self, entry: IndexEntry, sealed: bytes) -> bytes:
        payload = self._content_aead.open(sealed, content_aad(entry.content_id, entry.compression),
                                          what=f"content {entry.content_id.hex()} in pack {entry.pack}")
        data = decompress(entry.compression, payload, entry.original_length)
        if self._hash(data) != entry.content_id:
            raise CorruptionError(f"content {entry.content_id.hex()} does not match its id")
        return data
