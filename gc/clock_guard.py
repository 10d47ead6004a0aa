"""The maintenance run's view of time: the storage's clock, and pause detection.

Every age is measured against ``now`` read from the storage (a probe blob's timestamp). Before
each batch of deletions ``check`` reads the storage clock again: if more than ``max_pause``
passed since the plan was made (a laptop slept, a VM was stopped, the process was SIGSTOPped;
a monotonic clock would not see a suspend), the run aborts instead of acting on a stale plan.
"""

from __future__ import annotations

from repo_format.errors import KdistError
from repo_format.session import storage_now
from repo_format.storage.base import BlobStorage


class PlanExpired(KdistError):
    """The run paused longer than allowed between planning and deleting; nothing was deleted."""


class StorageClock:
    def __init__(self, storage: BlobStorage, session: str, max_pause: float, enabled: bool = True):
        self.storage = storage
        self.session = session
        self.max_pause = max_pause
        self.enabled = enabled  # the pause check is a safety rule the simulator can switch off
        self.start = self.now()

    def now(self) -> float:
        return storage_now(self.storage, self.session)

    def check(self, planned_at: float, what: str) -> float:
        """Storage time now; raise ``PlanExpired`` if the plan made at ``planned_at`` is too old."""
        t = self.now()
        if self.enabled and t - planned_at > self.max_pause:
            raise PlanExpired(
                f"maintenance paused for {t - planned_at:.0f} s (more than {self.max_pause:.0f} s) "
                f"between planning and {what}; nothing more was deleted, the next run plans afresh"
            )
        return t
