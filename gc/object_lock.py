"""Object Lock upkeep: keep what maintenance keeps locked, let go of what it collects.

On a bucket with Object Lock (``storage.retention()``) the storage locks every blob at its put for
the retention period, on its own clock; deletes of locked blobs are refused (``BlobLocked``) and
every step leaves such a blob for a later run, as if it had stopped before that delete. This step,
at the end of a full run, extends the retention of every listed blob older than half the period
to ``now`` + the period, except:

* what this run found to be garbage: the blobs it planned to delete (whether or not the lock let
  it), the unreferenced packs it recorded as candidates, the manifest blobs a compacted one
  covers, the slots of removed keys. Were they extended they would never come free; instead they
  unlock at most one period after their last extension and a later run deletes them;
* session markers and probe blobs, which matter for hours, not days.

Deletes go through ``Deletions``: a blob known to be locked (put less than a period ago, or
refused by an earlier run until a time the history recorded) is skipped without a request, so
locked garbage costs no request a run until it comes free.

A blob maintenance keeps is therefore locked at every moment, provided a full run succeeds at
least once every half period: a blob is locked for the period from its put, and each run leaves
it locked for a full period from that run. Packs an earlier run found unreferenced but which a
writer referenced again (an undelete) are extended by the first run that sees them referenced.
Requests: one retention put per blob older than half the period, per full run (as kopia's
"extend object locks" does for every blob).
"""

from __future__ import annotations

import logging

from repo_format import constants as C
from repo_format.errors import BlobLocked, BlobNotFound
from repo_format.io_pool import parallel_map
from repo_format.storage.base import BlobMeta, BlobStorage, Retention

log = logging.getLogger(__name__)
NEVER_EXTENDED = (C.SESSION_PREFIX, C.PROBE_PREFIX)


class Deletions:
    """Maintenance's deletes, on a storage that may have Object Lock. A blob known to be locked
    still is skipped without a request: by its put (the bucket's retention counts from it) or by
    a lock end an earlier run learnt (``known``, from the history). Otherwise the storage is
    asked, and a refusal (``BlobLocked``) is recorded. Either way the delete is left for a
    later run, as if this one had stopped before it. ``now``: the run's start (storage clock)."""

    def __init__(self, storage: BlobStorage, now: float, known: dict[str, float] | None = None):
        self.storage = storage
        self.now = now
        self.retention = storage.retention()
        self.known = known or {}
        self.locked: dict[str, float] = {}  # refused or skipped in this run: name -> lock end
        self.refused: dict[str, float] = {}  # what the history keeps: refusals its put time does not explain

    def __call__(self, name: str, written_at: float | None = None) -> bool:
        """Delete ``name`` (put at ``written_at``, storage clock, if known); False if locked."""
        until = self.known.get(name, 0.0)
        if self.retention is not None and written_at is not None:
            until = max(until, written_at + self.retention.seconds)
        if until > self.now:
            self.locked[name] = until
            return False
        try:
            self.storage.delete(name)
            return True
        except BlobLocked as locked:
            self.locked[name] = locked.until
            if locked.until > until and not name.startswith(NEVER_EXTENDED):  # extended while it was kept
                self.refused[name] = locked.until
            return False

    def record(self) -> list:
        """For the run's history: the refusals a later run cannot tell from a blob's put time
        (blobs extended while maintenance kept them), so that it skips them without asking."""
        return [[n, float(u)] for n, u in sorted(self.refused.items())]


def plan_extensions(listing: list[BlobMeta], now: float, retention: Retention, garbage: set[str]) -> list[BlobMeta]:
    """The blobs of ``listing`` whose lock from their put ends within half a period of ``now``
    (those younger are locked long enough as they are), less ``garbage`` and the short-lived."""
    renew_before = now + retention.seconds / 2
    return [m for m in listing if m.timestamp + retention.seconds < renew_before
            and m.name not in garbage and not m.name.startswith(NEVER_EXTENDED)]


def extend_locks(storage: BlobStorage, now: float, garbage: set[str]) -> dict:
    """Extend the locks of what maintenance keeps (see the module docstring), in parallel; ``{}``
    without Object Lock. A blob deleted since the listing (by a concurrent run) is skipped."""
    retention = storage.retention()
    if retention is None:
        return {}
    todo = plan_extensions(list(storage.list()), now, retention, garbage)
    until = now + retention.seconds

    def extend(m: BlobMeta) -> int:
        try:
            storage.extend_retention(m.name, until)
            return 1
        except BlobNotFound:
            return 0

    extended = sum(parallel_map(extend, todo))
    return {"mode": retention.mode, "days": retention.seconds / 86400, "extended": extended, "until": until}


def missing_lock(storage: BlobStorage, expected: dict | None) -> str | None:
    """Why maintenance must not run: the repository asks for Object Lock (``expected``, the
    format blob's ``object_lock``) and the bucket has none it can see. Its deletes would then be
    plain DELETEs, delete markers over locked data; nothing would be extended."""
    if expected and storage.retention() is None:
        return ("this repository was created with Object Lock, but its bucket has no default retention now, "
                "or these credentials may not read it (s3:GetBucketObjectLockConfiguration): maintenance "
                "refuses to run until it can see the lock")
    return None
