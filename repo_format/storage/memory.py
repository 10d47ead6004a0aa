"""In-memory blob storage, for tests and the deterministic simulator.

Timestamps come from the ``clock`` callable it is given: the simulator passes the storage's
virtual clock, which is the only clock safety margins are measured on.

With ``retention`` it behaves as an S3 bucket with Object Lock and that default retention: every
put locks the blob for ``retention.seconds`` on the clock, a delete before then raises
``BlobLocked``, and ``extend_retention`` only lengthens. (S3 keeps the replaced version of a
locked blob put again; this keeps only the newest, which kdist never relies on.)
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

from repo_format import clock as clock_module
from repo_format.errors import BlobLocked, BlobNotFound
from repo_format.storage.base import BlobMeta, BlobStorage, Retention, check_range, validate_name, validate_prefix


class MemoryStorage(BlobStorage):
    atomic_create_only = True
    shared_between_processes = False  # a forked child's writes would land in its own copy

    def __init__(self, clock: Callable[[], float] | None = None, retention: Retention | None = None):
        self._clock = clock or clock_module.now
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._retention = retention
        self._locked_until: dict[str, float] = {}

    def _store(self, name: str, blob: bytes) -> None:
        now = self._clock()
        self._blobs[name] = (blob, now)
        if self._retention is not None:
            self._locked_until[name] = max(self._locked_until.get(name, now), now + self._retention.seconds)

    def put(self, name, data) -> None:
        validate_name(name)
        blob = bytes(data)
        with self._lock:
            self._store(name, blob)

    def put_if_absent(self, name, data) -> bool:
        validate_name(name)
        blob = bytes(data)
        with self._lock:
            if name in self._blobs:
                return False
            self._store(name, blob)
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
            until = self._locked_until.get(name, 0.0)
            if name in self._blobs and until >= self._clock():  # as S3: locked until the instant passes
                raise BlobLocked(name, until)
            self._blobs.pop(name, None)
            self._locked_until.pop(name, None)

    def retention(self) -> Retention | None:
        return self._retention

    def extend_retention(self, name, until) -> None:
        validate_name(name)
        if self._retention is None:
            super().extend_retention(name, until)
        with self._lock:
            if name not in self._blobs:
                raise BlobNotFound(name)
            self._locked_until[name] = max(self._locked_until[name], until)

    def locked_until(self, name: str) -> float:
        """When ``name``'s retention ends (0: not locked); for tests and the simulator."""
        with self._lock:
            return self._locked_until.get(name, 0.0)

    def describe(self) -> str:
        return "memory"
