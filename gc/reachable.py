"""What the snapshots reach, as 64-bit keys in sorted runs on disk: the mark side of content GC
in bounded memory.

Each content id a walk yields goes into a buffer as its key (the first 8 bytes, as the index
sorts them); a full buffer is sorted, deduplicated and written as a run file. A key range is then
read back from every run by binary search. Deciding reachability by key is conservative: two ids
sharing a key (about N^2 / 2^65 pairs) make the unreached one count as reached, which keeps a
garbage content (it is neither marked nor, if marked, left marked). Nothing reached is ever
taken for unreached.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

import numpy as np

KEY_BYTES = 8


class ReachableKeys:
    """Add content ids; then ``between(lo, hi)`` gives the sorted distinct keys in ``[lo, hi)``.
    ``buffer_bytes`` bounds the memory held before a run is written (``spill_dir``: where)."""

    def __init__(self, buffer_bytes: int = 64 * 2**20, spill_dir: str | None = None):
        self._limit = max(KEY_BYTES, buffer_bytes // 2)  # the sort of a full buffer holds two copies
        self._buffer = bytearray()
        self._dir = tempfile.TemporaryDirectory(prefix="kdist-gc-reach-", dir=spill_dir)
        self._runs: list[np.ndarray] = []
        self.added = 0

    def add(self, cid: bytes) -> None:
        self._buffer += cid[:KEY_BYTES]
        self.added += 1
        if len(self._buffer) >= self._limit:
            self._spill()

    def add_keys(self, keys: np.ndarray) -> None:
        """Keys another process collected (sorted or not), as a run of their own."""
        self._spill()
        keys = np.unique(np.asarray(keys, dtype=np.uint64))
        self.added += len(keys)
        if len(keys):
            self._write_run(keys)

    def update(self, cids: Iterable[bytes]) -> None:
        for c in cids:
            self.add(c)

    def _spill(self) -> None:
        if not self._buffer:
            return
        keys = np.unique(np.frombuffer(self._buffer, dtype=">u8").astype(np.uint64))
        self._buffer = bytearray()
        self._write_run(keys)

    def _write_run(self, keys: np.ndarray) -> None:
        path = os.path.join(self._dir.name, f"run{len(self._runs)}.npy")
        np.save(path, keys)
        self._runs.append(np.load(path, mmap_mode="r"))

    @property
    def runs(self) -> int:
        return len(self._runs)

    def between(self, lo: int, hi: int) -> np.ndarray:
        self._spill()
        parts = []
        for run in self._runs:
            a = int(run.searchsorted(np.uint64(lo), "left"))
            z = len(run) if hi >= 2**64 else int(run.searchsorted(np.uint64(hi), "left"))
            parts.append(np.asarray(run[a:z]))
        if not parts:
            return np.zeros(0, np.uint64)
        return np.unique(np.concatenate(parts)) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        self._runs = []
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
