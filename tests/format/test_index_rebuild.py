"""Index blobs are a cache: every entry can be rebuilt from the packs' local indexes alone."""

from __future__ import annotations

import random

from repo_format import constants as C
from repo_format.content import ContentStore, load_committed_index
from repo_format.index import MergedIndex
from repo_format.index_rebuild import entries_from_packs


def _fill(repo, rnd: random.Random) -> dict[str, bytes]:
    """Several flushes (so several index blobs), data and metadata packs, some dedup."""
    objects = {}
    for _ in range(3):
        for i in range(40):
            data = rnd.randbytes(rnd.randrange(0, 6000)) if i % 3 else b"shared %d" % (i % 5) * 100
            objects[repo.objects.write_bytes(data, metadata=(i % 4 == 0))] = data
        repo.flush()
    return objects


def test_rebuild_from_packs_gives_exactly_the_committed_entries(make_repo):
    repo = make_repo()
    objects = _fill(repo, random.Random(11))
    storage, fmt = repo.storage, repo.format
    packs = [m.name for p in (C.DATA_PACK_PREFIX, C.METADATA_PACK_PREFIX) for m in storage.list(p)]
    index_blobs = [m.name for m in storage.list(C.INDEX_PREFIX)]
    assert len(index_blobs) == 3 and len(packs) >= 4
    assert any(p.startswith(C.METADATA_PACK_PREFIX) for p in packs)
    committed = sorted(load_committed_index(storage, fmt), key=lambda e: e.content_id)

    for name in index_blobs:
        storage.delete(name)
    assert list(load_committed_index(storage, fmt)) == []

    result = entries_from_packs(storage, fmt)
    assert result.damaged_packs == {} and result.packs_read == len(packs)
    assert sorted(result.entries, key=lambda e: e.content_id) == committed  # no extra, none missing

    merged = MergedIndex()
    merged.add_entries(result.entries)
    contents = ContentStore(storage, fmt, "0123456789abcdef", committed=merged)
    for e in committed:
        contents.read(e.content_id)  # authenticated and checked against its id
    fresh_objects = type(repo.objects)(contents, repo.objects.splitter)
    for oid, data in objects.items():
        assert fresh_objects.read_all(oid) == data


def test_rebuild_reports_a_damaged_pack_and_keeps_the_others(make_repo):
    repo = make_repo()
    _fill(repo, random.Random(12))
    storage = repo.storage
    packs = sorted(m.name for m in storage.list(C.DATA_PACK_PREFIX))
    victim = packs[0]
    raw = bytearray(storage.get(victim))
    raw[-30] ^= 0x01  # inside the sealed local index
    storage.put(victim, bytes(raw))
    committed = list(load_committed_index(storage, repo.format))

    result = entries_from_packs(storage, repo.format)
    assert list(result.damaged_packs) == [victim]
    assert "authentication" in result.damaged_packs[victim]
    assert sorted(result.entries, key=lambda e: e.content_id) == sorted(
        (e for e in committed if e.pack != victim), key=lambda e: e.content_id)
