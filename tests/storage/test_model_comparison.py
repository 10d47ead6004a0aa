"""Random sequences of operations give the same results on a storage and on the in-memory model."""

from __future__ import annotations

import random
import shutil
import tempfile

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from repo_format.errors import BlobNotFound
from repo_format.storage import (CountingStorage, FaultInjectingStorage, FilesystemStorage, MemoryStorage,
                                 RetryingStorage)

# few names, sharing starts and crossing the 3/6/7-character shard edges, so operations collide
NAMES = st.sampled_from(["a", "abc", "abcdef", "abcdefg", "abcdefgh", "abcxyz0", "abd0000", "zz"])
PREFIXES = st.sampled_from(["", "a", "ab", "abc", "abcd", "abcdefg", "abcdefgh", "z", "q"])
DATA = st.binary(max_size=64)


def _filesystem(root):
    return FilesystemStorage(root, fsync=False)


def _wrapped_filesystem(root):
    faulty = FaultInjectingStorage(_filesystem(root), fail_probability=0.2, rng=random.Random(5))
    return CountingStorage(RetryingStorage(faulty, attempts=30, sleep=lambda s: None))


class StorageMatchesModel(RuleBasedStateMachine):
    make_storage = staticmethod(_filesystem)

    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="kdist-model-")
        self.storage = self.make_storage(self.root)
        self.model = MemoryStorage()
        self.writes = 0

    def unique(self, data: bytes) -> bytes:
        # every write differs, as kdist's do (random nonces): RetryingStorage takes a blob holding
        # exactly its bytes, found after a failed attempt, to be its own write whose reply was lost
        self.writes += 1
        return data + b"#%d" % self.writes

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(name=NAMES, data=DATA)
    def put(self, name, data):
        data = self.unique(data)
        self.storage.put(name, data)
        self.model.put(name, data)

    @rule(name=NAMES, data=DATA)
    def put_if_absent(self, name, data):
        data = self.unique(data)
        assert self.storage.put_if_absent(name, data) == self.model.put_if_absent(name, data)

    @rule(name=NAMES)
    def delete(self, name):
        self.storage.delete(name)
        self.model.delete(name)

    @rule(name=NAMES, offset=st.integers(0, 80), length=st.integers(-1, 80))
    def get(self, name, offset, length):
        try:
            expected = self.model.get(name, offset, length)
        except BlobNotFound:
            with pytest.raises(BlobNotFound):
                self.storage.get(name, offset, length)
            return
        assert self.storage.get(name, offset, length) == expected

    @rule(prefix=PREFIXES)
    def list_prefix(self, prefix):
        listed = sorted((m.name, m.length) for m in self.storage.list(prefix))
        assert listed == sorted((m.name, m.length) for m in self.model.list(prefix))

    @invariant()
    def same_names(self):
        assert {m.name for m in self.storage.list()} == {m.name for m in self.model.list()}


class WrappedStorageMatchesModel(StorageMatchesModel):
    make_storage = staticmethod(_wrapped_filesystem)


TestFilesystemMatchesModel = StorageMatchesModel.TestCase
TestFilesystemMatchesModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestWrappedFilesystemMatchesModel = WrappedStorageMatchesModel.TestCase
TestWrappedFilesystemMatchesModel.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
