"""Shared by the maintenance tests: repositories in memory on the virtual clock (`virtual_time`,
tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402


@pytest.fixture
def memory_repository(virtual_time):
    """``make(params)``: a new repository in memory whose blob timestamps are the virtual time."""

    def make(params, password: str = "pw", version: int | None = None) -> MemoryStorage:
        storage = MemoryStorage(clock=lambda: virtual_time[0])
        Repository.create(storage, password, params, KdfParams.weak_for_tests(),
                          **({"version": version} if version else {})).close()
        return storage

    return make
