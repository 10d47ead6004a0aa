"""The C allocator's setting for kdist processes (CLI, Ray workers, driver).

glibc serves a large allocation from a thread's heap arena once it has freed one that large
(its mmap threshold rises with each free, up to 32 MiB), and arenas seldom give memory back.
Index blobs of 10-30 MiB, downloaded and decoded by many threads at once, then leave hundreds
of MiB resident after they were freed: measured at 5 million contents, a cold-cache backup peaked
at 484 MiB of anonymous memory with the default and 119 MiB with the threshold fixed at 8 MiB.
8 MiB is above the largest chunk (4 MiB) and its compressed and sealed copies, so the data
path keeps reusing arena memory (a fresh mapping costs a page fault per 4 KiB).
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 8 * 1024 * 1024
_done = False


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (once per process); False where there is no glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc's where there is one
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return _done
