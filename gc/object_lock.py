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
from repo_format.storage.base import BlobMeta, BlobStorage, Retention

log = logging.getLogger(__name__)
NEVER_EXTENDED = (C.SESSION_PREFIX, C.PROBE_PREFIX)
MISSING = ("the repository was created with Object Lock, but its bucket has no default retention now (or "
           "these credentials may not read it: s3:GetBucketObjectLockConfiguration); nothing was extended")


def plan_extensions(listing: list[BlobMeta], now: float, retention: Retention, garbage: set[str]) -> list[BlobMeta]:
    """The blobs of ``listing`` whose lock from their put ends within half a period of ``now``
    (those younger are locked long enough as they are), less ``garbage`` and the short-lived."""
    renew_before = now + retention.seconds / 2
    return [m for m in listing if m.timestamp + retention.seconds < renew_before
            and m.name not in garbage and not m.name.startswith(NEVER_EXTENDED)]


def extend_locks(storage: BlobStorage, now: float, garbage: set[str], expected: dict | None = None) -> dict:
    """Extend the locks of what maintenance keeps (see the module docstring); ``{}`` without
    Object Lock. ``expected``: what ``repo create`` asked for (the format blob's ``object_lock``)."""
    retention = storage.retention()
    if retention is None:
        if expected:
            log.warning(MISSING)
            return {"warning": MISSING}
        return {}
    todo = plan_extensions(list(storage.list()), now, retention, garbage)
    until = now + retention.seconds
    for m in todo:
        storage.extend_retention(m.name, until)
    return {"mode": retention.mode, "days": retention.seconds / 86400, "extended": len(todo), "until": until}
