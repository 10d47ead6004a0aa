"""A one-line progress display on stderr: files, bytes, rate, ETA. Silent unless stderr is a terminal."""

from __future__ import annotations

import sys
import threading

from repo_format import clock


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressLine:
    def __init__(self, total_bytes: int | None = None, enabled: bool | None = None, interval: float = 0.25):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total_bytes
        self._start = clock.monotonic()
        self._last = 0.0
        self._interval = interval
        self._lock = threading.Lock()
        self._shown = False

    def update(self, files: int, done_bytes: int, label: str = "") -> None:
        if not self.enabled:
            return
        t = clock.monotonic()
        with self._lock:
            if t - self._last < self._interval:
                return
            self._last = t
        rate = done_bytes / max(t - self._start, 1e-6)
        line = f"{label}{files} files, {human_bytes(done_bytes)}, {human_bytes(rate)}/s"
        if self.total and rate > 0:
            line += f", ETA {max(0, (self.total - done_bytes) / rate):.0f} s"
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False
