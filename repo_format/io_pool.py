"""One shared thread pool for parallel blob reads (index and manifest blobs).

Creating a pool per read costs more than small reads take. Tasks given to it must be leaves:
a task never waits on another task of this pool, so it cannot deadlock.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, in parallel for more than a handful of items; order kept."""
    items = list(items)
    if len(items) <= 8:
        return [fn(x) for x in items]
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kdist-io")
    try:
        futures = [_pool.submit(fn, x) for x in items]
    except RuntimeError:  # the interpreter is exiting and its pools take no more work: a daemon
        return [fn(x) for x in items]  # thread still reading (a session's heartbeat) reads alone
    return [f.result() for f in futures]


def _forget_after_fork() -> None:
    """A forked child has none of the pool's threads: it makes a pool of its own if it needs one."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
