"""Process settings for kdist processes (CLI, Ray workers, driver): the C allocator's mmap
threshold, and the open-file limit.

Each index blob the local cache maps holds an open file descriptor (Python's mmap keeps a
duplicate before 3.13), so a large repository's index needs more than the usual soft limit of
1,024 descriptors: the soft limit is raised to the hard one.

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


def tune_process() -> None:
    """Both settings, once per process; neither can fail a run."""
    fix_mmap_threshold()
    raise_open_file_limit()


def raise_open_file_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                                                        hard))
    except (ImportError, ValueError, OSError):
        pass


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
