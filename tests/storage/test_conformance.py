"""The blob storage contract (``repo_format/storage/base.py``), checked on every backend and wrapper.

``BlobStorageConformance`` holds the tests; ``TestEveryBackend`` runs them on each entry of
``BACKENDS``. A new backend is done when it is added there and passes.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from repo_format import clock
from repo_format.errors import BlobNotFound, InvalidBlobName
from repo_format.storage import (CountingStorage, FaultInjectingStorage, FilesystemStorage, MemoryStorage,
                                 RetryingStorage, S3Storage)

MiB = 1024 * 1024
TIMESTAMP_SLACK = 2.0  # seconds; S3's LastModified has 1 s resolution

BACKENDS = ["memory", "filesystem", "s3", "s3-multipart", "retrying(memory)", "counting(filesystem)",
            "retrying(faulty(memory))"]


def _no_sleep(seconds: float) -> None:
    pass


def make_backend(kind: str, request, tmp_path):
    if kind == "memory":
        return MemoryStorage()
    if kind == "filesystem":
        return FilesystemStorage(tmp_path / "blobs", create=True)
    if kind in ("s3", "s3-multipart"):
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        if kind == "s3":
            return S3Storage(bucket, endpoint_url=endpoint)
        return S3Storage(bucket, prefix="repos/one", endpoint_url=endpoint,
                         multipart_threshold=6 * MiB, multipart_chunksize=5 * MiB)
    if kind == "retrying(memory)":
        return RetryingStorage(MemoryStorage(), sleep=_no_sleep)
    if kind == "counting(filesystem)":
        return CountingStorage(FilesystemStorage(tmp_path / "blobs", create=True, fsync=False))
    if kind == "retrying(faulty(memory))":
        # a third of all calls fail before reaching the store; 20 attempts make giving up ~1e-10 likely
        faulty = FaultInjectingStorage(MemoryStorage(), fail_probability=0.3, rng=random.Random(7))
        return RetryingStorage(faulty, attempts=20, sleep=_no_sleep)
    raise AssertionError(kind)


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(size * 1000 + seed).randbytes(size)


def names_of(storage, prefix: str = "") -> set[str]:
    return {meta.name for meta in storage.list(prefix)}


BAD_NAMES = ["../x", "a/b", "/abs", ".hidden", "", "x" * 201, "a\x00b", "a b", "caf\u00e9", "..", "a\\b"]

# short and long names that share leading characters, around the 3- and 6-character shard edges
PREFIX_NAMES = ["a", "ab", "abc", "abcd", "abcdef", "abcdefg", "abcdefgh", "abcdxyz1", "abd0000",
                "abc.def-1", "b", "bcd_000", "p0123456789abcdef", "p01234ff", "xn1_0000aaaa"]


class BlobStorageConformance:
    """Every test takes ``storage``, a fresh, empty storage of the backend under test."""

    @pytest.mark.parametrize("size", [0, 1, 1000, MiB])
    def test_put_get_roundtrip(self, storage, size):
        data = blob(size)
        storage.put("roundtrip-blob", data)
        assert storage.get("roundtrip-blob") == data
        assert storage.stat("roundtrip-blob").length == size

    def test_accepts_bytearray_and_memoryview(self, storage):
        storage.put("from-bytearray", bytearray(b"abc\x00def"))
        storage.put("from-memoryview", memoryview(b"0123456789")[2:6])
        assert storage.get("from-bytearray") == b"abc\x00def"
        assert storage.get("from-memoryview") == b"2345"

    def test_large_blob_roundtrip_and_range_across_parts(self, storage):
        data = blob(12 * MiB)
        storage.put("large-blob", data)
        assert storage.stat("large-blob").length == len(data)
        assert storage.get("large-blob") == data
        boundary = 5 * MiB  # a multipart part boundary for s3-multipart
        assert storage.get("large-blob", boundary - 10, 20) == data[boundary - 10:boundary + 10]

    def test_ranged_gets(self, storage):
        data = bytes(range(256)) * 4
        storage.put("ranged-blob", data)
        assert storage.get("ranged-blob", 10, 20) == data[10:30]
        assert storage.get("ranged-blob", 0, 1) == data[:1]
        assert storage.get("ranged-blob", 1000) == data[1000:]
        assert storage.get("ranged-blob", 1000, 100) == data[1000:]  # short at the end
        assert storage.get("ranged-blob", 1023, -1) == data[1023:]
        assert storage.get("ranged-blob", 1024) == b""
        assert storage.get("ranged-blob", 5000, 10) == b""
        assert storage.get("ranged-blob", 5, 0) == b""

    def test_ranged_get_of_empty_blob(self, storage):
        storage.put("empty-blob", b"")
        assert storage.get("empty-blob", 0, 10) == b""
        assert storage.get("empty-blob", 3) == b""

    def test_invalid_range_rejected(self, storage):
        storage.put("range-check", b"data")
        with pytest.raises(ValueError):
            storage.get("range-check", -1, 2)
        with pytest.raises(ValueError):
            storage.get("range-check", 0, -2)

    def test_overwrite_replaces(self, storage):
        storage.put("overwritten", b"first version, longer")
        storage.put("overwritten", b"second")
        assert storage.get("overwritten") == b"second"
        assert storage.stat("overwritten").length == 6
        assert [(m.name, m.length) for m in storage.list("overwritten")] == [("overwritten", 6)]

    def test_put_if_absent(self, storage):
        assert storage.put_if_absent("create-once", b"first") is True
        assert storage.put_if_absent("create-once", b"second, different") is False
        assert storage.get("create-once") == b"first"
        assert storage.stat("create-once").length == 5

    def test_stat_reports_length_and_storage_time(self, storage):
        before = clock.now()
        storage.put("timed-blob", b"x" * 123)
        after = clock.now()
        meta = storage.stat("timed-blob")
        assert meta.name == "timed-blob"
        assert meta.length == 123
        assert before - TIMESTAMP_SLACK <= meta.timestamp <= after + TIMESTAMP_SLACK

    def test_list_agrees_with_stat(self, storage):
        storage.put("listed-one", b"12345")
        storage.put("listed-two", b"")
        listed = {m.name: m for m in storage.list()}
        assert set(listed) == {"listed-one", "listed-two"}
        for name, meta in listed.items():
            stat = storage.stat(name)
            assert meta.length == stat.length
            assert abs(meta.timestamp - stat.timestamp) <= 1.0

    def test_list_by_prefix(self, storage):
        for i, name in enumerate(PREFIX_NAMES):
            storage.put(name, blob(i, seed=1))
        prefixes = ["", "a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh", "abcdefghi",
                    "abc.", "abd", "b", "p01234", "p0123456789", "xn1_", "z", "zzzzzzzzz"]
        for prefix in prefixes:
            expected = {n for n in PREFIX_NAMES if n.startswith(prefix)}
            assert names_of(storage, prefix) == expected, prefix
        sizes = {m.name: m.length for m in storage.list()}
        assert sizes == {name: i for i, name in enumerate(PREFIX_NAMES)}

    def test_short_and_long_names_sharing_a_start_are_distinct(self, storage):
        for name in ["abc", "abcdefg", "abcdef", "abcdefgh"]:
            storage.put(name, name.encode())
        for name in ["abc", "abcdefg", "abcdef", "abcdefgh"]:
            assert storage.get(name) == name.encode()
        storage.delete("abcdefg")
        assert storage.get("abc") == b"abc"
        assert names_of(storage, "abc") == {"abc", "abcdef", "abcdefgh"}

    def test_empty_storage_lists_nothing(self, storage):
        assert list(storage.list()) == []
        assert list(storage.list("p")) == []

    def test_many_blobs_listed_completely(self, storage):
        names = {hashlib.sha256(b"%d" % i).hexdigest()[:24] for i in range(300)}
        for name in names:
            storage.put(name, name[:5].encode())
        assert names_of(storage) == names
        for digit in "0a":
            assert names_of(storage, digit) == {n for n in names if n.startswith(digit)}
        assert all(m.length == 5 for m in storage.list())

    def test_delete(self, storage):
        storage.put("doomed", b"bye")
        storage.put("kept-blob", b"stay")
        storage.delete("doomed")
        with pytest.raises(BlobNotFound):
            storage.get("doomed")
        with pytest.raises(BlobNotFound):
            storage.stat("doomed")
        assert not storage.exists("doomed")
        assert names_of(storage) == {"kept-blob"}
        assert storage.put_if_absent("doomed", b"again") is True

    def test_delete_missing_is_fine(self, storage):
        storage.put("kept-blob", b"stay")
        storage.delete("never-written")
        storage.delete("a")
        assert names_of(storage) == {"kept-blob"}

    def test_missing_blob_raises_not_found(self, storage):
        storage.put("present", b"here")
        for call in (lambda: storage.get("absent-blob"), lambda: storage.get("absent-blob", 2, 3),
                     lambda: storage.get("absent-blob", 0, 0), lambda: storage.stat("absent-blob"),
                     lambda: storage.get("abs")):
            with pytest.raises(BlobNotFound) as info:
                call()
            assert "abs" in str(info.value)
        assert storage.exists("absent-blob") is False
        assert storage.exists("present") is True

    @pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
    def test_invalid_names_rejected_by_every_method(self, storage, bad):
        calls = {
            "put": lambda: storage.put(bad, b"x"),
            "put_if_absent": lambda: storage.put_if_absent(bad, b"x"),
            "get": lambda: storage.get(bad),
            "stat": lambda: storage.stat(bad),
            "exists": lambda: storage.exists(bad),
            "delete": lambda: storage.delete(bad),
        }
        if bad:  # the empty prefix is valid: it lists everything
            calls["list"] = lambda: list(storage.list(bad))
        for method, call in calls.items():
            with pytest.raises(InvalidBlobName):
                call()
                pytest.fail(f"{method} accepted {bad!r}")
        assert list(storage.list()) == []


class TestEveryBackend(BlobStorageConformance):
    @pytest.fixture(params=BACKENDS)
    def storage(self, request, tmp_path):
        storage = make_backend(request.param, request, tmp_path)
        yield storage
        storage.close()
