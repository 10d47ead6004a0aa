"""Fixtures for the repo_format tests: in-memory storage, a weak KDF, small packs and chunks.

Small packs (64 KiB, the smallest allowed) and small chunks (256 B / 1 KiB / 4 KiB) make a few
KiB of data cross pack and chunk boundaries, so the multi-pack paths run on small data. The weak
KDF (scrypt N=16) keeps every create and open in the millisecond range.

Factories are session-scoped so hypothesis tests can call them once per example.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import pytest

from repo_format.crypto import WEAK_KDF_ENV, KdfParams
from repo_format.errors import StorageError
from repo_format.format_blob import RepositoryParameters
from repo_format.repository import Repository
from repo_format.storage.base import BlobStorage
from repo_format.storage.memory import MemoryStorage

# CI does not set it; set before any test derives a key.
os.environ.setdefault(WEAK_KDF_ENV, "1")

PASSWORD = "correct horse battery staple"

SMALL_PARAMETERS = RepositoryParameters(
    pack_size=64 * 1024,
    metadata_pack_size=64 * 1024,
    chunk_avg=1024,
    chunk_min=256,
    chunk_max=4096,
)


class ObservedStorage(BlobStorage):
    """Wraps a storage: logs completed puts in order and fails the puts ``fail_on`` selects.

    ``fail_on(name, attempt)`` gets the blob name and the 0-based number of the put attempt.
    """

    def __init__(self, inner: BlobStorage, fail_on: Callable[[str, int], bool] | None = None):
        self.inner = inner
        self.puts: list[str] = []
        self.failed: list[str] = []
        self._fail_on = fail_on
        self._attempts = 0
        self._lock = threading.Lock()

    def put(self, name, data) -> None:
        with self._lock:
            attempt = self._attempts
            self._attempts += 1
        if self._fail_on is not None and self._fail_on(name, attempt):
            with self._lock:
                self.failed.append(name)
            raise StorageError(f"injected failure putting {name}")
        self.inner.put(name, data)
        with self._lock:
            self.puts.append(name)

    def get(self, name, offset=0, length=-1) -> bytes:
        return self.inner.get(name, offset, length)

    def stat(self, name):
        return self.inner.stat(name)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, name) -> None:
        self.inner.delete(name)


@pytest.fixture(scope="session")
def small_parameters() -> RepositoryParameters:
    return SMALL_PARAMETERS


@pytest.fixture(scope="session")
def password() -> str:
    return PASSWORD


@pytest.fixture(scope="session")
def make_repo() -> Callable[..., Repository]:
    """``make_repo(storage=None, parameters=SMALL_PARAMETERS)``: a new repository (weak KDF)."""

    def make(storage: BlobStorage | None = None,
             parameters: RepositoryParameters = SMALL_PARAMETERS) -> Repository:
        return Repository.create(storage if storage is not None else MemoryStorage(), PASSWORD,
                                 parameters, KdfParams.weak_for_tests())

    return make


@pytest.fixture(scope="session")
def reopen() -> Callable[[BlobStorage], Repository]:
    """``reopen(storage)``: a new client on the same storage (fresh session, index from storage)."""
    return lambda storage: Repository.open(storage, PASSWORD)


@pytest.fixture(scope="session")
def observed_storage() -> Callable[..., ObservedStorage]:
    """``observed_storage(fail_on=None)``: an ``ObservedStorage`` over a new memory storage."""
    return lambda fail_on=None: ObservedStorage(MemoryStorage(), fail_on)


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def repo(make_repo, storage) -> Repository:
    return make_repo(storage)
