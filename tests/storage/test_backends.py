"""Behaviour particular to one backend or wrapper; the shared contract is in test_conformance.py."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from repo_format import clock, errors
from repo_format.errors import (BlobNotFound, InvalidBlobName, RetryableStorageError, StorageError,
                                StorageUnreachable)
from repo_format.storage import (CountingStorage, FaultInjectingStorage, FilesystemStorage, MemoryStorage,
                                 ReadOnlyStorage, RetryingStorage, S3Storage, open_storage, parse_s3_url)
from repo_format.storage.base import BlobStorage

MiB = 1024 * 1024


def all_files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


# ---------------------------------------------------------------- filesystem


@pytest.fixture
def fs(tmp_path):
    return FilesystemStorage(tmp_path / "root", create=True)


def test_filesystem_sharded_layout(fs, tmp_path):
    root = tmp_path / "root"
    fs.put("kdist.repository", b"format")
    fs.put("abcdefg", b"seven")
    fs.put("abcdef", b"six")
    fs.put("abc", b"three")
    assert all_files(root) == {
        os.path.join("kdi", "st.", "kdist.repository"),
        os.path.join("abc", "def", "abcdefg"),
        "_abcdef",  # shorter names sit in the root, marked so "abc" cannot clash with shard "abc/"
        "_abc",
    }
    assert (root / "abc" / "def" / "abcdefg").read_bytes() == b"seven"
    assert (root / "_abc").read_bytes() == b"three"


def test_filesystem_temp_and_foreign_files_never_listed(fs, tmp_path):
    root = tmp_path / "root"
    fs.put("abcdefgh", b"real")
    fs.put("ab", b"short")
    (root / ".tmp-0123abcd").write_bytes(b"left by a crash")
    (root / "abc" / "def" / ".tmp-feedbeef").write_bytes(b"left by a crash")
    (root / "README").write_bytes(b"not a blob")
    assert {m.name for m in fs.list()} == {"abcdefgh", "ab"}
    assert {m.name for m in fs.list("abcdef")} == {"abcdefgh"}


def test_filesystem_failed_put_leaves_no_temp_file(fs, tmp_path, monkeypatch):
    fs.put("abcdefgh", b"old")

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="Input/output error"):
        fs.put("abcdefgh", b"new")
    assert all_files(tmp_path / "root") == {os.path.join("abc", "def", "abcdefgh")}
    assert fs.get("abcdefgh") == b"old"


@pytest.mark.parametrize("method", ["put", "put_if_absent"])
def test_filesystem_full_disk(fs, tmp_path, monkeypatch, method):
    fs.put("abcdefgh", b"already there")

    def full_disk_write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk_write)
    with pytest.raises(StorageError, match="storage full") as info:
        getattr(fs, method)("xyzxyzxyz", b"payload")
    assert not isinstance(info.value, RetryableStorageError)
    monkeypatch.undo()
    assert all_files(tmp_path / "root") == {os.path.join("abc", "def", "abcdefgh")}
    assert not fs.exists("xyzxyzxyz")


def test_filesystem_names_cannot_escape_root(tmp_path):
    inner = tmp_path / "inner"
    fs = FilesystemStorage(inner, create=True)
    for bad in ["../escaped", "..", "sub/../../escaped", "/tmp/escaped", "..\\escaped"]:
        with pytest.raises(InvalidBlobName):
            fs.put(bad, b"x")
    assert sorted(os.listdir(tmp_path)) == ["inner"]
    assert all_files(inner) == set()


def test_filesystem_missing_root(tmp_path):
    with pytest.raises(StorageUnreachable, match="does not exist"):
        FilesystemStorage(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StorageUnreachable):
        FilesystemStorage(tmp_path / "a-file")
    created = FilesystemStorage(tmp_path / "new" / "root", create=True)
    created.put("abcdefgh", b"x")
    assert (tmp_path / "new" / "root" / "abc" / "def" / "abcdefgh").exists()


def test_filesystem_vanished_root_is_not_recreated(tmp_path):
    root = tmp_path / "root"
    fs = FilesystemStorage(root, create=True)
    os.rmdir(root)
    with pytest.raises(StorageUnreachable, match="no longer exists"):
        fs.put("abcdefgh", b"x")
    with pytest.raises(StorageUnreachable):
        list(fs.list())
    assert not root.exists()


def test_filesystem_timestamp_is_mtime(fs, tmp_path):
    fs.put("abcdefgh", b"x")
    os.utime(tmp_path / "root" / "abc" / "def" / "abcdefgh", ns=(1_600_000_000_500_000_000,) * 2)
    assert fs.stat("abcdefgh").timestamp == pytest.approx(1_600_000_000.5)
    assert [m.timestamp for m in fs.list()] == [pytest.approx(1_600_000_000.5)]


@pytest.mark.parametrize("fsync", [True, False])
def test_filesystem_fsync_flag(tmp_path, monkeypatch, fsync):
    fs = FilesystemStorage(tmp_path, fsync=fsync)
    fs.put("abcdefgh", b"x")  # shard directories exist from here on
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fs.put("abcdefgh", b"y")
    assert len(synced) == (2 if fsync else 0)  # the file, then its directory


def test_filesystem_list_reads_only_matching_shards(fs, monkeypatch, tmp_path):
    root = str(tmp_path / "root")
    for name in ["abcdefgh", "abcxyz00", "abd00000", "zzzzzzzz", "short"]:
        fs.put(name, b"x")
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: (scanned.append(os.path.relpath(path, root)), real_scandir(path))[1])
    assert {m.name for m in fs.list("abcdefg")} == {"abcdefgh"}
    assert scanned == [os.path.join("abc", "def")]
    scanned.clear()
    assert {m.name for m in fs.list("abc")} == {"abcdefgh", "abcxyz00"}
    assert sorted(scanned) == sorted([".", "abc", os.path.join("abc", "def"), os.path.join("abc", "xyz")])


def test_filesystem_put_if_absent_is_atomic_under_races(fs):
    winners: dict[str, list[bytes]] = {f"contested-{i}": [] for i in range(20)}
    lock = threading.Lock()

    def contend(me: int):
        for name in winners:
            data = b"writer %d" % me
            if fs.put_if_absent(name, data):
                with lock:
                    winners[name].append(data)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, won in winners.items():
        assert len(won) == 1, name
        assert fs.get(name) == won[0]


# ---------------------------------------------------------------- locations


def test_parse_s3_url():
    assert parse_s3_url("s3://bucket/some/prefix") == ("bucket", "some/prefix")
    assert parse_s3_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ["s3://", "s3:///prefix", "http://bucket/x", "s3://bucket/x?versionId=1"]:
        with pytest.raises(StorageError):
            parse_s3_url(bad)


def test_open_storage_paths(tmp_path):
    a = open_storage(str(tmp_path / "a"), create=True)
    assert isinstance(a, FilesystemStorage) and a.root == str(tmp_path / "a")
    b = open_storage(f"file://{tmp_path}/b", create=True)
    assert isinstance(b, FilesystemStorage) and b.root == str(tmp_path / "b")
    with pytest.raises(StorageUnreachable):
        open_storage(str(tmp_path / "missing"))
    for bad in ["gs://bucket/x", "file://otherhost/x"]:
        with pytest.raises(StorageError):
            open_storage(bad)


def test_open_storage_s3(moto_server):
    storage = open_storage("s3://some-bucket/repos/one", endpoint_url=moto_server)
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("some-bucket", "repos/one/")
    assert storage.describe() == f"s3://some-bucket/repos/one/ ({moto_server})"


# ---------------------------------------------------------------- S3


@pytest.fixture
def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = S3Storage(bucket, prefix="repo", endpoint_url=endpoint,
                        multipart_threshold=6 * MiB, multipart_chunksize=5 * MiB)
    yield storage
    storage.close()


def test_s3_keys_are_prefixed_and_listing_stays_in_the_prefix(s3, moto_client):
    s3.put("abcdefgh", b"mine")
    assert moto_client.get_object(Bucket=s3.bucket, Key="repo/abcdefgh")["Body"].read() == b"mine"
    for key in ["other/abcdefgh", "repo/nested/abcdefgh", "repo-two/abcdefgh", "repo/.hidden"]:
        moto_client.put_object(Bucket=s3.bucket, Key=key, Body=b"foreign")
    assert [(m.name, m.length) for m in s3.list()] == [("abcdefgh", 4)]


def test_s3_multipart_above_threshold(s3, moto_client):
    data = random.Random(1).randbytes(12 * MiB)
    s3.put("big-blob", data)
    s3.put("small-blob", b"small")
    assert moto_client.head_object(Bucket=s3.bucket, Key="repo/big-blob")["ETag"].endswith('-3"')
    assert "-" not in moto_client.head_object(Bucket=s3.bucket, Key="repo/small-blob")["ETag"]
    assert s3.get("big-blob") == data


def test_s3_failed_multipart_upload_is_aborted(s3, moto_client, monkeypatch):
    real_upload_part = s3._client.upload_part
    calls = []

    def flaky_upload_part(**kwargs):
        calls.append(kwargs["PartNumber"])
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, "UploadPart")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(s3._client, "upload_part", flaky_upload_part)
    with pytest.raises(RetryableStorageError, match="InternalError"):
        s3.put("big-blob", bytes(12 * MiB))
    assert calls == [1, 2]
    assert not s3.exists("big-blob")
    assert moto_client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


@pytest.mark.parametrize("size", [10, 12 * MiB])
def test_s3_put_if_absent_sends_if_none_match(s3, monkeypatch, size):
    s3.put("taken-blob", b"original")
    monkeypatch.setattr(s3, "exists", lambda name: False)  # lose the race after the HEAD check
    assert s3.put_if_absent("taken-blob", bytes(size)) is False
    assert s3.get("taken-blob") == b"original"


def test_s3_missing_bucket(moto_server):
    storage = S3Storage("kdist-no-such-bucket", endpoint_url=moto_server)
    for call in (lambda: storage.put("abcdefgh", b"x"), lambda: storage.get("abcdefgh"),
                 lambda: list(storage.list())):
        with pytest.raises(StorageUnreachable, match="bucket 'kdist-no-such-bucket' does not exist"):
            call()


def test_s3_unreachable_endpoint_fails_fast(moto_server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    storage = S3Storage("bucket", endpoint_url=closed, connect_timeout=1)
    started = clock.monotonic()
    with pytest.raises(StorageUnreachable, match="cannot connect to S3 endpoint http://127.0.0.1:") as info:
        storage.get("abcdefgh")
    assert clock.monotonic() - started < 5
    assert "testing" not in str(info.value)


def test_s3_connection_loss_after_success_is_retryable(s3, monkeypatch):
    s3.put("abcdefgh", b"x")

    def dropped(**kwargs):
        raise EndpointConnectionError(endpoint_url=s3.endpoint)

    monkeypatch.setattr(s3._client, "get_object", dropped)
    with pytest.raises(RetryableStorageError, match="connection to http://127.0.0.1"):
        s3.get("abcdefgh")


@pytest.mark.parametrize("code, status, expected", [
    ("SlowDown", 503, RetryableStorageError),
    ("Throttling", 400, RetryableStorageError),
    ("RequestLimitExceeded", 400, RetryableStorageError),
    ("InternalError", 500, RetryableStorageError),
    ("BadGateway", 502, RetryableStorageError),
    ("GatewayTimeout", 504, RetryableStorageError),
    ("NoSuchBucket", 404, StorageUnreachable),
    ("AccessDenied", 403, StorageUnreachable),
    ("InvalidAccessKeyId", 403, StorageUnreachable),
    ("SignatureDoesNotMatch", 403, StorageUnreachable),
    ("NoSuchKey", 404, BlobNotFound),
    ("EntityTooLarge", 400, StorageError),
])
def test_s3_error_mapping(s3, monkeypatch, code, status, expected):
    def failing(**kwargs):
        raise ClientError({"Error": {"Code": code, "Message": "key AKIAEXAMPLEKEY secret wJalrEXAMPLE"},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    monkeypatch.setattr(s3._client, "get_object", failing)
    with pytest.raises(StorageError) as info:
        s3.get("abcdefgh")
    assert type(info.value) is expected
    if expected is StorageUnreachable and code != "NoSuchBucket":
        assert "credentials" in str(info.value)
        assert "AKIAEXAMPLE" not in str(info.value) and "wJalr" not in str(info.value)


# ---------------------------------------------------------------- wrappers


def no_sleep(seconds: float) -> None:
    pass


class UpperBoundRng(random.Random):
    """Jitter that always picks the top of its range, so backoff delays are exact."""

    def uniform(self, a, b):
        return b


def test_retrying_retries_then_succeeds():
    faulty = FaultInjectingStorage(MemoryStorage(), fail_on_call={"PUT": {1, 2}, "GET": {1}})
    slept = []
    storage = RetryingStorage(faulty, attempts=3, sleep=slept.append, rng=UpperBoundRng())
    storage.put("abcdefgh", b"data")
    assert storage.get("abcdefgh") == b"data"
    assert faulty.calls["PUT"] == 3 and faulty.calls["GET"] == 2
    assert slept == [0.1, 0.2, 0.1]


def test_retrying_backoff_grows_and_is_capped():
    slept = []
    faulty = FaultInjectingStorage(MemoryStorage(), fail_probability=1.0)
    storage = RetryingStorage(faulty, attempts=9, base_delay=0.1, max_delay=5, sleep=slept.append,
                              rng=UpperBoundRng())
    with pytest.raises(RetryableStorageError):
        storage.stat("abcdefgh")
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5])


def test_retrying_jitter_stays_within_the_bound():
    slept = []
    faulty = FaultInjectingStorage(MemoryStorage(), fail_probability=1.0)
    storage = RetryingStorage(faulty, attempts=6, sleep=slept.append, rng=random.Random(3))
    with pytest.raises(RetryableStorageError):
        storage.get("abcdefgh")
    assert len(slept) == 5
    assert all(0 <= s <= 0.1 * 2 ** n for n, s in enumerate(slept))
    assert len(set(slept)) == 5  # jittered, not fixed


def test_retrying_gives_up_after_attempts():
    faulty = FaultInjectingStorage(MemoryStorage(), fail_on_call={"DELETE": {1, 2, 3, 4, 5}})
    storage = RetryingStorage(faulty, attempts=4, sleep=no_sleep)
    with pytest.raises(RetryableStorageError, match="DELETE call 4"):
        storage.delete("abcdefgh")
    assert faulty.calls["DELETE"] == 4


@pytest.mark.parametrize("error", [BlobNotFound("abcdefgh"), StorageUnreachable("no bucket"), StorageError("bad")])
def test_retrying_does_not_retry_permanent_errors(error):
    faulty = FaultInjectingStorage(MemoryStorage(), fail_on_call={"GET": {1}}, error_factory=lambda kind, n: error)
    slept = []
    storage = RetryingStorage(faulty, sleep=slept.append)
    with pytest.raises(type(error)):
        storage.get("abcdefgh")
    assert faulty.calls["GET"] == 1 and slept == []


def test_retrying_does_not_retry_a_missing_blob():
    counting = CountingStorage(MemoryStorage())
    with pytest.raises(BlobNotFound):
        RetryingStorage(counting, sleep=no_sleep).get("abcdefgh")
    assert counting.counts()["GET"]["calls"] == 1


class LostReplyStorage(MemoryStorage):
    """The first put_if_absent is stored but its reply is lost, as a dropped connection can do."""

    lost = False

    def put_if_absent(self, name, data) -> bool:
        created = super().put_if_absent(name, data)
        if not self.lost:
            self.lost = True
            raise RetryableStorageError("connection dropped after the write")
        return created


def test_retrying_put_if_absent_recognises_its_own_lost_write():
    storage = RetryingStorage(LostReplyStorage(), sleep=no_sleep)
    assert storage.put_if_absent("abcdefgh", b"mine") is True
    assert storage.put_if_absent("abcdefgh", b"mine") is False  # without a failure, taken is taken
    other = RetryingStorage(LostReplyStorage(), sleep=no_sleep)
    other.inner.put("abcdefgh", b"someone else's")
    assert other.put_if_absent("abcdefgh", b"mine") is False


class ListFailsMidway(MemoryStorage):
    def __init__(self):
        super().__init__()
        self.listings = 0

    def list(self, prefix=""):
        self.listings += 1
        for i, meta in enumerate(sorted(super().list(prefix), key=lambda m: m.name)):
            if self.listings == 1 and i == 2:
                raise RetryableStorageError("listing interrupted")
            yield meta


def test_retrying_restarts_an_interrupted_listing_without_duplicates():
    inner = ListFailsMidway()
    names = [f"blob-{i:04d}" for i in range(6)]
    for name in names:
        inner.put(name, b"x")
    listed = [m.name for m in RetryingStorage(inner, sleep=no_sleep).list()]
    assert listed == names
    assert inner.listings == 2


def test_read_only_refuses_writes():
    inner = MemoryStorage()
    inner.put("abcdefgh", b"data")
    storage = ReadOnlyStorage(inner)
    for call in (lambda: storage.put("abcdefgh", b"new"), lambda: storage.put("other-blob", b"new"),
                 lambda: storage.put_if_absent("other-blob", b"new"), lambda: storage.delete("abcdefgh")):
        with pytest.raises(errors.ReadOnlyStorage, match="read-only"):
            call()
    assert storage.get("abcdefgh") == b"data"
    assert storage.stat("abcdefgh").length == 4
    assert [m.name for m in storage.list()] == ["abcdefgh"]
    assert [m.name for m in inner.list()] == ["abcdefgh"]


def test_counting_counts_calls_and_bytes():
    storage = CountingStorage(MemoryStorage())
    storage.put("abcdefgh", b"12345")
    storage.put_if_absent("abcdefgh", b"123")
    storage.put_if_absent("other-blob", bytearray(b"1234567"))
    assert storage.get("abcdefgh") == b"12345"
    assert storage.get("abcdefgh", 1, 2) == b"23"
    with pytest.raises(BlobNotFound):
        storage.get("missing-blob")
    storage.stat("abcdefgh")
    assert storage.exists("missing-blob") is False
    assert len(list(storage.list())) == 2
    assert len(list(storage.list("abc"))) == 1
    storage.delete("abcdefgh")
    assert storage.counts() == {
        "PUT": {"calls": 3, "bytes": 15},
        "GET": {"calls": 3, "bytes": 7},
        "LIST": {"calls": 2, "bytes": 0},
        "DELETE": {"calls": 1, "bytes": 0},
        "STAT": {"calls": 2, "bytes": 0},
    }
    snapshot = storage.counts()
    snapshot["PUT"]["calls"] = 99
    assert storage.counts()["PUT"]["calls"] == 3  # a copy, not the live counters
    storage.reset()
    assert all(c == {"calls": 0, "bytes": 0} for c in storage.counts().values())


def test_counting_is_thread_safe():
    storage = CountingStorage(MemoryStorage())
    storage.put("abcdefgh", b"xy")
    storage.reset()

    def reader():
        for _ in range(500):
            storage.get("abcdefgh")

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.counts()["GET"] == {"calls": 4000, "bytes": 8000}


def test_fault_injection_fails_the_chosen_calls():
    storage = FaultInjectingStorage(MemoryStorage(), fail_on_call={"GET": {2}, "LIST": {1}})
    storage.put("abcdefgh", b"x")
    assert storage.get("abcdefgh") == b"x"
    with pytest.raises(RetryableStorageError, match="GET call 2"):
        storage.get("abcdefgh")
    assert storage.get("abcdefgh") == b"x"
    with pytest.raises(RetryableStorageError):
        storage.list()
    assert [m.name for m in storage.list()] == ["abcdefgh"]
    assert storage.injected == [("GET", 2), ("LIST", 1)]


def test_fault_injection_failed_put_stores_nothing():
    storage = FaultInjectingStorage(MemoryStorage(), fail_on_call={"PUT": {1}})
    with pytest.raises(RetryableStorageError):
        storage.put("abcdefgh", b"data")
    assert not storage.inner.exists("abcdefgh")


def test_fault_injection_probability_is_seeded():
    def run(seed):
        storage = FaultInjectingStorage(MemoryStorage(), fail_probability=0.5, rng=random.Random(seed))
        outcomes = []
        for _ in range(40):
            try:
                storage.stat("abcdefgh")
            except RetryableStorageError:
                outcomes.append("fail")
            except BlobNotFound:
                outcomes.append("ok")
        return outcomes

    assert run(1) == run(1)
    assert 5 < run(1).count("fail") < 35


@pytest.mark.parametrize("truncate, kept", [(True, b"01234"), (3, b"012"), (0, b"")])
def test_fault_injection_truncated_write_is_visible_and_raises(truncate, kept):
    storage = FaultInjectingStorage(MemoryStorage(), fail_on_call={"PUT": {1}}, truncate_writes=truncate)
    with pytest.raises(RetryableStorageError):
        storage.put("abcdefgh", b"0123456789")
    assert storage.get("abcdefgh") == kept
    assert storage.stat("abcdefgh").length == len(kept)
    storage.put("abcdefgh", b"0123456789")  # the retry repairs it
    assert storage.get("abcdefgh") == b"0123456789"


def test_fault_injection_rejects_meaningless_settings():
    with pytest.raises(ValueError):
        FaultInjectingStorage(MemoryStorage(), truncate_writes=True)
    with pytest.raises(ValueError):
        FaultInjectingStorage(MemoryStorage(), fail_on_call={"POST": {1}})


def test_wrappers_forward_identity_and_capabilities(tmp_path):
    fs = FilesystemStorage(tmp_path)
    stacked = ReadOnlyStorage(CountingStorage(RetryingStorage(fs)))
    assert isinstance(stacked, BlobStorage)
    assert stacked.describe() == str(tmp_path)
    assert stacked.atomic_create_only is True
    assert CountingStorage(MemoryStorage()).atomic_create_only is True
