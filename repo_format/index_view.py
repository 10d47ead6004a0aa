"""A writing client's view of the committed index: loaded on first use, reloaded once it is
``index_refresh`` old, and kept honest about what this client refers to (gc/README.md, writer
rules 5 and 7).

Owns: the committed ``MergedIndex``; the overlay of entries this client published, kept on top
of reloads until a listing is sure to show them; the set of contents this client wrote or
deduplicated against, and the undeletes every reload writes for them; ``lookup``/``contains``,
which see the writer's pending entries first.

Must never: take a lock of its own where it meets the writer. A reload swaps the index under the
lock the writer publishes under (one ``threading.Lock``, passed in), so no published entry falls
between a reload's listing and its swap. Nor may it undelete an id still pending in the writer
(not in any index yet), write packs, or read contents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from repo_format import clock
from repo_format.epoch import EpochManager
from repo_format.errors import KdistError
from repo_format.index import IndexEntry, MergedIndex, stamp_after
from repo_format.safety import SafetyParameters


class ContentLost(KdistError):
    """Maintenance removed a content that an unpublished backup refers to; it must not publish."""


class IndexView:
    def __init__(self, epochs: EpochManager, safety: SafetyParameters, lock: threading.Lock,
                 pending: Mapping[bytes, IndexEntry], committed: MergedIndex | None = None,
                 check_session: Callable[[], None] = lambda: None):
        """``lock`` and ``pending`` are the writer's: its entries not yet published, read here
        only under that lock. ``check_session`` raises if the writer's session lapsed."""
        self.epochs = epochs
        self.safety = safety
        self._lock = lock
        self._pending = pending
        self._check_session = check_session
        self._committed = committed  # loaded on first use: listing snapshots needs no index
        self._committed_at = clock.monotonic()
        self._refresh_lock = threading.Lock()  # one reload at a time (never held by the writer)
        self._referenced: set[bytes] = set()  # ids this client wrote or deduplicated against
        # what this client published, with when and in which index blob: kept on top of reloaded
        # indexes until a listing is sure to show it (listing_settle), so a lagging listing never
        # hides our own entries; dropped as soon as a reload assembled the blob itself
        self._committed_overlay: list[tuple[float, str, list[IndexEntry]]] = []
        self.revalidated_at = float("-inf")

    @property
    def committed(self) -> MergedIndex:
        if self._committed is None:
            with self._refresh_lock:
                if self._committed is None:
                    self._reload()
        return self._committed

    @committed.setter
    def committed(self, index: MergedIndex) -> None:
        self._committed = index

    def loaded(self) -> MergedIndex | None:
        """The committed index as last loaded (with what this client published since), or None
        if it never was: nothing is loaded here."""
        return self._committed

    def current(self) -> MergedIndex:
        """The committed index, reloaded once it is ``index_refresh`` old so that deletions made
        by maintenance are seen before this writer deduplicates against them (gc/README.md)."""
        due = clock.monotonic() - self._committed_at >= self.safety.index_refresh
        if due and self._refresh_lock.acquire(blocking=False):
            try:
                fresh = self._reload()
                self._undelete_referenced(fresh)
            finally:
                self._refresh_lock.release()
        return self.committed

    def lookup(self, content_id: bytes) -> IndexEntry | None:
        with self._lock:
            e = self._pending.get(content_id)
        return e if e is not None else self.current().lookup(content_id)

    def locations(self, content_id: bytes) -> list[IndexEntry]:
        return self.current().locations(content_id)

    def contains(self, content_id: bytes) -> bool:
        """True if the content is stored (or pending) and not marked deleted."""
        with self._lock:
            if content_id in self._pending:
                return True
        e = self.current().lookup(content_id)
        return e is not None and not e.deleted

    def contains_many(self, content_ids: list[bytes]) -> list[bool]:
        """``contains`` for many ids at once (``MergedIndex.live_many``)."""
        with self._lock:
            pending = [c in self._pending for c in content_ids]
        rest = [c for c, p in zip(content_ids, pending) if not p]
        live = iter(self.current().live_many(rest))
        return [True if p else next(live) for p in pending]

    # ---- what the writer tells the view ---------------------------------------------------
    def note_reference(self, content_id: bytes) -> None:
        """Record that what is about to be published refers to this content (reused files)."""
        with self._lock:
            self.add_reference_locked(content_id)

    def note_references(self, content_ids: Iterable[bytes]) -> None:
        with self._lock:
            self._referenced.update(content_ids)

    def forget_references(self) -> None:
        """What this client referred to is published (a part of a sharded backup, in its own
        checkpoint): from here on it is protected as every published tree is, as if this
        client had ended, and later revalidations need not check it again."""
        with self._lock:
            self._referenced.clear()

    def add_reference_locked(self, content_id: bytes) -> None:
        """``note_reference`` for a caller that holds the shared lock."""
        self._referenced.add(content_id)

    def note_published_locked(self, entries: Iterable[IndexEntry], blob: str) -> None:
        """The writer published these in the index blob ``blob`` (shared lock held). Before the
        first load there is nothing to add them to (the load lists them, and the overlay has
        them): the ``committed`` property would load here, under the lock a reload takes."""
        entries = list(entries)
        if self._committed is not None:
            self._committed.add_entries(entries)
        self._committed_overlay.append((clock.monotonic(), blob, entries))

    # ---- reloading ------------------------------------------------------------------------
    def refresh_index(self) -> MergedIndex:
        """Load the committed index afresh now (undeleting what this client refers to, as every
        reload does, gc/README.md writer rule 5); returns it."""
        with self._refresh_lock:
            fresh = self._reload()
            self._undelete_referenced(fresh)
        return fresh

    def revalidate(self) -> int:
        """Before publishing: make sure every content this client wrote or deduplicated against
        is still in the index and live. Deleted ones (maintenance marked them while this backup
        ran) are undeleted; a missing one raises ``ContentLost`` so nothing refers to it.
        Returns the number undeleted."""
        self._check_session()  # our own packs are only safe while our session (if started) is live
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

    def _reload(self) -> MergedIndex:
        """Swap in a freshly assembled index, plus what we published too recently to be surely
        listed; in one critical section with the writer's publish (the shared lock), so no
        published entry falls between."""
        started = clock.monotonic()
        fresh = self.epochs.load_index()
        with self._lock:
            settled = started - self.safety.listing_settle
            assembled = set(fresh.names or ())  # blobs whose entries the fresh index holds itself
            self._committed_overlay = [(t, blob, es) for t, blob, es in self._committed_overlay
                                       if t >= settled and blob not in assembled]
            for _, _, es in self._committed_overlay:
                fresh.add_entries(es)
            self._committed = fresh
            self._committed_at = clock.monotonic()
        return fresh

    def _undelete_referenced(self, index: MergedIndex, raise_lost: bool = False) -> int:
        """Undelete what this client refers to and maintenance marked deleted meanwhile (every
        index refresh does this, so a live backup's references outlast the drop margin). Ids
        still pending in the writer are in no index yet: they are neither lost nor undeleted."""
        with self._lock:
            refs = [c for c in self._referenced if c not in self._pending]
        undelete, lost = [], []
        for cid, live in zip(refs, index.live_many(refs)):
            if live:
                continue
            e = index.lookup_exact(cid)
            if e is None:
                lost.append(cid)
            elif e.deleted:
                undelete.append(replace(e, deleted=False, timestamp_us=stamp_after(e.timestamp_us)))
        if lost and raise_lost:
            raise ContentLost(f"{len(lost)} content(s) this backup refers to were removed by maintenance "
                              f"while it ran (first: {lost[0].hex()}); nothing was published, run it again")
        refresh = self.safety.index_refresh
        if undelete and refresh > 0 and clock.monotonic() - self._committed_at >= refresh:
            # paused since the load: undeletes come from a view at most index_refresh old (two-phase
            # blob GC counts on it, gc/README.md), so decide again from a fresh one
            return self._undelete_referenced(self._reload(), raise_lost)
        if undelete:
            blob = self.epochs.write_index(undelete)
            with self._lock:
                index.add_entries(undelete)
                self._committed_overlay.append((clock.monotonic(), blob, undelete))
        return len(undelete)
