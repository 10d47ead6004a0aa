"""Objects: any size round-trips through chunking and packs; the reader seeks and reads like a file."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_format import constants as C
from repo_format.errors import CorruptionError


def sizes(p):
    """Sizes at and around the chunker's limits of parameters ``p``, and any size up to 40 KB."""
    return st.sampled_from([
        0, 1, p.chunk_min - 1, p.chunk_min, p.chunk_min + 1, p.chunk_avg,
        p.chunk_max - 1, p.chunk_max, p.chunk_max + 1, 3 * p.chunk_max,
    ]) | st.integers(0, 40_000)


@st.composite
def object_data(draw, size_strategy):
    """Random (incompressible), repetitive (compressible) or mixed bytes of a drawn size."""
    size = draw(size_strategy)
    rnd = random.Random(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["random", "text", "mixed"]))
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "text":
        return (b"kdist %d " % rnd.randrange(100) * (size // 8 + 1))[:size]
    return bytes(rnd.choice((0, rnd.randrange(256))) for _ in range(size))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.booleans())
def test_objects_round_trip_before_and_after_flush(make_repo, reopen, small_parameters, data, metadata):
    P = small_parameters
    datas = data.draw(st.lists(object_data(sizes(P)), min_size=1, max_size=4))
    repo = make_repo()
    oids = [repo.objects.write_bytes(d, metadata=metadata) for d in datas]
    for oid, d in zip(oids, datas):
        assert repo.objects.read_all(oid) == d  # pending, partly in unflushed packs
        chunks = repo.objects.chunks(oid)
        assert sum(n for _, n in chunks) == len(d)
        assert oid.startswith(C.INDIRECT_OBJECT_PREFIX) == (len(chunks) > 1)
        assert all(n <= P.chunk_max for _, n in chunks)
    repo.flush()
    fresh = reopen(repo.storage)
    for oid, d in zip(oids, datas):
        assert fresh.objects.read_all(oid) == d


@pytest.mark.parametrize("size_of", [lambda p: 0, lambda p: p.chunk_min, lambda p: p.chunk_max,
                                     lambda p: p.chunk_max + 1], ids=["empty", "min", "max", "max+1"])
def test_boundary_sizes_round_trip_within_chunk_limits(repo, size_of):
    p = repo.parameters
    size = size_of(p)
    data = random.Random(size).randbytes(size)
    oid = repo.objects.write_bytes(data)
    chunks = repo.objects.chunks(oid)
    if size <= p.chunk_min:  # never cut: a direct id, the content id itself
        assert oid == repo.contents.reference(data).hex()
        assert chunks == [(repo.contents.reference(data), size)]
    if size > p.chunk_max:
        assert oid.startswith(C.INDIRECT_OBJECT_PREFIX) and len(chunks) >= 2
    assert all(n <= p.chunk_max for _, n in chunks)
    assert all(n >= p.chunk_min for _, n in chunks[:-1])
    assert sum(n for _, n in chunks) == size
    assert repo.objects.read_all(oid) == data


def test_many_small_objects_across_packs(make_repo, reopen):
    repo = make_repo()
    rnd = random.Random(3)
    datas = [rnd.randbytes(rnd.randrange(0, 400)) for _ in range(1000)] + [b"dup"] * 10
    oids = [repo.objects.write_bytes(d) for d in datas]
    repo.flush()
    packs = [m for m in repo.storage.list(C.DATA_PACK_PREFIX)]
    assert len(packs) >= 3  # small data, several packs: the multi-pack path ran
    fresh = reopen(repo.storage)
    assert [fresh.objects.read_all(o) for o in oids] == datas
    assert repo.contents.stats.contents_deduplicated >= 9


@settings(max_examples=40, deadline=None)
@given(object_data(st.integers(0, 20_000)), st.lists(st.tuples(
    st.sampled_from([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END]),
    st.floats(0, 1.05),  # target position as a fraction of the length (a bit past the end too)
    st.integers(-1, 6000),  # read size; -1 reads to the end
), max_size=12), st.booleans())
def test_reader_seek_and_read_match_slicing(make_repo, data, ops, flush):
    repo = make_repo()
    oid = repo.objects.write_bytes(data)
    if flush:
        repo.flush()
    model = io.BytesIO(data)
    with repo.objects.open(oid) as reader:
        assert reader.seekable() and reader.readable()
        for whence, frac, size in ops:
            target = int(frac * len(data))
            offset = {io.SEEK_SET: target, io.SEEK_CUR: target - model.tell(),
                      io.SEEK_END: target - len(data)}[whence]
            assert reader.seek(offset, whence) == model.seek(offset, whence) == target
            assert reader.read(size) == model.read(size)
            assert reader.tell() == model.tell()
        reader.seek(0)
        assert reader.read() == data
        with pytest.raises(ValueError):
            reader.seek(-1)


def test_reader_readinto_and_iteration(repo):
    data = bytes(range(256)) * 64  # 16 KiB: several chunks
    oid = repo.objects.write_bytes(data)
    reader = repo.objects.open(oid)
    assert reader.length == len(data)
    buf = bytearray(len(data) + 10)
    got = 0
    while n := reader.readinto(memoryview(buf)[got:]):
        got += n
    assert got == len(data) and bytes(buf[:got]) == data


@pytest.mark.parametrize("oid", ["zz", "I" + "00" * 31, "ab" * 33, ""])
def test_malformed_object_ids_are_corruption(repo, oid):
    with pytest.raises(CorruptionError):
        repo.objects.chunks(oid)


class _Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, like a pipe or a slow socket."""

    def __init__(self, data: bytes, step: int):
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("size", [0, 1, 5_000, 4 * 1024 * 1024, 8 * 1024 * 1024 + 1, 21 * 1024 * 1024 + 7])
@pytest.mark.parametrize("step", [None, 1_000_003])
def test_splitter_cuts_like_the_whole_stream_at_once(size, step):
    """Cutting a reused buffer and carrying the unfinished chunk over gives exactly the chunks of
    pyfastcdc's own stream cutter, across buffer refills and short reads."""
    import pyfastcdc

    from repo_format.objects import Splitter

    rnd = random.Random(size)
    data = rnd.randbytes(size // 2) + bytes(size - size // 2)  # random, then one long run
    sp = Splitter(1 << 20, 256 << 10, 4 << 20, seed=11)
    want = [bytes(c.data) for c in pyfastcdc.FastCDC(1 << 20, min_size=256 << 10, max_size=4 << 20, seed=11)
            .cut_stream(io.BytesIO(data))]
    got = [bytes(c) for c in sp.split(io.BytesIO(data) if step is None else _Trickle(data, step))]
    assert got == want
    assert b"".join(got) == data
