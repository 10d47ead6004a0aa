"""The content store: identify -> dedup -> seal -> pack, and authenticated reads.

``write(data)`` stores the content once and returns its reference (``repo_format.records``: the
content id, the keyed hash of the plaintext in format 2; in format 3 the id, the keyed hash of
the record, followed by the seed that opens it). ``flush()`` uploads open packs, then writes one
index blob that points into them: packs always before the index that names them (SPEC.md,
ordering rules). ``read(ref)`` authenticates the record and checks the plaintext against the
reference before returning it. The index knows contents by id alone.

``ContentStore`` is a facade over three parts, one module each: ``content_writer`` (packs,
flush, the session marker), ``index_view`` (the committed index, its reloads and undeletes)
and ``content_reader`` (reads, read-ahead, the local cache's metadata copies). It wires them
and holds no logic of its own; it must keep their one shared lock shared.
"""

from __future__ import annotations

import threading

from repo_format import constants as C
from repo_format.content_reader import READ_AHEAD_BLOCKS, ContentReader
from repo_format.content_writer import ContentWriter, WriterSession, WriteStats
from repo_format.epoch import EpochManager
from repo_format.format_blob import FormatBlob
from repo_format.index import IndexEntry, MergedIndex
from repo_format.index_view import ContentLost, IndexView
from repo_format.keyslots import ADMIN, MAINTENANCE, Trust
from repo_format.local_cache import LocalCache
from repo_format.records import records_for
from repo_format.safety import safety_of
from repo_format.session import SessionMarker
from repo_format.storage.base import BlobStorage
from repo_format.vouched import DedupGuard

__all__ = ["ContentLost", "ContentStore", "WriteStats", "load_committed_index", "make_epoch_manager",
           "start_signed_epochs"]


def make_epoch_manager(storage: BlobStorage, fmt: FormatBlob, session: str,
                       cache: LocalCache | None = None) -> EpochManager:
    keys = fmt.keys
    identity = fmt.identity  # None: an unsigned repository (format version 1)
    trust = Trust(fmt.unique_id, identity.root_public) if identity is not None else None
    signer = identity if identity is not None and identity.role in (ADMIN, MAINTENANCE) else None
    return EpochManager(storage, keys.index_aead(), keys.name_hasher(), keys.manifest_aead(),
                        safety_of(fmt.parameters), session, cache, trust, signer, fmt.unique_id)


def start_signed_epochs(storage: BlobStorage, fmt: FormatBlob) -> None:
    """A new signed repository's first marker (epoch 0, signed by the root) and its signed-sets
    blob: from the start only signed markers and signed index sets count (``repo_format.epoch``)."""
    if fmt.identity is not None:
        epochs = make_epoch_manager(storage, fmt, "0" * 2 * C.SESSION_ID_BYTES)
        epochs.write_marker(0)
        epochs.sign_epochs(epochs.refresh())


def load_committed_index(storage: BlobStorage, fmt: FormatBlob) -> MergedIndex:
    """The repository's current index, assembled from its epochs (see ``repo_format.epoch``)."""
    return make_epoch_manager(storage, fmt, "0" * 2 * C.SESSION_ID_BYTES).load_index()


class ContentStore:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, session: str,
                 committed: MergedIndex | None = None, heartbeat_thread: bool = True,
                 cache: LocalCache | None = None):
        self.storage = storage
        self.session = session
        self.safety = safety_of(fmt.parameters)
        self.cache = cache
        self.records = records_for(fmt.keys, fmt.version)  # how contents are sealed (repo_format.records)
        self.epochs = make_epoch_manager(storage, fmt, session, cache)
        self.marker = SessionMarker(storage, fmt.keys.manifest_aead(), session,
                                    self.safety.session_heartbeat, self.safety.session_expiry,
                                    auto=heartbeat_thread)
        # ONE lock for all three parts: the writer's publish and the view's reload are one
        # critical section (gc/README.md), and the view's undeletes skip what is still pending
        lock = threading.Lock()
        pending: dict[bytes, IndexEntry] = {}  # written, not yet published: the writer's, the view reads it
        self._session = WriterSession(self.marker, lock)
        self.index = IndexView(self.epochs, self.safety, lock, pending, committed, self._session.check_alive)
        # in a signed repository other keys can write index entries: deduplicate only against
        # places this writer authenticated (repo_format.vouched)
        self.guard = DedupGuard(storage, lambda e: self.reader.authentic_one(e),
                                cache.vouched_places() if cache is not None else None,
                                enabled=fmt.identity is not None)
        self.writer = ContentWriter(storage, fmt, self._session, self.epochs, self.index, lock, pending, cache,
                                    self.guard, self.records)
        self.reader = ContentReader(storage, self.records, self.index,
                                    self.writer.unflushed_record, lock, cache)
        # a writer stalled on a slow read still refreshes its view, undeleting what it refers to
        self.marker.on_beat = self.index.current

    @property
    def committed(self) -> MergedIndex:
        return self.index.committed

    @committed.setter
    def committed(self, index: MergedIndex) -> None:
        self.index.committed = index

    @property
    def stats(self) -> WriteStats:
        return self.writer.stats

    @property
    def cache_contents(self) -> bool:
        """Whether metadata contents read or written go through the local cache."""
        return self.reader.cache_contents

    @cache_contents.setter
    def cache_contents(self, on: bool) -> None:
        self.reader.cache_contents = self.writer.cache_contents = on

    @property
    def revalidated_at(self) -> float:
        return self.index.revalidated_at

    def hold_session(self) -> None:
        """Start this client's session marker now (it otherwise starts with the first write). A
        driver that publishes what other processes back up (their checkpoints name its session)
        holds it from before it hands out the first part: maintenance keeps the parts'
        checkpoints while it is live, and a driver whose session lapsed publishes nothing."""
        self._session.ensure()

    @property
    def _marker_started(self) -> bool:  # read by the simulator's scheduled heartbeat
        return self._session.started

    # ---- writing (content_writer) ------------------------------------------------------------
    def reference(self, data) -> bytes:
        """The reference writing ``data`` returns (format 3 seals it to know: use ``matches``
        to compare data with a reference)."""
        return self.writer.reference(data)

    def matches(self, ref: bytes, data) -> bool:
        """Whether ``data`` is the plaintext ``ref`` names."""
        return self.records.matches(ref, data)

    def write(self, data, metadata: bool = False, known: dict[bytes, bytes] | None = None, records=None) -> bytes:
        return self.writer.write(data, metadata, known, records)

    def rewrite(self, entries: list[IndexEntry]) -> tuple[int, int]:
        return self.writer.rewrite(entries)

    def flush(self) -> str | None:
        return self.writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
            loaded = self.index.loaded()
            if loaded is not None:  # (the packs of what this run published are in it)
                self.guard.prune(loaded.referenced_packs)
        finally:
            if self.guard.store is not None:
                self.guard.store.close()

    # ---- the committed index (index_view) ----------------------------------------------------
    # (each takes a content id or a reference: a reference's first bytes are its content's id)
    def lookup(self, content_id: bytes) -> IndexEntry | None:
        return self.index.lookup(content_id[:C.CONTENT_ID_SIZE])

    def contains(self, content_id: bytes) -> bool:
        return self.index.contains(content_id[:C.CONTENT_ID_SIZE])

    def contains_many(self, content_ids: list[bytes]) -> list[bool]:
        return self.index.contains_many([c[:C.CONTENT_ID_SIZE] for c in content_ids])

    def note_reference(self, content_id: bytes) -> None:
        self.index.note_reference(content_id[:C.CONTENT_ID_SIZE])

    def note_references(self, content_ids: list[bytes]) -> None:
        self.index.note_references([c[:C.CONTENT_ID_SIZE] for c in content_ids])

    def forget_references(self) -> None:
        self.index.forget_references()

    def revalidate(self) -> int:
        return self.index.revalidate()

    def confirm_published(self) -> None:
        self.index.confirm_published()

    def refresh_index(self) -> MergedIndex:
        return self.index.refresh_index()

    # ---- reading (content_reader) ------------------------------------------------------------
    def read(self, ref: bytes) -> bytes:
        return self.reader.read(ref)

    def read_entry(self, entry: IndexEntry, ref: bytes) -> bytes:
        return self.reader.read_entry(entry, ref)

    def certify_entry(self, entry: IndexEntry) -> None:
        self.reader.certify_entry(entry)

    def reading_ahead(self, blocks: int = READ_AHEAD_BLOCKS):
        return self.reader.reading_ahead(blocks)
