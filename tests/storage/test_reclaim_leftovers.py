"""``reclaim_leftovers(now, older_than)``: what cut writes leave behind, on every backend and wrapper.

The filesystem deletes stale temp files and removes empty shard directories, racing safely with
puts (the interleavings are forced one by one below, then run freely in two threads); S3 aborts
stale multipart uploads (on the moto server of ``tests/conftest.py``); memory has nothing to reclaim.
"""

from __future__ import annotations

import os
import threading
import traceback

import pytest

from repo_format.errors import ReadOnlyStorage as ReadOnlyError
from repo_format.errors import RetryableStorageError, StorageError, StorageUnreachable
from repo_format.storage import (CountingStorage, FaultInjectingStorage, FilesystemStorage, MemoryStorage,
                                 ReadOnlyStorage, RetryingStorage, S3Storage, StorageWrapper)
from repo_format.storage.filesystem import PUT_ATTEMPTS, TEMP_PREFIX

HOUR = 3600.0
OLD = 1_600_000_000  # an mtime (2020) long before any run of these tests
FAR_FUTURE = 4_000_000_000.0  # a ``now`` (2096) against which everything on disk is old
NOTHING = {"temp_files": 0, "temp_bytes": 0, "directories": 0}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "root"


@pytest.fixture
def fs(root):
    return FilesystemStorage(root, create=True)


def storage_now(storage) -> float:
    """The storage's clock, read the way maintenance reads it: from a probe blob's timestamp."""
    storage.put("probe", b"")
    try:
        return storage.stat("probe").timestamp
    finally:
        storage.delete("probe")


def age(path, mtime: float = OLD) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def write(path, data: bytes, mtime: float | None = OLD):
    path.write_bytes(data)
    if mtime is not None:
        age(path, mtime)
    return path


def directories(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, sub), root) for d, subs, _ in os.walk(root) for sub in subs}


def files(root) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: its bytes and mtime (ns)."""
    found = {}
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = (f.read(), os.lstat(path).st_mtime_ns)
    return found


def blocks(root) -> int:
    """What ``du`` would count: the blocks of every directory and file below ``root``."""
    return sum(os.lstat(os.path.join(d, n)).st_blocks for d, subs, names in os.walk(root) for n in subs + names)


# ---------------------------------------------------------------- filesystem: what is reclaimed


def test_stale_temp_files_go_fresh_ones_and_blobs_stay(fs, root):
    blobs = {"abcdefgh": b"sharded", "ab": b"short", "abc.tmp-0123": b"a name with .tmp- inside"}
    for name, data in blobs.items():
        fs.put(name, data)
    for path in [root / "abc" / "def" / "abcdefgh", root / "_ab", root / "abc" / ".tm" / "abc.tmp-0123"]:
        age(path)  # as old as the stale temp files: age alone never makes a blob a leftover
    write(root / (TEMP_PREFIX + "stale-in-root"), b"1234567")
    write(root / "abc" / "def" / (TEMP_PREFIX + "stale-in-shard"), b"12345678901")
    write(root / (TEMP_PREFIX + "fresh-in-root"), b"x", mtime=None)
    write(root / "abc" / "def" / (TEMP_PREFIX + "fresh-in-shard"), b"y", mtime=None)
    blob_files = {path: v for path, v in files(root).items() if TEMP_PREFIX + "stale" not in path}

    assert fs.reclaim_leftovers(storage_now(fs), HOUR) == {"temp_files": 2, "temp_bytes": 18, "directories": 0}
    assert files(root) == blob_files  # the blobs and the fresh temp files, bytes and mtimes unchanged
    assert {m.name: fs.get(m.name) for m in fs.list()} == blobs


def test_only_temp_files_and_shard_directories_are_touched(fs, root, tmp_path):
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    write(outside / "target", b"not ours")
    age(outside / "empty")
    os.symlink(outside / "target", root / (TEMP_PREFIX + "link"))  # named like a temp file
    os.symlink(outside / "empty", root / "lnk")  # named like a shard directory
    os.symlink(outside / "empty", root / "abc")
    for link in ["lnk", "abc", TEMP_PREFIX + "link"]:
        age(root / link)
    write(root / "README", b"a note")
    for foreign in [root / ".ab", root / "four", root / "a b"]:  # not names of shard directories
        foreign.mkdir()
        age(foreign)
    before = (files(root), directories(root), sorted(os.listdir(root)))

    assert fs.reclaim_leftovers(FAR_FUTURE, 0) == NOTHING
    assert (files(root), directories(root), sorted(os.listdir(root))) == before
    assert (outside / "target").read_bytes() == b"not ours" and (outside / "empty").is_dir()


def test_empty_shard_directories_go_and_puts_make_them_again(fs, root):
    fs.put("abcdefgh", b"kept")  # abc/def holds a blob
    for name in ["abcxyz00", "zzzyyy00", "qqqwww00"]:  # deleted blobs leave empty directories
        fs.put(name, b"deleted")
        fs.delete(name)
    (root / "ttt" / "uuu").mkdir(parents=True)
    write(root / "ttt" / "uuu" / (TEMP_PREFIX + "cut"), b"123")  # all a directory holds: a stale temp file
    for d in ["abc/xyz", "zzz/yyy", "ttt/uuu", "abc/def", "abc", "zzz", "ttt"]:
        age(root / d)  # qqq and qqq/www stay fresh
    assert directories(root) == {"abc", "abc/def", "abc/xyz", "zzz", "zzz/yyy", "ttt", "ttt/uuu", "qqq", "qqq/www"}
    used = blocks(root)

    # one call empties ttt/uuu and removes it, then ttt; abc stays (abc/def is not empty)
    assert fs.reclaim_leftovers(storage_now(fs), HOUR) == {"temp_files": 1, "temp_bytes": 3, "directories": 5}
    assert directories(root) == {"abc", "abc/def", "qqq", "qqq/www"}
    assert blocks(root) < used
    assert fs.get("abcdefgh") == b"kept"
    assert fs.reclaim_leftovers(storage_now(fs), HOUR) == NOTHING  # fresh empty ones stay

    fs.put("zzzyyy11", b"one")
    assert fs.put_if_absent("abcxyz11", b"two") is True
    fs.put("tttuuu11", b"three")
    assert {m.name for m in fs.list()} == {"abcdefgh", "zzzyyy11", "abcxyz11", "tttuuu11"}
    assert {m.name for m in fs.list("zzz")} == {"zzzyyy11"}
    assert [fs.get(n) for n in ["zzzyyy11", "abcxyz11", "tttuuu11"]] == [b"one", b"two", b"three"]


def test_age_is_measured_from_now_on_the_storage_clock(fs, root):
    """Only what is older than ``now - older_than`` goes: the machine's own clock plays no part."""
    fs.put("abcdefgh", b"x")
    fs.delete("abcdefgh")
    write(root / (TEMP_PREFIX + "at-cutoff"), b"kept", mtime=OLD)
    write(root / (TEMP_PREFIX + "before-cutoff"), b"gone", mtime=OLD - 1)
    age(root / "abc" / "def", OLD)
    age(root / "abc", OLD - 1)
    assert fs.reclaim_leftovers(OLD + 99, 100) == NOTHING  # in 2020 all of it was young
    # at the cutoff is not older than it: abc/def stays, so abc (not empty) stays too
    assert fs.reclaim_leftovers(OLD + 100, 100) == {"temp_files": 1, "temp_bytes": 4, "directories": 0}
    assert sorted(os.listdir(root)) == [TEMP_PREFIX + "at-cutoff", "abc"]
    assert fs.reclaim_leftovers(OLD + 100.5, 100) == {"temp_files": 1, "temp_bytes": 4, "directories": 2}
    assert os.listdir(root) == []


def test_reclaim_in_a_vanished_root_is_unreachable(fs, root):
    os.rmdir(root)
    with pytest.raises(StorageUnreachable, match="no longer exists"):
        fs.reclaim_leftovers(FAR_FUTURE, 0)
    assert not root.exists()


# ---------------------------------------------------------------- filesystem: puts racing a reclaim


def reclaim_everything(fs, removed: list[dict]) -> None:
    removed.append(fs.reclaim_leftovers(FAR_FUTURE, 0))


def total(removed: list[dict], kind: str) -> int:
    return sum(r[kind] for r in removed)


@pytest.mark.parametrize("fsync", [True, False])
def test_put_makes_directories_again_when_reclaimed_before_its_temp_file(root, monkeypatch, fsync):
    """A reclaim between the put's mkdirs and the creation of its temp file removes them, empty."""
    fs = FilesystemStorage(root, create=True, fsync=fsync)
    removed, real_open = [], os.open

    def open_after_a_reclaim(path, *args, **kwargs):
        if os.path.basename(path).startswith(TEMP_PREFIX) and len(removed) < PUT_ATTEMPTS - 1:
            reclaim_everything(fs, removed)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_a_reclaim)
    fs.put("abcdefgh", b"payload")
    assert total(removed, "directories") == 2 * (PUT_ATTEMPTS - 2)  # the first open found none to remove
    assert fs.put_if_absent("abcdefgh", b"other") is False
    monkeypatch.undo()
    assert fs.get("abcdefgh") == b"payload"
    assert [m.name for m in fs.list()] == ["abcdefgh"]


def test_put_gives_up_when_its_directories_keep_vanishing(fs, root, monkeypatch):
    removed, real_open = [], os.open

    def open_after_a_reclaim(path, *args, **kwargs):
        if os.path.basename(path).startswith(TEMP_PREFIX):
            reclaim_everything(fs, removed)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_a_reclaim)
    with pytest.raises(StorageError, match="cannot put blob 'abcdefgh'") as info:
        fs.put("abcdefgh", b"payload")
    assert not isinstance(info.value, StorageUnreachable)  # the root is still there
    assert len(removed) == PUT_ATTEMPTS + 1
    monkeypatch.undo()
    assert root.is_dir() and os.listdir(root) == []


@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.parametrize("when", ["between the two mkdirs", "after the second mkdir"])
def test_put_survives_its_first_level_directory_vanishing(root, monkeypatch, fsync, when):
    """Before the second mkdir, a reclaim removes an old, empty first level the put found there;
    after it, one removes both levels before the second is fsynced into the first."""
    fs = FilesystemStorage(root, create=True, fsync=fsync)
    (root / "abc").mkdir()
    age(root / "abc")
    removed, real_mkdir = [], os.mkdir
    level2 = os.path.join(fs.root, "abc", "def")

    def mkdir_raced(path, *args, **kwargs):
        if path == level2 and not removed and when == "between the two mkdirs":
            reclaim_everything(fs, removed)
        real_mkdir(path, *args, **kwargs)
        if path == level2 and not removed and when == "after the second mkdir":
            reclaim_everything(fs, removed)

    monkeypatch.setattr(os, "mkdir", mkdir_raced)
    fs.put("abcdefgh", b"payload")
    assert total(removed, "directories") == (1 if when == "between the two mkdirs" else 2)
    monkeypatch.undo()
    assert fs.get("abcdefgh") == b"payload"
    assert directories(root) == {"abc", os.path.join("abc", "def")}


@pytest.mark.parametrize("method", ["put", "put_if_absent"])
def test_put_writes_again_when_its_temp_file_is_reclaimed(fs, root, monkeypatch, method):
    """Only a cutoff shorter than the put can do this; the put starts again and leaves no litter."""
    move = "replace" if method == "put" else "link"
    removed, real_move = [], getattr(os, move)

    def move_after_a_reclaim(src, dst, *args, **kwargs):
        if len(removed) < 2:
            reclaim_everything(fs, removed)
        return real_move(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, move, move_after_a_reclaim)
    assert getattr(fs, method)("abcdefgh", b"payload") in (None, True)
    monkeypatch.undo()
    assert total(removed, "temp_files") == 2 and total(removed, "temp_bytes") == 14
    assert total(removed, "directories") == 4
    assert fs.get("abcdefgh") == b"payload"
    assert files(root).keys() == {os.path.join("abc", "def", "abcdefgh")}


def test_delete_survives_its_directory_being_reclaimed(fs, root, monkeypatch):
    """The delete empties the directory; a reclaim removes it before the delete fsyncs it."""
    fs.put("abcdefgh", b"x")
    removed, real_unlink = [], os.unlink
    blob = os.path.join(fs.root, "abc", "def", "abcdefgh")

    def unlink_then_reclaim(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if path == blob:
            reclaim_everything(fs, removed)

    monkeypatch.setattr(os, "unlink", unlink_then_reclaim)
    fs.delete("abcdefgh")
    monkeypatch.undo()
    assert total(removed, "directories") == 2
    assert not fs.exists("abcdefgh") and os.listdir(root) == []


@pytest.mark.parametrize("prefix", ["", "a", "abc", "abcx"])
def test_listing_skips_directories_reclaimed_while_it_reads(fs, root, monkeypatch, prefix):
    """A listing reads a directory, then a subdirectory it found there, which a reclaim removed
    in between: empty, so it holds no blob the listing misses."""
    fs.put("abcdefgh", b"kept")
    fs.put("abcxyz00", b"deleted")
    fs.delete("abcxyz00")
    fs.put("azzyyy00", b"deleted")
    fs.delete("azzyyy00")  # azz/yyy and azz are empty
    removed, real_scandir, raced = [], os.scandir, set()
    reclaimed_first = {os.path.join(fs.root, "abc", "xyz"), os.path.join(fs.root, "azz")}

    def scandir_after_a_reclaim(path):
        if path in reclaimed_first and path not in raced:
            raced.add(path)
            reclaim_everything(fs, removed)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_a_reclaim)
    assert {m.name for m in fs.list(prefix)} == ({"abcdefgh"} if prefix != "abcx" else set())
    monkeypatch.undo()
    assert raced and total(removed, "directories") >= 1
    assert directories(root) == {"abc", os.path.join("abc", "def")}


@pytest.mark.parametrize("fsync", [True, False])
def test_puts_and_reclaims_in_two_threads(root, fsync):
    """One thread puts new names into six shard directories (both levels shared), reads and lists
    them; after each round it deletes them, leaves a stale temp file in each, and makes the
    directories old. Meanwhile another thread reclaims in a loop, with ``older_than=0`` and its
    clock just past that age, so these directories go, racing the next round's puts, while
    whatever the puts make stays young. Every call succeeds, every blob reads back, and the last
    round is all that is left.

    (Against the real current time a zero margin would also take the directories each put has
    just made, once the filesystem's timestamp ticks, and a put can lose every attempt.)"""
    fs = FilesystemStorage(root, create=True, fsync=fsync)
    maintenance = FilesystemStorage(root, fsync=False)  # another client of the same directory
    rounds = 20 if fsync else 100  # each fsync takes milliseconds
    shards = [a + b for a in ("aaa", "bbb", "ccc") for b in ("ddd", "eee")]
    done, failures, removed = threading.Event(), [], []

    def unless_reclaimed(act, path) -> None:
        # a reclaim that found the directory old may remove it once empty again, after the deletes
        try:
            act(path)
        except FileNotFoundError:
            pass

    def writer():
        try:
            for r in range(rounds):
                names = [f"{shard}-{r}-{i}" for shard in shards for i in range(2)]
                for i, name in enumerate(names):
                    data = name.encode() * 10
                    if i % 2:
                        assert fs.put_if_absent(name, data) is True, name
                    else:
                        fs.put(name, data)
                    assert fs.get(name) == data, name
                assert {m.name for m in fs.list()} == set(names)
                assert {m.name for m in fs.list(shards[0][:4])} == {n for n in names if n.startswith(shards[0])}
                if r == rounds - 1:
                    break
                for name in names:
                    fs.delete(name)
                level2s, level1s = [root / s[:3] / s[3:] for s in shards], {root / s[:3] for s in shards}
                for directory in level2s:
                    unless_reclaimed(lambda p: write(p, b"cut"), directory / f"{TEMP_PREFIX}stale-{r}")
                for directory in level2s + sorted(level1s):
                    unless_reclaimed(age, directory)
        except BaseException:
            failures.append(traceback.format_exc())
        finally:
            done.set()

    def reclaimer():
        try:
            while not done.is_set():
                removed.append(maintenance.reclaim_leftovers(OLD + 1, 0))
        except BaseException:
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=writer), threading.Thread(target=reclaimer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert total(removed, "directories") > 0  # the reclaims did remove directories the puts used
    maintenance.reclaim_leftovers(OLD + 1, 0)  # the stale temp files the loop had no time for
    last = {f"{shard}-{rounds - 1}-{i}" for shard in shards for i in range(2)}
    assert {m.name for m in fs.list()} == last
    assert all(fs.get(name) == name.encode() * 10 for name in last)
    assert len(files(root)) == len(last)  # no temp file left


# ---------------------------------------------------------------- S3


@pytest.fixture
def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = S3Storage(bucket, prefix="repo", endpoint_url=endpoint)
    yield storage
    storage.close()


def uploads(client, bucket) -> dict[str, float]:
    """Unfinished multipart uploads in the bucket: key -> initiation time (the server's clock)."""
    listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["Key"]: u["Initiated"].timestamp() for u in listed}


def start_upload(client, bucket, key: str) -> str:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"part one")
    return upload_id


def test_s3_aborts_stale_multipart_uploads_under_its_prefix(s3, moto_client):
    bucket = s3.bucket
    s3.put("abcdefgh", b"a blob")
    mine = ["repo/cut-pack-1", "repo/cut-pack-2"]
    foreign = ["other/cut-pack", "repo-two/cut-pack", "repo/nested/cut-pack", "repo/.hidden"]
    for key in mine + foreign:
        start_upload(moto_client, bucket, key)
    initiated = uploads(moto_client, bucket)  # moto dates every upload alike; real S3 would not
    started = max(initiated.values())

    # young against the server's own initiation time: kept
    assert s3.reclaim_leftovers(started + 60, HOUR) == {"multipart_uploads": 0}
    assert uploads(moto_client, bucket).keys() == set(mine + foreign)
    # old: aborted, but only the blob names under this storage's prefix
    assert s3.reclaim_leftovers(started + 2 * HOUR, HOUR) == {"multipart_uploads": 2}
    assert uploads(moto_client, bucket).keys() == set(foreign)
    assert s3.reclaim_leftovers(FAR_FUTURE, 0) == {"multipart_uploads": 0}
    assert s3.get("abcdefgh") == b"a blob"
    assert [m.name for m in s3.list()] == ["abcdefgh"]


def test_s3_reclaim_reads_every_page_and_skips_uploads_already_gone(s3, moto_client, monkeypatch):
    """Pages of one upload each (moto never splits them); an upload that another reclaim aborted
    after the listing is not counted."""
    keys = [f"repo/cut-pack-{i}" for i in range(5)]
    ids = {key: start_upload(moto_client, s3.bucket, key) for key in keys}
    moto_client.abort_multipart_upload(Bucket=s3.bucket, Key=keys[2], UploadId=ids[keys[2]])
    initiated = moto_client.list_multipart_uploads(Bucket=s3.bucket)["Uploads"][0]["Initiated"]
    listed = [{"Key": key, "UploadId": ids[key], "Initiated": initiated} for key in keys]
    requests = []

    def one_per_page(**params):
        requests.append(params)
        at = [u["Key"] for u in listed].index(params["KeyMarker"]) + 1 if "KeyMarker" in params else 0
        page = {"IsTruncated": at + 1 < len(listed), "Uploads": listed[at:at + 1]}
        if page["IsTruncated"]:
            page.update(NextKeyMarker=listed[at]["Key"], NextUploadIdMarker=listed[at]["UploadId"])
        return page

    monkeypatch.setattr(s3._client, "list_multipart_uploads", one_per_page)
    assert s3.reclaim_leftovers(FAR_FUTURE, 0) == {"multipart_uploads": 4}
    assert len(requests) == 5 and all(r["Prefix"] == "repo/" for r in requests)
    monkeypatch.undo()
    assert uploads(moto_client, s3.bucket) == {}


def test_s3_reclaim_translates_errors(s3, monkeypatch):
    from botocore.exceptions import ClientError

    def throttled(**params):
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "ListMultipartUploads")

    monkeypatch.setattr(s3._client, "list_multipart_uploads", throttled)
    with pytest.raises(RetryableStorageError, match="reclaim leftovers of s3://.*SlowDown"):
        s3.reclaim_leftovers(FAR_FUTURE, 0)
    monkeypatch.setattr(s3._client, "list_multipart_uploads", lambda **params: {})  # a reply cut short
    with pytest.raises(RetryableStorageError, match="incomplete reply"):
        s3.reclaim_leftovers(FAR_FUTURE, 0)


def test_s3_reclaim_in_a_missing_bucket_is_unreachable(moto_server):
    storage = S3Storage("kdist-no-such-bucket", endpoint_url=moto_server)
    with pytest.raises(StorageUnreachable, match="does not exist"):
        storage.reclaim_leftovers(FAR_FUTURE, 0)


# ---------------------------------------------------------------- memory and the wrappers


def test_memory_has_nothing_to_reclaim():
    storage = MemoryStorage(clock=lambda: OLD)
    storage.put("abcdefgh", b"x")
    assert storage.reclaim_leftovers(FAR_FUTURE, 0) == {}
    assert storage.get("abcdefgh") == b"x"


@pytest.mark.parametrize("wrap", [StorageWrapper, CountingStorage, FaultInjectingStorage,
                                  lambda inner: RetryingStorage(inner, sleep=lambda s: None)])
def test_wrappers_pass_the_reclaim_on(fs, root, wrap):
    write(root / (TEMP_PREFIX + "cut"), b"12345")
    assert wrap(fs).reclaim_leftovers(OLD + HOUR, 60) == {"temp_files": 1, "temp_bytes": 5, "directories": 0}
    assert os.listdir(root) == []


def test_retrying_storage_retries_a_reclaim(fs, root):
    class Flaky(StorageWrapper):
        calls = 0

        def reclaim_leftovers(self, now, older_than):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RetryableStorageError("dropped")
            return super().reclaim_leftovers(now, older_than)

    write(root / (TEMP_PREFIX + "cut"), b"12345")
    retrying = RetryingStorage(Flaky(fs), sleep=lambda s: None)
    assert retrying.reclaim_leftovers(FAR_FUTURE, 0)["temp_files"] == 1
    assert Flaky.calls == 2


def test_read_only_storage_refuses_to_reclaim(fs, root):
    write(root / (TEMP_PREFIX + "cut"), b"12345")
    with pytest.raises(ReadOnlyError, match="read-only"):
        ReadOnlyStorage(fs).reclaim_leftovers(FAR_FUTURE, 0)
    assert os.listdir(root) == [TEMP_PREFIX + "cut"]
