"""Reading a set of blobs that maintenance may be changing meanwhile.

A reader lists the manifest or index blobs, then reads them; a compaction that finishes in
between deletes blobs it listed (their records are in the replacement it lists next time). The
reader lists again. Back-to-back attempts can lose the race again while maintenance works through
many blobs, so attempts are spaced by exponential backoff with jitter (``clock.sleep``: the
simulator takes no real time), and when the set keeps changing through all of them the reader
raises ``ConcurrentChange``: a documented, retryable outcome (exit 21), never an unexpected error.
"""

from __future__ import annotations

import random
from typing import Iterator

from repo_format import clock
from repo_format.errors import ConcurrentChange

ATTEMPTS = 8
BASE_DELAY = 0.25  # seconds before the second attempt (times 2 each time, capped)
MAX_DELAY = 8.0  # the seven waits add up to 12-24 s: longer than a compaction's deletions


def attempts(what: str, count: int = ATTEMPTS, rng: random.Random | None = None) -> Iterator[int]:
    """``for _ in attempts("the manifests"): ... return`` : yields attempt numbers, waiting
    between two; after the last, raises ``ConcurrentChange`` naming ``what``."""
    rng = rng or random
    for i in range(count):
        if i:
            cap = min(MAX_DELAY, BASE_DELAY * 2 ** (i - 1))
            clock.sleep(rng.uniform(cap / 2, cap))  # jitter: readers that lost together spread out
        yield i
    raise ConcurrentChange(f"{what} kept changing while they were being read ({count} attempts): maintenance was "
                           "probably compacting them; nothing is wrong, run the command again")
