"""Writing contents: identify -> dedup -> seal -> pack (``repo_format.records``: format 3 seals
before it can identify); ``flush`` uploads the open
packs, then one index blob that names them (packs always before the index that names them,
SPEC.md, ordering rules); and the writer's session marker (gc/README.md, writer rules 1-3).

Owns: the open packs and their uploads, the entries written but not yet published (``pending``),
``WriteStats``, and starting and retiring the session marker.

Must never: publish an index blob while its session may have lapsed, or after a pack failed to
upload (ids returned for it are not stored); deduplicate against anything but what the
``IndexView`` says is committed and live, at a place the ``DedupGuard`` vouches for (its
record authenticated by this writer: ``repo_format.vouched``); publish outside the lock it
shares with the view (a reload must never miss a published entry). Reading contents back is ``content_reader``'s.

Safe for many threads: hashing, compression and encryption run outside the lock (the libraries
release the GIL), only appending to a pack is serialised. Packs are uploaded by the thread that
filled them, outside the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from repo_format import clock
from repo_format import constants as C
from repo_format.epoch import EpochManager
from repo_format.errors import CorruptionError, KdistError, StorageError
from repo_format.format_blob import FormatBlob
from repo_format.index import IndexEntry, stamp_after
from repo_format.index_view import IndexView
from repo_format.local_cache import LocalCache
from repo_format.pack import PackWriter, new_pack_name
from repo_format.records import records_for
from repo_format.session import SessionMarker
from repo_format.storage.base import BlobStorage
from repo_format.vouched import DedupGuard


@dataclass
class WriteStats:
    """What this store wrote (for reports): contents and bytes, new versus deduplicated."""

    contents_written: int = 0
    contents_deduplicated: int = 0
    bytes_original: int = 0
    bytes_packed: int = 0
    packs_written: int = 0
    index_blobs_written: int = 0


class WriterSession:
    """The writer's session marker: published with the first write, deduplicated ones included
    (with the heartbeat that keeps the index view fresh), retired by ``close``."""

    def __init__(self, marker: SessionMarker, lock: threading.Lock):
        self.marker = marker
        self.id = marker.session
        self._lock = lock
        self._starting = threading.Lock()  # a second first write waits for the marker's first beat
        self.started = False

    def ensure(self) -> None:
        """Started once the first heartbeat is written: a thread racing the one that starts it
        waits (it used to go on, and its flush found a marker without a beat: "session expired").
        Once started, a write (per content: a hot path) takes no lock: ``started`` is set only
        after the first beat and never goes back but by ``retire``."""
        if self.started:
            return
        with self._starting:
            with self._lock:
                if self.started:
                    return
            self.marker.start()
            with self._lock:
                self.started = True

    def retire(self) -> None:
        with self._lock:
            started, self.started = self.started, False
        if started:
            self.marker.stop()

    def check_alive(self) -> None:
        """Raise if the session lapsed; a session not started has nothing of ours to protect."""
        if self.started:
            self.marker.check_alive()


class ContentWriter:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, session: WriterSession, epochs: EpochManager,
                 view: IndexView, lock: threading.Lock, pending: dict[bytes, IndexEntry],
                 cache: LocalCache | None = None, guard: DedupGuard | None = None, records=None):
        """``lock`` and ``pending`` are shared with ``view``: see the module docstring.
        ``guard`` says which committed entries may be deduplicated against (None: all).
        ``records``: the repository's record codec (``ContentStore.records``; None: made here)."""
        self.storage = storage
        self._session = session
        self.epochs = epochs
        self._view = view
        self._guard = guard if guard is not None else DedupGuard(storage, lambda e: True, None, enabled=False)
        self._lock = lock
        self._idle = threading.Condition(lock)
        self._pending = pending  # written since the last flush
        # metadata contents (directories) written go to the local cache: the next incremental
        # backup and restore read the previous snapshot's tree from it
        self.cache = cache
        self.cache_contents = cache is not None
        p = fmt.parameters
        self._zstd_level = p.zstd_level
        self._pack_size = {False: p.pack_size, True: p.metadata_pack_size}
        self._records = records if records is not None else records_for(fmt.keys, fmt.version)
        self._index_aead = fmt.keys.index_aead()
        self._writers: dict[bool, PackWriter] = {}
        self._unflushed: dict[str, PackWriter] = {}  # packs not yet confirmed stored
        self._uploading = 0
        self._uploaded: list[IndexEntry] = []  # in stored packs, not yet in an index blob
        self._lost_packs = 0  # packs whose upload failed: ids returned for them are not stored
        self._lost_cause = ""  # the first such failure, for the message
        self.stats = WriteStats()

    def reference(self, data) -> bytes:
        """The reference writing ``data`` would return (format 3 seals it to know)."""
        return self._records.identify(data, self._zstd_level)[0]

    def write(self, data, metadata: bool = False, known: dict[bytes, bytes] | None = None,
              records=None) -> bytes:
        """Store ``data`` once; its reference (``repo_format.records``: the content id, and in
        format 3 the seed that opens it). ``known`` (format 3): references by seed, those of the
        previous version of the file being written: a content among them is deduplicated by its
        seed, a keyed hash, without the seal its id otherwise needs (SPEC.md section 4a).
        ``records``: the codec to seal with instead of the repository's (format 3: a host's tree
        records, ``ObjectStore.for_host``)."""
        if not self._session.started:
            self._session.ensure()
        records = records or self._records
        if known and records.ref_size > C.CONTENT_ID_SIZE:
            ref = known.get(records.seed(data))
            if ref is not None and self._deduplicated(ref[:C.CONTENT_ID_SIZE])[0]:
                return ref
        ref, sealed = records.identify(data, self._zstd_level)
        cid = ref[:C.CONTENT_ID_SIZE]
        done, old = self._deduplicated(cid)
        if done:
            return ref
        if sealed is None:
            sealed = records.seal(data, self._zstd_level, ref)
        # newer than a deletion marker of the same content: a rewrite must win over it whatever
        # this client's clock says (the conflict rule orders by timestamp)
        stamp = int(clock.now() * 1e6)
        if old is not None:
            stamp = max(stamp, stamp_after(old.timestamp_us))
        with self._lock:
            self._view.add_reference_locked(cid)
            if cid in self._pending:
                self.stats.contents_deduplicated += 1
                return ref
            full = self._append(metadata, cid, sealed.compression, sealed.record, len(data), stamp)
        if metadata and self.cache_contents:  # a copy, used only once an index entry names it
            self.cache.store_content(cid, sealed.record)
        if full is not None:
            self._upload(full)
        return ref

    def _deduplicated(self, cid: bytes) -> tuple[bool, IndexEntry | None]:
        """Whether content ``cid`` is pending, or stored live at a place the guard vouches for
        (then counted as deduplicated and referenced by this writer); and its winning entry.
        A live entry only counts from a place this writer vouches for: else the content is
        stored again, with an entry that wins over it (any host can write an entry for a
        content it guesses)."""
        with self._lock:
            pending = cid in self._pending
        old = None if pending else self._view.current().lookup(cid)  # one lookup per content
        if not (pending or (old is not None and not old.deleted and self._guard.vouches(old))):
            return False, old
        with self._lock:
            self.stats.contents_deduplicated += 1
            self._view.add_reference_locked(cid)
        return True, old

    def rewrite(self, entries: list[IndexEntry]) -> tuple[int, int]:
        """Maintenance (pack rewrite): copy these contents into new packs of this session, as
        entries that win over the given ones; ``flush`` then publishes them, packs first. Each
        record is authenticated, then copied sealed as it is: its AAD binds the content id and
        compression, not the pack (format 3: it is what the id hashes). Not deduplicated, and
        not counted as referenced by this writer (a rewrite must not keep garbage alive). Reads
        one span per source pack. Returns the bytes copied and the number of records that were
        not where their entry said (left alone)."""
        self._session.ensure()
        by_pack: dict[str, list[IndexEntry]] = {}
        for e in entries:
            by_pack.setdefault(e.pack, []).append(e)
        copied = unreadable = 0
        for pack, group in by_pack.items():
            lo = min(e.offset for e in group)
            span = self.storage.get(pack, lo, max(e.offset + e.packed_length for e in group) - lo)
            for e in group:
                sealed = span[e.offset - lo:e.offset - lo + e.packed_length]
                try:
                    if len(sealed) != e.packed_length:
                        raise CorruptionError(f"pack {pack} is truncated: content {e.content_id.hex()} is cut off")
                    self._records.certify(e, sealed)
                except CorruptionError:
                    # not where the entry says (a host's forged entry, or damage): left as it
                    # is, for the merges to replace with a place where it is (IndexScan._relocate)
                    unreadable += 1
                    continue
                stamp = max(int(clock.now() * 1e6), stamp_after(e.timestamp_us))  # wins over the old entry
                metadata = pack.startswith(C.METADATA_PACK_PREFIX)
                with self._lock:
                    full = self._append(metadata, e.content_id, e.compression, sealed, e.original_length, stamp)
                if full is not None:
                    self._upload(full)
                copied += len(sealed)
        return copied, unreadable

    def unflushed_record(self, entry: IndexEntry) -> bytes | None:
        """The entry's sealed record if its pack is still here (open, or not yet confirmed
        stored); else None."""
        with self._lock:
            writer = self._unflushed.get(entry.pack)
            return writer.read_pending(entry) if writer is not None else None

    def _append(self, metadata: bool, cid: bytes, compression: int, sealed: bytes, original_length: int,
                timestamp_us: int) -> PackWriter | None:
        """Add one sealed record to the open pack (lock held); returns the pack if it is now full
        and must be uploaded (already counted in ``_uploading``)."""
        writer = self._writers.get(metadata)
        if writer is None:
            writer = self._writers[metadata] = PackWriter(new_pack_name(metadata, self._session.id))
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
            self._session.ensure()
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
        self._guard.wrote(writer.name, writer.entries)

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
        self._guard.save()
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
            self._session.marker.check_alive()  # a lapsed session may have lost its packs to maintenance
            name = self.epochs.write_index(entries)
            self._session.marker.check_alive()
        except BaseException:
            with self._lock:  # keep them for the next flush: they are still pending (deduplicated)
                self._uploaded[:0] = entries
            raise
        with self._lock:  # the view learns them in the same critical section as they leave pending
            self._view.note_published_locked(entries, name)
            for e in entries:
                if self._pending.get(e.content_id) is e:
                    del self._pending[e.content_id]
            self.stats.index_blobs_written += 1
        return name

    def close(self) -> None:
        """Flush, then retire this writer's session marker (also when the flush fails: a
        session left beating would keep its packs from maintenance for as long as the process
        lives)."""
        try:
            self.flush()
        except BaseException:
            try:
                self._session.retire()
            except KdistError:
                pass  # the flush's failure is the one to report
            raise
        self._session.retire()
