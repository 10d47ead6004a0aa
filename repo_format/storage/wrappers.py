"""Behaviour layered on any blob storage: retries, read-only access, request counting, faults.

Each wrapper is itself a ``BlobStorage`` around an ``inner`` one, so they stack
(``CountingStorage(RetryingStorage(S3Storage(...)))``) and each passes the conformance suite.
None of them knows which backend it wraps.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Iterator

from repo_format import errors
from repo_format.errors import RetryableStorageError
from repo_format.storage.base import BlobMeta, BlobStorage

KINDS = ("PUT", "GET", "LIST", "DELETE", "STAT")


class StorageWrapper(BlobStorage):
    """Forwards every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: BlobStorage):
        self.inner = inner
        self.atomic_create_only = inner.atomic_create_only
        self.shared_between_processes = inner.shared_between_processes

    def after_fork(self) -> None:
        if hasattr(self, "_lock"):
            self._lock = threading.Lock()
        self.inner.after_fork()

    def put(self, name, data) -> None:
        self.inner.put(name, data)

    def put_if_absent(self, name, data) -> bool:
        return self.inner.put_if_absent(name, data)

    def get(self, name, offset=0, length=-1) -> bytes:
        return self.inner.get(name, offset, length)

    def stat(self, name) -> BlobMeta:
        return self.inner.stat(name)

    def list(self, prefix="") -> Iterator[BlobMeta]:
        return self.inner.list(prefix)

    def delete(self, name) -> None:
        self.inner.delete(name)

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        return self.inner.reclaim_leftovers(now, older_than)

    def retention(self):
        return self.inner.retention()

    def extend_retention(self, name, until) -> None:
        self.inner.extend_retention(name, until)

    def configure_retention(self, days, mode) -> None:
        self.inner.configure_retention(days, mode)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()


class RetryingStorage(StorageWrapper):
    """Retries ``RetryableStorageError`` with exponential backoff and full jitter.

    After ``attempts`` failures the last error is raised. Other errors (``BlobNotFound``,
    ``StorageUnreachable``, ...) are never retried. A listing that fails part-way is restarted
    and skips the names it has already yielded. When a ``put_if_absent`` attempt fails and a
    later one finds the name taken by a blob holding exactly the same bytes, that blob is taken
    to be our own write whose reply was lost, and the call returns True.
    """

    def __init__(self, inner: BlobStorage, attempts: int = 5, base_delay: float = 0.1, max_delay: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 deadline: float | None = None):
        super().__init__(inner)
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        # seconds one call may spend waiting: on answers that never came (the timeouts of its
        # attempts, ``RetryableStorageError.stalled``) and between attempts; moving data costs
        # nothing here (a slow link's long upload is retried), only the attempt count bounds that
        self.deadline = deadline
        self._sleep = sleep
        self._rng = rng or random.Random()

    def _backoff(self, failures: int, waited: float, exc: RetryableStorageError) -> float:
        """Wait before attempt ``failures + 1`` and return the call's waiting so far; give up
        (``StorageUnreachable``) instead when that would pass the deadline."""
        delay = self._rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (failures - 1)))
        if self.deadline is not None and waited + delay > self.deadline:
            raise errors.StorageUnreachable(
                f"{exc} (gave up after {failures} attempt(s) and {waited:.0f} s without an answer: a storage request "
                f"may wait {self.deadline:g} s, --request-timeout or KDIST_REQUEST_TIMEOUT)") from exc
        self._sleep(delay)
        return waited + delay

    def _retry(self, call: Callable[[], object]):
        waited = 0.0
        for failures in range(1, self.attempts + 1):
            try:
                return call()
            except RetryableStorageError as exc:
                waited += exc.stalled
                if failures == self.attempts:
                    raise
                waited = self._backoff(failures, waited, exc)

    def put(self, name, data) -> None:
        self._retry(lambda: self.inner.put(name, data))

    def put_if_absent(self, name, data) -> bool:
        first = True

        def attempt() -> bool:
            nonlocal first
            retried, first = not first, False
            if self.inner.put_if_absent(name, data):
                return True
            # after a failed attempt the blob may be our own write whose reply was lost
            return retried and self.inner.get(name) == bytes(data)

        return self._retry(attempt)

    def get(self, name, offset=0, length=-1) -> bytes:
        return self._retry(lambda: self.inner.get(name, offset, length))

    def stat(self, name) -> BlobMeta:
        return self._retry(lambda: self.inner.stat(name))

    def delete(self, name) -> None:
        self._retry(lambda: self.inner.delete(name))

    def retention(self):
        return self._retry(self.inner.retention)

    def extend_retention(self, name, until) -> None:
        self._retry(lambda: self.inner.extend_retention(name, until))

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        # a failed attempt may have reclaimed some: its counts are lost, its removals are not
        return self._retry(lambda: self.inner.reclaim_leftovers(now, older_than))

    def list(self, prefix="") -> Iterator[BlobMeta]:
        seen: set[str] = set()
        waited = 0.0
        for failures in range(1, self.attempts + 1):
            try:
                for meta in self.inner.list(prefix):
                    if meta.name not in seen:
                        seen.add(meta.name)
                        yield meta
                return
            except RetryableStorageError as exc:
                waited += exc.stalled
                if failures == self.attempts:
                    raise
                waited = self._backoff(failures, waited, exc)


class ReadOnlyStorage(StorageWrapper):
    """Refuses every put, delete and reclaim with ``errors.ReadOnlyStorage``; reads pass through."""

    def _refuse(self, what: str, name: str):
        raise errors.ReadOnlyStorage(f"cannot {what} blob {name!r}: {self.describe()} is opened read-only")

    def put(self, name, data) -> None:
        self._refuse("write", name)

    def put_if_absent(self, name, data) -> bool:
        self._refuse("write", name)

    def delete(self, name) -> None:
        self._refuse("delete", name)

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        raise errors.ReadOnlyStorage(f"cannot reclaim leftovers: {self.describe()} is opened read-only")

    def extend_retention(self, name, until) -> None:
        self._refuse("extend the retention of", name)


class AppendOnlyStorage(StorageWrapper):
    """Only adds blobs: every put is create-only (``put_if_absent``; a taken name raises
    ``errors.AppendOnlyViolation``), and deletes and reclaims are refused.

    The backup path runs through it whatever key it holds (it never needs to delete or replace
    anything), so a bug that would delete is an error here before storage policy (no
    ``s3:DeleteObject``, ``s3:if-none-match`` on puts, Object Lock) refuses it there.
    """

    def _refuse(self, what: str, name: str):
        raise errors.AppendOnlyViolation(f"cannot {what} blob {name!r}: this client may only add blobs to "
                                         f"{self.describe()} (append-only)")

    def put(self, name, data) -> None:
        if not self.inner.put_if_absent(name, data):
            self._refuse("replace", name)

    def delete(self, name) -> None:
        self._refuse("delete", name)

    def extend_retention(self, name, until) -> None:
        self._refuse("extend the retention of", name)  # hosts could keep garbage locked for ever

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        raise errors.AppendOnlyViolation(f"cannot reclaim leftovers: this client may only add blobs to "
                                         f"{self.describe()} (append-only)")


def append_only(storage: BlobStorage) -> BlobStorage:
    """``storage`` behind an ``AppendOnlyStorage``, unless it already is one."""
    s = storage
    while isinstance(s, StorageWrapper):
        if isinstance(s, AppendOnlyStorage):
            return storage
        s = s.inner
    return AppendOnlyStorage(storage)


class CountingStorage(StorageWrapper):
    """Counts calls and bytes per kind of request (PUT, GET, LIST, DELETE, STAT); thread-safe.

    Every call counts, failed ones too. Bytes are those handed to a put or returned by a get
    that completed; a listing counts one call and no bytes. ``reclaim_leftovers`` passes through
    uncounted: the requests it makes inside the backend are not seen here.
    """

    def __init__(self, inner: BlobStorage):
        super().__init__(inner)
        self._lock = threading.Lock()
        self.reset()

    def after_fork(self) -> None:
        super().after_fork()
        self.reset()  # a child counts its own requests; the parent adds them up

    def reset(self) -> None:
        with self._lock:
            self._counts = {kind: {"calls": 0, "bytes": 0} for kind in KINDS}

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {kind: dict(c) for kind, c in self._counts.items()}

    def absorb(self, counts: dict[str, dict[str, int]]) -> None:
        """Add requests made elsewhere on this client's behalf (a multi-process backup's children)."""
        for kind, c in counts.items():
            self._add(kind, c.get("calls", 0), c.get("bytes", 0))

    def _add(self, kind: str, calls: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[kind]["calls"] += calls
            self._counts[kind]["bytes"] += nbytes

    def put(self, name, data) -> None:
        self._add("PUT", calls=1)
        self.inner.put(name, data)
        self._add("PUT", nbytes=memoryview(data).nbytes)

    def put_if_absent(self, name, data) -> bool:
        self._add("PUT", calls=1)
        created = self.inner.put_if_absent(name, data)
        self._add("PUT", nbytes=memoryview(data).nbytes)
        return created

    def get(self, name, offset=0, length=-1) -> bytes:
        self._add("GET", calls=1)
        data = self.inner.get(name, offset, length)
        self._add("GET", nbytes=len(data))
        return data

    def stat(self, name) -> BlobMeta:
        self._add("STAT", calls=1)
        return self.inner.stat(name)

    def list(self, prefix="") -> Iterator[BlobMeta]:
        self._add("LIST", calls=1)
        return self.inner.list(prefix)

    def delete(self, name) -> None:
        self._add("DELETE", calls=1)
        self.inner.delete(name)

    def extend_retention(self, name, until) -> None:
        self._add("PUT", calls=1)  # S3 PutObjectRetention
        self.inner.extend_retention(name, until)


def _injected(kind: str, number: int) -> Exception:
    return RetryableStorageError(f"injected failure of {kind} call {number}")


class FaultInjectingStorage(StorageWrapper):
    """Makes chosen calls fail, for tests.

    A call fails if its 1-based number within its kind is in ``fail_on_call[kind]`` (kinds as in
    ``KINDS``), or with probability ``fail_probability``. A failing call raises
    ``error_factory(kind, number)`` without reaching ``inner``, except a failing PUT when
    ``truncate_writes`` is set: it first stores the first ``truncate_writes`` bytes (``True``: half)
    as a visible, damaged blob, the way a non-atomic store can leave one, then raises.
    ``reclaim_leftovers`` passes through, never failed and not counted.
    """

    def __init__(self, inner: BlobStorage, fail_on_call: dict[str, set[int]] | None = None,
                 fail_probability: float = 0.0, rng: random.Random | None = None,
                 truncate_writes: bool | int = False,
                 error_factory: Callable[[str, int], Exception] = _injected):
        super().__init__(inner)
        self.fail_on_call = {kind: set(numbers) for kind, numbers in (fail_on_call or {}).items()}
        unknown = set(self.fail_on_call) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown call kinds {sorted(unknown)}; use {KINDS}")
        if truncate_writes is not False and not (self.fail_on_call.get("PUT") or fail_probability):
            raise ValueError("truncate_writes applies to failing PUTs: set fail_on_call['PUT'] or fail_probability")
        self.fail_probability = fail_probability
        self.truncate_writes = truncate_writes
        self._rng = rng or random.Random(0)
        self._error_factory = error_factory
        self._lock = threading.Lock()
        self.calls = {kind: 0 for kind in KINDS}
        self.injected: list[tuple[str, int]] = []  # (kind, number) of each failure injected

    def _should_fail(self, kind: str) -> int:
        """Count the call; return its number if it is to fail, else 0."""
        with self._lock:
            self.calls[kind] += 1
            number = self.calls[kind]
            fail = number in self.fail_on_call.get(kind, ()) or (
                self.fail_probability > 0 and self._rng.random() < self.fail_probability)
            if fail:
                self.injected.append((kind, number))
        return number if fail else 0

    def _check(self, kind: str) -> None:
        number = self._should_fail(kind)
        if number:
            raise self._error_factory(kind, number)

    def _truncated(self, data) -> bytes:
        data = bytes(data)
        keep = len(data) // 2 if self.truncate_writes is True else min(int(self.truncate_writes), len(data))
        return data[:keep]

    def _put(self, store: Callable[[bytes], object], data):
        number = self._should_fail("PUT")
        if not number:
            return store(data)
        if self.truncate_writes is not False:
            store(self._truncated(data))
        raise self._error_factory("PUT", number)

    def put(self, name, data) -> None:
        self._put(lambda blob: self.inner.put(name, blob), data)

    def put_if_absent(self, name, data) -> bool:
        return self._put(lambda blob: self.inner.put_if_absent(name, blob), data)

    def get(self, name, offset=0, length=-1) -> bytes:
        self._check("GET")
        return self.inner.get(name, offset, length)

    def stat(self, name) -> BlobMeta:
        self._check("STAT")
        return self.inner.stat(name)

    def list(self, prefix="") -> Iterator[BlobMeta]:
        self._check("LIST")
        return self.inner.list(prefix)

    def delete(self, name) -> None:
        self._check("DELETE")
        self.inner.delete(name)


def find_wrapper(storage: BlobStorage, kind: type):
    """The wrapper of type ``kind`` in ``storage``'s chain of wrappers, if there is one."""
    while not isinstance(storage, kind) and isinstance(storage, StorageWrapper):
        storage = storage.inner
    return storage if isinstance(storage, kind) else None


def counting_storage(storage: BlobStorage) -> CountingStorage | None:
    """The ``CountingStorage`` in ``storage``'s chain of wrappers, if there is one."""
    return find_wrapper(storage, CountingStorage)


class _Bucket:
    """A rate limit shared by every thread of a process: a request takes its bytes at once and
    then waits until the rate has paid them back ("debt"), so the average stays at ``rate``
    whatever the sizes and however many threads there are, with a burst of at most one second."""

    MAX_DEBT = 10.0  # seconds of debt small requests may run up before they wait too

    def __init__(self, rate: float, monotonic: Callable[[], float], sleep: Callable[[float], None]):
        if not rate > 0:
            raise ValueError("a rate limit must be positive")
        self.rate = float(rate)
        self._monotonic, self._sleep = monotonic, sleep
        self._lock = threading.Lock()
        self._credit = self.rate  # bytes that may go now: up to one second's worth
        self._last = monotonic()

    def take(self, n: int, wait: bool = True) -> None:
        """Count ``n`` bytes; wait until they are paid for, unless ``wait`` is False (a small
        request goes at once, and the next big one pays its debt)."""
        with self._lock:
            now = self._monotonic()
            self._credit = min(self.rate, self._credit + (now - self._last) * self.rate) - n
            self._last = now
            # small requests do not wait, unless they alone have run up more than MAX_DEBT
            owed = -self._credit / self.rate if self._credit < 0 else 0.0
            delay = owed if wait or owed > self.MAX_DEBT else 0.0
        if delay > 0:
            self._sleep(delay)

    def after_fork(self) -> None:
        self._lock = threading.Lock()


class ThrottledStorage(StorageWrapper):
    """Limits the bytes this process uploads (puts) and downloads (gets) per second
    (``--limit-upload``, ``--limit-download``). Listings pass freely; so do requests under
    ``SMALL`` bytes (session heartbeats, markers, manifests), whose bytes the next big request
    pays for: a heartbeat never waits behind the packs' debt."""

    SMALL = 64 * 1024

    def __init__(self, inner: BlobStorage, upload: float | None = None, download: float | None = None,
                 monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        super().__init__(inner)
        self.upload = _Bucket(upload, monotonic, sleep) if upload else None
        self.download = _Bucket(download, monotonic, sleep) if download else None

    def after_fork(self) -> None:
        super().after_fork()
        for bucket in (self.upload, self.download):
            if bucket is not None:
                bucket.after_fork()

    def share(self, parts: int) -> None:
        """Split the limits among ``parts`` processes about to fork (each gets its share)."""
        for bucket in (self.upload, self.download):
            if bucket is not None:
                bucket.rate /= parts
                bucket._credit = min(bucket._credit, bucket.rate)

    def put(self, name, data) -> None:
        if self.upload is not None:
            self.upload.take(len(data), wait=len(data) >= self.SMALL)
        self.inner.put(name, data)

    def put_if_absent(self, name, data) -> bool:
        if self.upload is not None:
            self.upload.take(len(data), wait=len(data) >= self.SMALL)
        return self.inner.put_if_absent(name, data)

    def get(self, name, offset=0, length=-1) -> bytes:
        data = self.inner.get(name, offset, length)
        if self.download is not None:
            self.download.take(len(data), wait=len(data) >= self.SMALL)
        return data


def throttled_storage(storage: BlobStorage) -> ThrottledStorage | None:
    """The ``ThrottledStorage`` in ``storage``'s chain of wrappers, if there is one."""
    return find_wrapper(storage, ThrottledStorage)
