"""In-memory blob storage, for tests and the deterministic simulator.

Timestamps come from the ``clock`` callable it is given: the simulator passes the storage's
virtual clock, which is the only clock safety margins are measured on.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

from repo_format import clock as clock_module
from repo_format.errors import BlobNotFound
from repo_format.storage.base import BlobMeta, BlobStorage, check_range, validate_name, validate_prefix


class MemoryStorage(BlobStorage):
    atomic_create_only = True
    shared_between_processes = False  # a forked child's writes would land in its own copy

    def __init__(self, clock: Callable[[], float] | None = None):
        self._clock = clock or clock_module.now
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put(self, name, data) -> None:
        validate_name(name)
        blob = bytes(data)
        with self._lock:
            self._blobs[name] = (blob, self._clock())

    def put_if_absent(self, name, data) -> bool:
        validate_name(name)
        blob = bytes(data)
        with self._lock:
            if name in self._blobs:
                return False
            self._blobs[name] = (blob, self._clock())
            return True

    def get(self, name, offset=0, length=-1) -> bytes:
        validate_name(name)
        check_range(offset, length)
        with self._lock:
            entry = self._blobs.get(name)
        if entry is None:
            raise BlobNotFound(name)
        data = entry[0]
        end = len(data) if length < 0 else offset + length
        return data[offset:end]

    def stat(self, name) -> BlobMeta:
        validate_name(name)
        with self._lock:
            entry = self._blobs.get(name)
        if entry is None:
            raise BlobNotFound(name)
        return BlobMeta(name, len(entry[0]), entry[1])

    def list(self, prefix="") -> Iterator[BlobMeta]:
        validate_prefix(prefix)
        with self._lock:
            snapshot = [(n, len(d), t) for n, (d, t) in self._blobs.items() if n.startswith(prefix)]
        for name, length, ts in snapshot:
            yield BlobMeta(name, length, ts)

    def delete(self, name) -> None:
        validate_name(name)
        with self._lock:
            self._blobs.pop(name, None)

    def describe(self) -> str:
        return "memory"
