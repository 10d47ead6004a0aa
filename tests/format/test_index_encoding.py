"""Index encoding round-trips and the conflict rule (newer wins; live beats deleted; then order)."""

from __future__ import annotations

import contextlib
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_format import constants as C
from repo_format import index as index_module
from repo_format.errors import CorruptionError, UnsupportedVersion
from repo_format.index import IndexBlob, IndexEntry, MergedIndex, _Runs, encode_index, pick, wins

SETTINGS = settings(max_examples=60, deadline=None)

# A few ids and pack names so that duplicates and ties are common; some ids share their first 8
# bytes (the key of MergedIndex's sorted array for large indexes).
ids = (st.sampled_from([bytes([i]) * 32 for i in range(6)] + [b"\x07" * 8 + bytes([i]) * 24 for i in range(4)])
       | st.binary(min_size=32, max_size=32))
packs = st.sampled_from(["pa", "pb", "q0123-45"]) | st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True)
u32 = st.integers(0, 2**32 - 1)

entries = st.builds(
    IndexEntry,
    content_id=ids,
    pack=packs,
    offset=st.sampled_from([0, 7]) | u32,
    packed_length=st.sampled_from([28, 40]) | u32,
    original_length=u32,
    compression=st.sampled_from([C.COMPRESSION_NONE, C.COMPRESSION_ZSTD]),
    timestamp_us=st.sampled_from([0, 1_700_000_000_000_000]) | st.integers(-(2**63), 2**63 - 1),
    deleted=st.booleans(),
)


def rule_key(e: IndexEntry):
    """The documented rule as a sort key: the maximum wins (pack name and offset: smaller wins)."""
    return (e.timestamp_us, not e.deleted)


def expected_winners(es: list[IndexEntry]) -> dict[bytes, IndexEntry]:
    best: dict[bytes, IndexEntry] = {}
    for e in es:
        cur = best.get(e.content_id)
        if cur is None or wins(e, cur):
            best[e.content_id] = e
    return best


@SETTINGS
@given(st.lists(entries, max_size=40))
def test_index_round_trip_keeps_one_winner_per_id(es):
    blob = IndexBlob(encode_index(es))
    winners = expected_winners(es)
    decoded = list(blob)
    assert len(blob) == len(winners)
    assert [e.content_id for e in decoded] == sorted(winners)
    assert decoded == [winners[cid] for cid in sorted(winners)]
    for cid, e in winners.items():
        assert blob.lookup(cid) == e
    for e in es:  # the winner for an id also obeys the documented rule against every loser
        w = winners[e.content_id]
        assert rule_key(w) >= rule_key(e)
    assert blob.lookup(b"\xff" * 31 + b"\xfe") == winners.get(b"\xff" * 31 + b"\xfe")


def test_empty_index_round_trip():
    data = encode_index([])
    assert data == C.INDEX_HEADER.pack(C.INDEX_MAGIC, C.INDEX_VERSION, 0, 0, 0, 0)
    blob = IndexBlob(data)
    assert len(blob) == 0 and list(blob) == [] and blob.packs == []
    assert blob.lookup(bytes(32)) is None


def entry(ts=10, deleted=False, pack="pa", offset=0, cid=b"\x01" * 32, plen=40, olen=12, comp=0):
    return IndexEntry(cid, pack, offset, plen, olen, comp, ts, deleted)


def both_orders(a: IndexEntry, b: IndexEntry) -> list[IndexEntry]:
    """The winner of a and b through every path: pick, encode_index, MergedIndex blobs and overlay."""
    results = [pick([a, b]), pick([b, a])]
    results += [IndexBlob(encode_index(order)).lookup(a.content_id) for order in ([a, b], [b, a])]
    for first, second in ((a, b), (b, a)):
        m = MergedIndex([IndexBlob(encode_index([first])), IndexBlob(encode_index([second]))])
        results.append(m.lookup(a.content_id))
        results += list(m)
        m = MergedIndex([IndexBlob(encode_index([first]))])
        m.add_entries([second])
        results.append(m.lookup(a.content_id))
        m = MergedIndex()
        m.add_entries([first, second])
        results.append(m.lookup(a.content_id))
    return results


def test_newer_timestamp_wins_even_if_deleted():
    old, new = entry(ts=10, pack="pa"), entry(ts=11, pack="pz", deleted=True)
    assert wins(new, old) and not wins(old, new)
    assert set(both_orders(old, new)) == {new}


def test_on_equal_timestamps_live_beats_deleted():
    live, dead = entry(ts=10, pack="pz", offset=99), entry(ts=10, pack="pa", deleted=True)
    assert wins(live, dead) and not wins(dead, live)
    assert set(both_orders(live, dead)) == {live}


def test_full_tie_smaller_pack_then_smaller_offset_wins():
    a, b = entry(pack="pa", offset=500), entry(pack="pb", offset=0)
    assert set(both_orders(a, b)) == {a}
    c, d = entry(pack="pa", offset=5), entry(pack="pa", offset=6)
    assert set(both_orders(c, d)) == {c}


def test_tie_on_every_ruled_field_is_still_order_independent():
    # Same timestamp, state, pack and offset but different lengths: only a damaged or hostile
    # index can say this, and every reader must still pick the same entry.
    a, b = entry(plen=40, olen=12), entry(plen=41, olen=13, comp=1)
    assert wins(a, b) != wins(b, a)
    assert len(set(both_orders(a, b))) == 1


@SETTINGS
@given(st.lists(entries, min_size=1, max_size=12), st.randoms(use_true_random=False),
       st.sampled_from(["dict", "sorted", "runs"]))
def test_merged_index_is_independent_of_blob_order_and_split(es, rnd, path):
    """Every lookup path: the dict of winners (small indexes), the sorted key array (large), and
    blobs carrying their own key arrays (the local cache's), searched one by one by key range
    or together when small."""
    limit = MergedIndex.DICT_LIMIT if path == "dict" else -1
    with _dict_limit(limit), _runs_small(rnd.choice([0, 1, 3]) if path == "runs" else None):
        _check_merged_index(es, rnd, keyed=path == "runs")


@contextlib.contextmanager
def _runs_small(n: int | None):
    """Blobs below ``n`` entries share one in-memory key array; the others are searched alone."""
    if n is None:
        yield
        return
    saved, _Runs.SMALL = _Runs.SMALL, n
    try:
        yield
    finally:
        _Runs.SMALL = saved


@contextlib.contextmanager
def _dict_limit(n: int):
    saved, MergedIndex.DICT_LIMIT = MergedIndex.DICT_LIMIT, n
    try:
        yield
    finally:
        MergedIndex.DICT_LIMIT = saved


def _check_merged_index(es, rnd, keyed: bool = False):
    def blob(group: list[IndexEntry]) -> IndexBlob:
        b = IndexBlob(encode_index(group))
        if keyed:
            b.keys = b.entry_keys()
        return b

    def merged(order: list[IndexEntry], nblobs: int) -> MergedIndex:
        groups = [order[i::nblobs + 1] for i in range(nblobs + 1)]
        m = MergedIndex(blob(g) for g in groups[:-1])
        m.add_entries(groups[-1])  # the last group goes to the in-memory overlay
        return m

    reference = merged(es, 0)
    ref_all = sorted(reference, key=lambda e: e.content_id)
    assert ref_all == sorted(expected_winners(es).values(), key=lambda e: e.content_id)
    for _ in range(4):
        order = es[:]
        rnd.shuffle(order)
        m = merged(order, rnd.randint(1, 4))
        assert sorted(m, key=lambda e: e.content_id) == ref_all
        for e in ref_all:
            assert m.lookup(e.content_id) == e
    assert reference.lookup(b"\xee" * 32) == expected_winners(es).get(b"\xee" * 32)


def test_pick_of_permutations_agrees():
    es = [entry(ts=t, deleted=d, pack=p, offset=o)
          for t, d, p, o in itertools.product([1, 2], [False, True], ["pa", "pb"], [0, 3])]
    results = {pick(perm) for perm in itertools.permutations(es[:5])}
    assert len(results) == 1
    assert pick(es) == entry(ts=2, deleted=False, pack="pa", offset=0)


# ---- decoding rejects malformed encodings with typed errors ------------------------------------

def _two_entry_index() -> bytes:
    return encode_index([entry(cid=b"\x01" * 32, pack="pa"), entry(cid=b"\x02" * 32, pack="pb")])


def test_decoder_rejects_unknown_version_clearly():
    data = bytearray(_two_entry_index())
    data[4] = 2
    with pytest.raises(UnsupportedVersion, match="index format version 2"):
        IndexBlob(bytes(data))


@pytest.mark.parametrize("vectorised", [False, True], ids=["loop", "numpy"])
@pytest.mark.parametrize("damage", ["magic", "unsorted", "duplicate", "pack_number", "count", "truncated", "pack_len"])
def test_decoder_rejects_structural_damage(damage, vectorised, monkeypatch):
    """Both entry checks: the loop for small blobs and numpy's for large ones."""
    monkeypatch.setattr(index_module, "_VECTOR_CHECK_FROM", 0 if vectorised else 10**9)
    data = bytearray(_two_entry_index())
    hdr = C.INDEX_HEADER.size
    first_entry = len(data) - 2 * C.INDEX_ENTRY.size
    if damage == "magic":
        data[0:4] = b"XXXX"
    elif damage == "unsorted":
        a, b = first_entry, first_entry + C.INDEX_ENTRY.size
        data[a:b], data[b:b + C.INDEX_ENTRY.size] = data[b:b + C.INDEX_ENTRY.size], data[a:b]
    elif damage == "duplicate":
        b = first_entry + C.INDEX_ENTRY.size
        data[b:b + 32] = data[first_entry:first_entry + 32]
    elif damage == "pack_number":
        data[first_entry + 32:first_entry + 36] = (7).to_bytes(4, "big")
    elif damage == "count":
        data[8:12] = (3).to_bytes(4, "big")
    elif damage == "truncated":
        del data[-1]
    elif damage == "pack_len":
        data[hdr:hdr + 2] = (0).to_bytes(2, "big")
    with pytest.raises(CorruptionError):
        IndexBlob(bytes(data))


@pytest.mark.parametrize("where", [3, 4, 5, 48])
def test_vectorised_checks_in_steps_see_damage_at_every_step_boundary(where, monkeypatch):
    """The numpy checks run in steps of rows overlapping by one: a pair out of order across a
    step's edge, or a bad pack number in the last step, is still refused."""
    monkeypatch.setattr(index_module, "_VECTOR_CHECK_FROM", 0)
    monkeypatch.setattr(index_module, "_VECTOR_CHECK_ROWS", 4)
    entries = [IndexEntry(bytes([i]) * 32, "p" + "0" * 15, 0, 10, 10, 0, 1) for i in range(50)]
    good = encode_index(entries)
    assert len(IndexBlob(good)) == 50
    first = len(good) - 50 * C.INDEX_ENTRY.size
    size = C.INDEX_ENTRY.size
    swapped = bytearray(good)
    a, b = first + where * size, first + (where + 1) * size
    swapped[a:b], swapped[b:b + size] = good[b:b + size], good[a:b]
    with pytest.raises(CorruptionError, match="sorted"):
        IndexBlob(bytes(swapped))
    bad_pack = bytearray(good)
    bad_pack[first + (where + 1) * size + 32:first + (where + 1) * size + 36] = (1).to_bytes(4, "big")
    with pytest.raises(CorruptionError, match="outside its table"):
        IndexBlob(bytes(bad_pack))


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans())
def test_decoder_never_fails_untyped(data, vectorised):
    saved, index_module._VECTOR_CHECK_FROM = index_module._VECTOR_CHECK_FROM, 0 if vectorised else 10**9
    try:
        _decode_mutated(data)
    finally:
        index_module._VECTOR_CHECK_FROM = saved


def _decode_mutated(data):
    raw = bytearray(_two_entry_index())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        blob = IndexBlob(bytes(raw[:cut]))
    except (CorruptionError, UnsupportedVersion):
        return
    ids = [e.content_id for e in blob]  # whatever decodes is internally consistent
    assert ids == sorted(set(ids))
    assert all(e.pack in blob.packs for e in blob)


def test_entry_table_is_sixty_bytes_per_entry_as_specified():
    es = [entry(cid=bytes([i]) * 32) for i in range(5)]
    assert len(encode_index(es)) == C.INDEX_HEADER.size + 2 + 2 + 5 * 60
    random.Random(1).shuffle(es)
    assert encode_index(es) == encode_index(sorted(es, key=lambda e: e.content_id))
