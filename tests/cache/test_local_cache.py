"""The local cache: a warm cache downloads no index blob twice, a damaged, deleted or foreign
cache file is fetched again and never trusted, compaction fetches only the new set and drops
what it replaced, the cache may vanish mid-run, and its size is bounded. On the filesystem and
on S3 (moto's server over HTTP)."""

from __future__ import annotations

import os
import shutil
import threading
import uuid

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import constants as C  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.local_cache import INDEX_DIR, STALE_GRACE, CacheSettings  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402
from repo_format.storage.wrappers import StorageWrapper  # noqa: E402

PASSWORD = "cache-test-password"
SMALL = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024,
                             chunk_avg=1024, chunk_min=256, chunk_max=4096)


class GetLog(StorageWrapper):
    """Records the name of every blob read (whole or in part)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.gets: list[str] = []
        self._lock = threading.Lock()

    def get(self, name, offset=0, length=-1):
        with self._lock:
            self.gets.append(name)
        return self.inner.get(name, offset, length)

    def index_gets(self) -> list[str]:
        return [n for n in self.gets if n.startswith((C.INDEX_PREFIX, C.COMPACTED_PREFIX, C.RANGE_PREFIX))]


@pytest.fixture(params=["fs", "s3"])
def storage(request, tmp_path):
    if request.param == "fs":
        return open_storage(str(tmp_path / "repo"), create=True)
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/{uuid.uuid4().hex[:8]}", endpoint_url=endpoint)


@pytest.fixture
def settings(tmp_path) -> CacheSettings:
    return CacheSettings(base=tmp_path / "cache")


def create(storage) -> Repository:
    return Repository.create(storage, PASSWORD, SMALL, KdfParams.weak_for_tests())


def opened(storage, settings: CacheSettings | None) -> tuple[Repository, GetLog]:
    log = GetLog(storage)
    return Repository.open(log, PASSWORD, heartbeat_thread=False, cache=settings), log


def write_batches(storage, batches: int, tag: str) -> list[bytes]:
    """Another client writes ``batches`` index blobs (one flush each); returns the ids."""
    repo = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    ids = []
    for b in range(batches):
        for i in range(3):
            ids.append(repo.contents.write(f"{tag} batch {b} content {i}".encode() * 50))
        repo.flush()
    repo.close()
    return ids


def assert_all_found(repo: Repository, ids: list[bytes]) -> None:
    for cid in ids:
        e = repo.contents.lookup(cid)
        assert e is not None and not e.deleted, cid.hex()


def test_a_warm_cache_downloads_no_index_blob_twice(storage, settings):
    create(storage).close()
    ids = write_batches(storage, 3, "first")
    cold, log = opened(storage, settings)
    assert_all_found(cold, ids)
    first = log.index_gets()
    assert len(first) == 3 and len(set(first)) == 3

    ids += write_batches(storage, 2, "second")
    warm, log = opened(storage, settings)  # a new process on the same host
    assert_all_found(warm, ids)
    assert len(log.index_gets()) == 2 and not set(log.index_gets()) & set(first)

    again, log = opened(storage, settings)
    assert_all_found(again, ids)
    assert log.index_gets() == []
    assert again.cache.stats.index_hits == 5


def test_a_reload_fetches_only_new_blobs_even_without_a_cache(storage):
    """Within one process (shard mode's parts share their actor's repository): each reload
    fetches only the blobs it has not read, so requests grow with the blobs, not blobs x parts."""
    create(storage).close()
    repo, log = opened(storage, None)
    ids = []
    for part in range(6):
        ids += write_batches(storage, 1, f"part {part}")
        repo.contents.refresh_index()
    assert_all_found(repo, ids)
    assert sorted(log.index_gets()) == sorted(set(log.index_gets()))
    assert len(log.index_gets()) == 6


def _index_file(settings: CacheSettings, repo: Repository, name: str):
    return settings.directory(repo.format.unique_id) / INDEX_DIR / name


def test_a_damaged_deleted_or_renamed_cache_file_is_fetched_again_and_never_trusted(storage, settings):
    create(storage).close()
    ids = write_batches(storage, 3, "data")
    warm, _ = opened(storage, settings)
    assert_all_found(warm, ids)
    names = sorted(warm.contents.epochs.loaded_names())
    damaged, deleted, renamed = (_index_file(settings, warm, n) for n in names)

    raw = bytearray(damaged.read_bytes())
    raw[-9] ^= 0x01  # inside the key array: a lookup could miss what the index holds
    damaged.write_bytes(bytes(raw))
    deleted.unlink()
    renamed.write_bytes(_index_file(settings, warm, names[0]).read_bytes())  # another blob's copy

    repo, log = opened(storage, settings)
    assert_all_found(repo, ids)
    assert sorted(log.index_gets()) == names  # all three fetched again from the repository
    assert repo.cache.stats.discarded == 2  # the damaged and the renamed one failed authentication
    after, log = opened(storage, settings)  # and the cache holds good copies again
    assert_all_found(after, ids)
    assert log.index_gets() == []


def test_a_cache_of_another_repository_is_never_used(tmp_path, settings):
    a_storage = open_storage(str(tmp_path / "a"), create=True)
    b_storage = open_storage(str(tmp_path / "b"), create=True)
    create(a_storage).close()
    create(b_storage).close()
    write_batches(a_storage, 2, "a")
    b_ids = write_batches(b_storage, 2, "b")
    a, _ = opened(a_storage, settings)
    a.contents.committed
    b, _ = opened(b_storage, settings)
    b.contents.committed
    a_dir, b_dir = (settings.directory(r.format.unique_id) for r in (a, b))
    assert a_dir != b_dir  # one directory per repository id
    # someone copies A's cache over B's, under B's file names
    b_names = sorted(os.listdir(b_dir / INDEX_DIR))
    for name, src in zip(b_names, sorted(os.listdir(a_dir / INDEX_DIR))):
        shutil.copyfile(a_dir / INDEX_DIR / src, b_dir / INDEX_DIR / name)
    repo, log = opened(b_storage, settings)
    assert_all_found(repo, b_ids)
    assert sorted(log.index_gets()) == b_names
    assert repo.cache.stats.discarded == len(b_names)


def test_compaction_fetches_the_new_set_and_drops_what_it_replaced(storage, settings):
    create(storage).close()
    ids = write_batches(storage, 4, "raw")
    warm, _ = opened(storage, settings)
    assert_all_found(warm, ids)
    raw_names = warm.contents.epochs.loaded_names()
    assert len(raw_names) == 4
    # maintenance compacts epoch 0 into a set (written here directly, as compaction does)
    entries = warm.contents.epochs.read_entries(sorted(raw_names))
    compacted = warm.contents.epochs.write_set(C.COMPACTED_PREFIX, 0, entries)
    for name in raw_names:  # old enough that no other process is about to open them
        path = _index_file(settings, warm, name)
        os.utime(path, (path.stat().st_atime - 2 * STALE_GRACE,) * 2)

    repo, log = opened(storage, settings)
    assert_all_found(repo, ids)
    assert log.index_gets() == [compacted.signature.name] + compacted.names()  # its signature, then the set
    left = set(os.listdir(settings.directory(repo.format.unique_id) / INDEX_DIR))
    assert left == set(compacted.names())


def test_the_cache_deleted_mid_run_costs_requests_not_the_run(storage, settings, tmp_path):
    create(storage).close()
    ids = write_batches(storage, 2, "before")
    repo, log = opened(storage, settings)
    assert_all_found(repo, ids)
    own = [repo.contents.write(b"written by the running backup %d" % i, metadata=True) for i in range(5)]
    repo.flush()
    shutil.rmtree(settings.base)  # `kdist cache clear`, or a tmp cleaner, while we run
    more = write_batches(storage, 1, "meanwhile")
    repo.contents.refresh_index()
    own.append(repo.contents.write(b"after the cache vanished", metadata=True))
    assert repo.contents.revalidate() == 0
    repo.close()
    assert_all_found(repo, ids + more + own)
    for cid in own:  # contents read back from the repository, and cached again
        assert repo.contents.read(cid).startswith((b"written by", b"after the"))
    fresh, log = opened(storage, settings)
    assert_all_found(fresh, ids + more + own)
    assert fresh.cache.stats.errors == 0


def test_a_damaged_cached_directory_is_read_from_the_repository(storage, settings):
    create(storage).close()
    repo, _ = opened(storage, settings)
    cid = repo.contents.write(b"a directory object" * 20, metadata=True)
    repo.close()
    path = settings.directory(repo.format.unique_id) / "contents" / cid.hex()[:2] / cid.hex()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))

    reader, log = opened(storage, settings)
    assert reader.contents.read(cid) == b"a directory object" * 20
    assert any(n.startswith(C.METADATA_PACK_PREFIX) for n in log.gets)  # fetched from its pack
    assert reader.cache.stats.discarded == 1
    again, log = opened(storage, settings)
    assert again.contents.read(cid) == b"a directory object" * 20
    assert not any(n.startswith(C.METADATA_PACK_PREFIX) for n in log.gets)  # the good copy cached


def test_the_limit_evicts_directories_before_the_index(tmp_path, settings):
    storage = open_storage(str(tmp_path / "repo"), create=True)
    create(storage).close()
    repo, _ = opened(storage, settings)
    for i in range(40):
        repo.contents.write(os.urandom(3000), metadata=True)
    repo.close()
    ids = write_batches(storage, 2, "more")
    bounded, log = opened(storage, settings)
    assert_all_found(bounded, ids)
    usage = bounded.cache.usage()
    assert usage["content_files"] == 40 and usage["index_files"] == 3
    bounded.cache.limit = usage["index_bytes"] + usage["contents_bytes"] // 2
    bounded.trim_cache()
    after = bounded.cache.usage()
    assert after["total_bytes"] <= bounded.cache.limit
    assert 15 <= after["content_files"] <= 20  # the least recently used half went
    assert after["index_files"] == 3  # the index in use stays


def test_a_mapped_copy_reads_exactly_as_the_blob_it_was_made_from(tmp_path):
    """Entries, pack names (decoded lazily from the stored offsets) and keys of a cached copy
    equal the original's; a copy under another name, or with any byte changed, is refused."""
    import random

    from repo_format.index import IndexBlob, IndexEntry, encode_index
    from repo_format.local_cache import LocalCache

    rnd = random.Random(7)
    packs = [("p" if i % 2 else "q") + f"{i:015x}" + "-" + "ab" * 8 for i in range(30)]
    entries = [IndexEntry(rnd.randbytes(32), rnd.choice(packs), rnd.randrange(2**31), rnd.randrange(1, 2**20),
                          rnd.randrange(2**20), rnd.choice([0, 1]), rnd.randrange(2**50), rnd.random() < 0.1)
               for _ in range(500)]
    original = IndexBlob(encode_index(entries))
    cache = LocalCache(tmp_path / "c" / ("ab" * 16), b"\xab" * 16, b"k" * 32)
    mapped = cache.store_index("xn0_00-11", original)
    assert list(mapped) == list(original)
    assert list(mapped.packs) == list(original.packs) and len(mapped.packs) == 30
    assert list(mapped.keys) == original.entry_keys().tolist()
    for e in entries[::7]:
        assert mapped.lookup(e.content_id) == original.lookup(e.content_id)
    path = cache.directory / INDEX_DIR / "xn0_00-11"
    good = path.read_bytes()
    shutil.copyfile(path, cache.directory / INDEX_DIR / "xn0_00-22")
    assert cache.index_blob("xn0_00-22") is None  # the MAC binds the name
    for at in (3, 60, len(good) // 2, len(good) - 1):  # header, plaintext, keys, pack offsets
        damaged = bytearray(good)
        damaged[at] ^= 0x10
        path.write_bytes(bytes(damaged))
        assert cache.index_blob("xn0_00-11") is None and not path.exists()
    other = LocalCache(tmp_path / "c" / ("ab" * 16), b"\xab" * 16, b"K" * 32)  # another repository's key
    path.write_bytes(good)
    assert other.index_blob("xn0_00-11") is None


def test_manifests_and_epoch_markers_are_fetched_once_and_checked_every_time(storage, settings):
    create(storage).close()
    writer = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    assert writer.contents.epochs.write_marker(1) and writer.contents.epochs.write_marker(2)
    for i in range(3):
        writer.manifests.put({"type": "snapshot", "n": str(i)}, b"payload %d" % i)
    cold, log = opened(storage, settings)
    assert len(cold.manifests.find(type="snapshot")) == 3 and cold.contents.epochs.refresh().current == 2
    fetched = [n for n in log.gets if n.startswith((C.MANIFEST_PREFIX, C.EPOCH_MARKER_PREFIX))]
    assert len(fetched) == 6  # three manifests; the markers of epochs 0 (repo create), 1 and 2
    warm, log = opened(storage, settings)
    assert len(warm.manifests.find(type="snapshot")) == 3 and warm.contents.epochs.refresh().current == 2
    assert log.gets == [C.FORMAT_BLOB_NAME]  # nothing but the format blob
    blobs = settings.directory(warm.format.unique_id) / "blobs"
    for name in (_marker_file(blobs, 2), sorted(n for n in os.listdir(blobs) if n.startswith(C.MANIFEST_PREFIX))[0]):
        raw = bytearray((blobs / name).read_bytes())
        raw[-1] ^= 0x01
        (blobs / name).write_bytes(bytes(raw))
    writer.manifests.delete([writer.manifests.find(n="1")[0].id])
    again, log = opened(storage, settings)
    assert sorted(r.labels["n"] for r in again.manifests.find(type="snapshot")) == ["0", "2"]
    assert again.contents.epochs.refresh().current == 2
    assert len([n for n in log.gets if n != C.FORMAT_BLOB_NAME]) == 3  # the two damaged, the tombstone
    assert again.cache.stats.discarded == 2


def test_a_mapped_file_changed_in_place_is_caught_by_the_next_load(storage, settings):
    """A process maps a cache file once; its pages are the file's. Every load (each refresh,
    the revalidation before publishing) authenticates the mapped files again, so a change made
    in place after mapping never reaches a decision to publish."""
    create(storage).close()
    ids = write_batches(storage, 2, "data")
    repo, log = opened(storage, settings)
    assert_all_found(repo, ids)
    name = sorted(repo.contents.epochs.loaded_names())[0]
    path = _index_file(settings, repo, name)
    with open(path, "r+b") as f:  # in place: the mapping sees it
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))
    log.gets.clear()
    assert repo.contents.revalidate() == 0
    assert log.index_gets() == [name]  # dropped and fetched again
    assert repo.cache.stats.discarded == 1
    assert_all_found(repo, ids)


def _marker_file(blobs, epoch: int) -> str:
    """The cached copy of epoch ``epoch``'s (signed) marker ``xe<epoch>_<16 hex>``."""
    (name,) = [n for n in os.listdir(blobs) if n.startswith(f"{C.EPOCH_MARKER_PREFIX}{epoch}_")]
    return name


def test_a_damaged_marker_copy_that_cannot_be_deleted_is_read_from_the_repository(tmp_path, settings, monkeypatch):
    storage = open_storage(str(tmp_path / "repo"), create=True)
    create(storage).close()
    writer = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    assert writer.contents.epochs.write_marker(1)
    first, _ = opened(storage, settings)
    assert first.contents.epochs.refresh().current == 1
    blobs = settings.directory(first.format.unique_id) / "blobs"
    copy = blobs / _marker_file(blobs, 1)
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0x01
    copy.write_bytes(bytes(raw))

    def refuse(self, *a, **k):
        raise PermissionError(13, "read-only cache")

    monkeypatch.setattr("pathlib.Path.unlink", refuse)  # a cache this user cannot write
    repo, log = opened(storage, settings)
    assert repo.contents.epochs.refresh().current == 1
    assert copy.name in log.gets and copy.exists()
