"""The one clock of kdist.

Only this module reads the system's wall clock. Everything else asks ``now()``, so tests and the
deterministic simulator can replace time with ``set_clock``. Safety-critical ages are measured on
the *storage's* clock (blob timestamps), never on this one; this clock is for naming, reporting and
the intervals at which a client does things (checkpoints, heartbeats).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

_lock = threading.Lock()
_clock: Callable[[], float] = time.time


def now() -> float:
    """Seconds since the Unix epoch on the current clock."""
    return _clock()


def _boottime() -> float:
    """Monotonic time that keeps counting while the machine is suspended (Linux CLOCK_BOOTTIME);
    a laptop asleep for a day must see a day pass, or its leases would look fresh."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_SYSTEM_MONOTONIC: Callable[[], float] = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
_monotonic: Callable[[], float] = _SYSTEM_MONOTONIC


def monotonic() -> float:
    """A monotonic reading for measuring durations (replaceable by the simulator's virtual time)."""
    return _monotonic()


def set_monotonic(source: Callable[[], float] | None) -> None:
    """Replace the monotonic source (``None`` restores it). For the simulator only."""
    global _monotonic
    with _lock:
        _monotonic = source if source is not None else _SYSTEM_MONOTONIC


def set_clock(clock: Callable[[], float] | None) -> None:
    """Replace the clock (``None`` restores the system clock). For tests and the simulator."""
    global _clock
    with _lock:
        _clock = clock if clock is not None else time.time


_sleep: Callable[[float], None] = time.sleep


def sleep(seconds: float) -> None:
    """Wait (a backoff between two attempts); the simulator makes it return at once."""
    _sleep(seconds)


def set_sleep(fn: Callable[[float], None] | None) -> None:
    """Replace ``sleep`` (``None`` restores ``time.sleep``). For tests and the simulator."""
    global _sleep
    with _lock:
        _sleep = fn if fn is not None else time.sleep


class ManualClock:
    """A clock that only moves when told to; use with ``set_clock``."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def system_time() -> float:
    """The system's wall clock, whatever ``set_clock`` says: for comparing with the timestamps of
    local files (the local cache's ages), which the file system stamps with this clock."""
    return time.time()
