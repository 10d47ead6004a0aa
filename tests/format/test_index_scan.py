"""The range-by-range winners (``repo_format.index_scan``) are exactly ``MergedIndex``'s."""

import random

import pytest

from repo_format.index import IndexBlob, IndexEntry, MergedIndex, encode_index
from repo_format.index_scan import ROW_BYTES, IndexScan


def _random_index(rng: random.Random, ids: int, blobs: int) -> tuple[list[IndexBlob], list[bytes]]:
    prefixes = [rng.randbytes(8) for _ in range(ids // 3)]  # some ids share their 64-bit key
    cids = sorted({(rng.choice(prefixes) if rng.random() < 0.3 else rng.randbytes(8)) + rng.randbytes(24)
                   for _ in range(ids)})
    packs = [f"p{rng.randbytes(4).hex()}" for _ in range(7)]
    out = []
    for _ in range(blobs):
        entries = []
        for cid in rng.sample(cids, rng.randrange(1, len(cids))):
            # few timestamps and flags, so full ties decided by pack name and offset are common
            entries.append(IndexEntry(cid, rng.choice(packs), rng.randrange(3), rng.randrange(1, 3), 5,
                                      rng.randrange(2), rng.randrange(3), rng.random() < 0.4))
        out.append(IndexBlob(encode_index(entries)))
    return out, cids


@pytest.mark.parametrize("seed", range(6))
def test_winners_equal_the_merged_index_lookups(seed):
    rng = random.Random(seed)
    blobs, cids = _random_index(rng, 400, 5)
    extra = [IndexEntry(c, "pextra", 0, 1, 1, 0, 2, False) for c in rng.sample(cids, 30)]
    merged = MergedIndex(blobs)
    merged.add_entries(extra)
    scan = IndexScan(blobs, extra, memory_limit=ROW_BYTES * 150)  # several ranges
    assert scan.ranges_count > 1
    found = {}
    for w in scan:
        got = w.entries(scan.packs)
        assert [e.content_id for e in got] == sorted(e.content_id for e in got)  # sorted by the whole id
        for e in got:
            assert e.content_id not in found
            found[e.content_id] = e
    assert found == {c: merged.lookup(c) for c in cids if merged.lookup(c) is not None}


def test_referenced_packs_include_losers():
    old = IndexEntry(b"\x01" * 32, "pold", 0, 1, 1, 0, 1)
    new = IndexEntry(b"\x01" * 32, "pnew", 0, 1, 1, 0, 2)
    scan = IndexScan([IndexBlob(encode_index([old])), IndexBlob(encode_index([new]))])
    assert scan.referenced_packs() == {"pold", "pnew"}
    [w] = list(scan)
    assert w.entries(scan.packs) == [new]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vectorised", [True, False])
def test_live_many_equals_lookups(seed, vectorised, monkeypatch):
    """``MergedIndex.live_many`` (one vectorised search per blob, the backup's reuse decision and
    its revalidation) says exactly what a lookup of each id says: ties, shared 64-bit keys, deleted
    entries in some blobs, an overlay that deletes or undeletes, and ids in no blob."""
    if vectorised:
        monkeypatch.setattr(MergedIndex, "LIVE_SCALAR_LIMIT", 0)
    rng = random.Random(seed)
    blobs, cids = _random_index(rng, 400, 5)
    merged = MergedIndex(blobs)
    merged.add_entries([IndexEntry(c, "pextra", 0, 1, 1, 0, rng.randrange(4), rng.random() < 0.5)
                        for c in rng.sample(cids, 60)])
    absent = [c[:8] + rng.randbytes(24) for c in rng.sample(cids, 20)] + [rng.randbytes(32) for _ in range(20)]
    asked = rng.sample(cids, len(cids)) + absent
    expected = [e is not None and not e.deleted for e in map(merged.lookup, asked)]
    assert merged.live_many(asked) == expected
    assert 0 < sum(expected) < len(expected)
    assert MergedIndex(blobs).live_many(asked) == [e is not None and not e.deleted for e in map(MergedIndex(blobs).lookup, asked)]


@pytest.mark.parametrize("seed", range(4))
def test_a_winner_whose_record_is_elsewhere_takes_a_genuine_place(seed):
    """The merges' rule (``IndexScan._relocate``): with ``verify`` saying which places hold their
    record, every winner keeps its timestamp and flag, takes the best place that holds the record
    when its own does not, and stays as it is when none does; places are read only for ids whose
    entries point to more than one place, and the winners equal ``MergedIndex``'s otherwise."""
    rng = random.Random(seed)
    blobs, cids = _random_index(rng, 300, 4)
    genuine = {(c, p) for c in cids for p in ("p0", "p1", "p2", "p3", "p4", "p5", "p6")
               if rng.random() < 0.5}
    blob_packs = sorted({p for b in blobs for p in b.packs})
    genuine = {(c, blob_packs[int(p[1])]) for c, p in genuine}
    asked = []

    def verify(entries):
        asked.extend(entries)
        return [(e.content_id, e.pack) in genuine for e in entries]

    merged = MergedIndex(blobs)
    scan = IndexScan(blobs, memory_limit=ROW_BYTES * 150, verify=verify)
    found = {e.content_id: e for w in scan for e in w.entries(scan.packs)}
    places = {c: merged.locations(c) for c in cids}
    for c, e in found.items():
        best = merged.lookup(c)
        assert (e.timestamp_us, e.deleted) == (best.timestamp_us, best.deleted)
        held = [p for p in places[c] if (c, p.pack) in genuine]
        if len(places[c]) == 1 or (c, best.pack) in genuine or not held:
            assert e == best  # one place, or the winner's holds the record, or none does
        else:
            assert (e.pack, e.offset, e.packed_length) == (held[0].pack, held[0].offset, held[0].packed_length)
    assert {e.content_id for e in asked} <= {c for c, p in places.items() if len(p) > 1}
    assert scan.relocated == sum(found[c] != merged.lookup(c) for c in found)
    assert scan.relocated > 0 and scan.verified == len(asked)
