"""The content store: dedup, write ordering (packs before the index naming them), threads,
pending reads, failed uploads and compression choice."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from dataclasses import replace

import pytest

from repo_format import clock
from repo_format import constants as C
from repo_format.content import load_committed_index
from repo_format.errors import ContentNotFound, StorageError
from repo_format.index import open_index
from repo_format.index_rebuild import entries_from_packs
from repo_format.repository import Repository


def _stored_ids(storage, fmt) -> Counter:
    """How many records each content id has across all packs (from the packs themselves)."""
    result = entries_from_packs(storage, fmt)
    assert result.damaged_packs == {}
    return Counter(e.content_id for e in result.entries)


def test_same_data_is_stored_once(repo, reopen):
    data = b"the same bytes " * 100
    a = repo.contents.write(data)
    b = repo.contents.write(data)  # pending: deduplicated against the open pack
    assert a == b == repo.contents.reference(data)
    assert (repo.contents.stats.contents_written, repo.contents.stats.contents_deduplicated) == (1, 1)
    repo.flush()
    assert repo.contents.write(data) == a  # committed: deduplicated against the index
    assert repo.contents.stats.contents_deduplicated == 2
    assert repo.flush() is None  # nothing new: no index blob

    other = reopen(repo.storage)  # another client sees the committed index
    assert other.contents.write(data) == a
    assert (other.contents.stats.contents_written, other.contents.stats.contents_deduplicated) == (0, 1)
    assert other.flush() is None
    assert _stored_ids(repo.storage, repo.format) == Counter({a: 1})
    assert len(list(repo.storage.list(C.INDEX_PREFIX))) == 1


def test_stats_count_bytes(repo):
    datas = [os.urandom(100), bytes(5000), b"x"]
    for d in datas:
        repo.contents.write(d)
    s = repo.contents.stats
    assert s.bytes_original == sum(map(len, datas))
    assert s.bytes_packed == sum(repo.contents.lookup(repo.contents.reference(d)).packed_length for d in datas)
    repo.flush()
    assert (s.packs_written, s.index_blobs_written) == (1, 1)


def test_flush_puts_packs_before_the_index_blob_naming_them(make_repo, observed_storage):
    storage = observed_storage()
    repo = make_repo(storage)
    rnd = random.Random(2)
    for _ in range(4):
        for _ in range(60):  # ~180 KB per round: packs fill (uploaded by write) and flush uploads the rest
            repo.contents.write(rnd.randbytes(rnd.randrange(1, 6000)), metadata=rnd.random() < 0.2)
        repo.flush()
    aead = repo.format.keys.index_aead()
    index_positions = [i for i, n in enumerate(storage.puts) if n.startswith(C.INDEX_PREFIX)]
    assert len(index_positions) == 4
    named = set()
    for i in index_positions:
        name = storage.puts[i]
        blob = open_index(aead, name, storage.get(name))
        assert blob.packs
        for pack in blob.packs:
            assert pack in storage.puts[:i], f"index {name} names pack {pack} not yet put"
        named.update(blob.packs)
    packs = {n for n in storage.puts if n[0] in (C.DATA_PACK_PREFIX, C.METADATA_PACK_PREFIX)}
    assert named == packs and len(packs) >= 8  # every pack is indexed, no orphan
    assert any(p.startswith(C.METADATA_PACK_PREFIX) for p in packs)


def test_many_threads_with_overlapping_data(make_repo, reopen):
    repo = make_repo()
    nthreads, per_thread, stride = 8, 200, 100

    def data_for(k: int) -> bytes:
        return b"%06d:" % k + random.Random(k).randbytes(k % 700)

    barrier = threading.Barrier(nthreads)
    results: dict[int, list[tuple[int, bytes]]] = {}
    errors = []

    def worker(t: int):
        try:
            barrier.wait()
            results[t] = [(k, repo.contents.write(data_for(k))) for k in range(t * stride, t * stride + per_thread)]
        except Exception as exc:  # reported below; a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    distinct = (nthreads - 1) * stride + per_thread
    ids = {k: cid for rs in results.values() for k, cid in rs}
    assert len(ids) == distinct and len(set(ids.values())) == distinct
    for k, cid in ids.items():  # readable while pending or in uploaded, unindexed packs
        assert repo.contents.read(cid) == data_for(k)
    repo.flush()

    stats = repo.contents.stats
    assert stats.contents_written == distinct
    assert stats.contents_written + stats.contents_deduplicated == nthreads * per_thread
    assert _stored_ids(repo.storage, repo.format) == Counter({cid: 1 for cid in ids.values()})
    fresh = reopen(repo.storage)
    for k, cid in ids.items():
        assert fresh.contents.read(cid) == data_for(k)


def test_pending_contents_read_back_before_flush(repo):
    small = b"pending in an open pack " * 10
    a = repo.contents.write(small)
    assert list(repo.storage.list("p")) == []
    assert repo.contents.read(a) == small
    # Fill packs so some are uploaded (stored but not yet in an index blob).
    rnd = random.Random(4)
    more = {repo.contents.write(d): d for d in (rnd.randbytes(4000) for _ in range(40))}
    assert len(list(repo.storage.list("p"))) >= 1 and list(repo.storage.list(C.INDEX_PREFIX)) == []
    for cid, d in more.items():
        assert repo.contents.read(cid) == d
    assert repo.contents.contains(a)
    with pytest.raises(ContentNotFound):
        repo.contents.read(b"\0" * 32)


def test_failed_pack_upload_is_reported_and_not_deduplicated(make_repo, observed_storage, password):
    storage = observed_storage(fail_on=lambda name, attempt: name.startswith(C.DATA_PACK_PREFIX)
                               and not storage.failed)  # only the first pack put fails
    repo = make_repo(storage)
    data = b"lost with its pack " * 50
    cid = repo.contents.write(data)
    with pytest.raises(StorageError, match="injected"):
        repo.flush()
    assert storage.failed and list(storage.inner.list(C.DATA_PACK_PREFIX)) == []
    assert list(storage.inner.list(C.INDEX_PREFIX)) == []
    assert not repo.contents.contains(cid)
    with pytest.raises(ContentNotFound):
        repo.contents.read(cid)

    assert repo.contents.write(data) == cid  # stored again, not deduplicated against the lost pack
    assert (repo.contents.stats.contents_written, repo.contents.stats.contents_deduplicated) == (2, 0)
    assert repo.contents.read(cid) == data
    # This store handed out an id for a lost content: flush keeps failing (so nothing that
    # refers to it is published), but what it did store is indexed, for the next run to reuse.
    with pytest.raises(StorageError, match="failed to upload"):
        repo.flush()
    stored = {m.name for m in storage.inner.list(C.DATA_PACK_PREFIX)}
    index = Repository.open(storage, password).contents.epochs.load_index()
    assert stored and {e.pack for e in index.physical_entries()} == stored

    second = Repository.open(storage, password)  # a new client reuses the stored copy
    assert second.contents.write(data) == cid
    assert (second.contents.stats.contents_written, second.contents.stats.contents_deduplicated) == (0, 1)
    assert Repository.open(storage, password).contents.read(cid) == data


def test_failed_upload_of_a_full_pack_fails_the_write(make_repo, observed_storage):
    storage = observed_storage(fail_on=lambda name, attempt: name.startswith(C.DATA_PACK_PREFIX))
    repo = make_repo(storage)
    written, rnd = {}, random.Random(9)
    with pytest.raises(StorageError, match="injected"):
        for _ in range(100):  # 100 x 4 KB > one 64 KiB pack: the write that fills it uploads it
            d = rnd.randbytes(4000)
            written[repo.contents.write(d)] = d
    assert written and all(not repo.contents.contains(c) for c in written)
    with pytest.raises(StorageError):
        repo.flush()


def test_failed_index_put_keeps_the_entries_for_the_next_flush(make_repo, observed_storage, password):
    storage = observed_storage(fail_on=lambda name, attempt: name.startswith(C.INDEX_PREFIX)
                               and not storage.failed)  # only the first index put fails
    repo = make_repo(storage)
    datas = {repo.contents.write(d): d for d in (b"kept %d " % i * 40 for i in range(30))}
    with pytest.raises(StorageError, match="injected"):
        repo.flush()
    assert list(storage.inner.list(C.INDEX_PREFIX)) == []
    assert all(repo.contents.read(c) == d for c, d in datas.items())

    assert repo.flush() is not None  # the retry publishes what the failed put did not
    fresh = Repository.open(storage, password)
    assert {e.content_id for e in load_committed_index(storage, fresh.format)} == set(datas)
    assert all(fresh.contents.read(c) == d for c, d in datas.items())


def test_compression_skipped_for_random_data_and_used_for_zeros(repo):
    rnd_cid = repo.contents.write(os.urandom(4096))
    zero_cid = repo.contents.write(bytes(4096))
    short_cid = repo.contents.write(bytes(63))
    rnd_e, zero_e, short_e = (repo.contents.lookup(c) for c in (rnd_cid, zero_cid, short_cid))
    assert rnd_e.compression == C.COMPRESSION_NONE and rnd_e.packed_length == 4096 + 28
    assert zero_e.compression == C.COMPRESSION_ZSTD and zero_e.packed_length < 200
    assert short_e.compression == C.COMPRESSION_NONE  # under 64 bytes: never compressed
    repo.flush()
    assert repo.contents.read(zero_cid) == bytes(4096)


def test_level_zero_disables_compression(make_repo, small_parameters):
    repo = make_repo(parameters=replace(small_parameters, zstd_level=0))
    cid = repo.contents.write(bytes(4096))
    assert repo.contents.lookup(cid).compression == C.COMPRESSION_NONE


def test_deleted_entry_is_not_deduplicated_against(repo):
    data = b"deleted once " * 20
    cid = repo.contents.write(data)
    repo.flush()
    e = repo.contents.lookup(cid)
    repo.contents.committed.add_entries([replace(e, deleted=True, timestamp_us=e.timestamp_us + 1)])
    assert not repo.contents.contains(cid)
    assert repo.contents.write(data) == cid
    assert repo.contents.stats.contents_written == 2
    assert repo.contents.read(cid) == data


def _manifest_stores(storage_clock=None):
    """A repository in memory and two manifest stores of it (two writers' sessions)."""
    from repo_format.crypto import KdfParams
    from repo_format.manifest import ManifestStore
    from repo_format.storage.memory import MemoryStorage

    storage = MemoryStorage(clock=storage_clock) if storage_clock else MemoryStorage()
    repo = Repository.create(storage, "pw", kdf=KdfParams.weak_for_tests())
    aead = repo.format.keys.manifest_aead()
    return storage, ManifestStore(storage, aead, "0123456789abcdef"), ManifestStore(storage, aead, "fedcba9876543210")


def test_manifest_compaction_keeps_every_newer_record_and_deletes_in_a_later_run():
    from repo_format.clock import ManualClock

    t = ManualClock()
    storage, ms, _other = _manifest_stores(t)
    ids = [ms.put({"type": "snapshot", "n": str(i)}, b"payload%d" % i).id for i in range(20)]
    ms.delete(ids[:3])
    before = {r.id: r.payload for r in ms.find(type="snapshot")}
    assert len(before) == 17 and len(list(storage.list("m"))) == 21
    t.advance(10)
    assert ms.compact(t(), settle=5.0, min_blobs=16) == 0  # phase one: merged blob, nothing deleted
    late = ms.put({"type": "snapshot", "n": "late"}, b"late").id  # written concurrently
    t.advance(10)
    assert ms.compact(t(), settle=5.0, min_blobs=16) == 21  # phase two: covered blobs go
    after = {r.id: r.payload for r in ms.find(type="snapshot")}
    assert after == {**before, late: b"late"}
    assert not set(ids[:3]) & set(after)  # tombstones survived the merge


def test_read_ahead_serves_contents_in_order_from_few_block_reads(make_repo, monkeypatch):
    """Through the read-ahead cache (tiny blocks here): every content reads back exactly, in
    order and shuffled, including ones crossing a block boundary and at the pack's short end; in
    order it takes far fewer storage reads than contents; a truncated pack is still corruption."""
    from repo_format import content_reader as content_module
    from repo_format.errors import CorruptionError
    from repo_format.storage.memory import MemoryStorage
    from repo_format.storage.wrappers import CountingStorage

    monkeypatch.setattr(content_module, "READ_AHEAD_BLOCK", 4096)
    storage = CountingStorage(MemoryStorage())
    repo = make_repo(storage)
    rnd = random.Random(3)
    datas = [rnd.randbytes(rnd.randint(100, 900)) for _ in range(60)] + [rnd.randbytes(3000)]  # the last read alone
    ids = [repo.contents.write(d) for d in datas]
    repo.flush()
    entries = [repo.contents.lookup(c) for c in ids]
    assert any(e.offset // 4096 != (e.offset + e.packed_length - 1) // 4096 for e in entries)  # crossing

    def reads(order, blocks=content_module.READ_AHEAD_BLOCKS) -> int:
        before = storage.counts()["GET"]["calls"]
        with repo.contents.reading_ahead(blocks):
            assert [repo.contents.read(ids[i]) for i in order] == [datas[i] for i in order]
        return storage.counts()["GET"]["calls"] - before

    in_order = reads(range(len(ids)))
    assert in_order < len(ids) // 3
    shuffled = list(range(len(ids)))
    rnd.shuffle(shuffled)
    assert reads(shuffled, blocks=2) > in_order  # evicted blocks are read again
    assert repo.contents.reader._blocks is None  # off again after the context

    last = entries[-1]
    storage.put(last.pack, storage.get(last.pack)[:last.offset + 10])  # truncated in place
    with repo.contents.reading_ahead(), pytest.raises(CorruptionError, match="truncated"):
        repo.contents.read(ids[-1])


def test_fewer_collections_restores_the_thresholds_after_overlapping_users():
    import gc

    from kdist.snapshot import fewer_collections

    before = gc.get_threshold()
    outer = fewer_collections()
    outer.__enter__()
    inner = fewer_collections()
    inner.__enter__()
    assert gc.get_threshold()[0] == max(before[0], 100_000)
    outer.__exit__(None, None, None)  # the first user leaves while the second still runs
    assert gc.get_threshold()[0] == max(before[0], 100_000)
    inner.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_manifest_compaction_drops_tombstones_once_no_blob_holds_what_they_deleted():
    from repo_format.clock import ManualClock

    t = ManualClock()
    storage, ms, _other = _manifest_stores(t)
    ids = [ms.put({"type": "snapshot", "n": str(i)}, b"payload%d" % i).id for i in range(20)]
    ms.delete(ids[:3])

    def tombstones() -> set[str]:
        return {r.id for m in storage.list("m") for r in ms.read_blob(m.name) if r.deleted}

    t.advance(10)
    ms.compact(t(), settle=5.0, min_blobs=16)  # the deleted records are still in their blobs: kept
    assert tombstones() == set(ids[:3]) and len([m for m in storage.list("m_")]) == 1
    t.advance(10)
    assert ms.compact(t(), settle=5.0, min_blobs=16) == 21  # the blobs holding them go
    assert tombstones() == set(ids[:3])  # (in the compacted blob)
    t.advance(10)
    ms.compact(t(), settle=5.0, min_blobs=1)  # nothing holds what they deleted: the new blob drops them
    newest = max(storage.list("m_"), key=lambda m: m.timestamp)
    assert not {r.id for r in ms.read_blob(newest.name) if r.deleted}
    assert {r.id for r in ms.find(type="snapshot")} == set(ids[3:])
    t.advance(10)
    ms.compact(t(), settle=5.0, min_blobs=1)
    assert tombstones() == set() and {r.id for r in ms.find(type="snapshot")} == set(ids[3:])


def test_a_forget_from_a_host_whose_clock_is_behind_still_deletes():
    _storage, fast, slow = _manifest_stores()
    try:
        clock.set_clock(lambda: 1_800_003_600.0)
        rec = fast.put({"type": "snapshot"}, b"x")
        clock.set_clock(lambda: 1_800_000_000.0)  # the forgetting host's clock is an hour behind
        slow.delete([rec.id])
    finally:
        clock.set_clock(None)
    assert fast.find(type="snapshot") == []
