"""Pack round-trips: ``PackWriter.finish`` -> ``read_local_index`` gives the entries back, and every
record decrypts to its content; the postamble has the layout SPEC.md section 5 gives."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_format import constants as C
from repo_format.compression import compress, decompress
from repo_format.crypto import RepositoryKeys
from repo_format.errors import CorruptionError, UnsupportedVersion
from repo_format.pack import PackWriter, content_aad, new_pack_name, read_local_index
from repo_format.storage.memory import MemoryStorage

KEYS = RepositoryKeys(bytes(range(32)), bytes(range(32, 64)), C.AEAD_AES_256_GCM)

contents = st.lists(
    st.binary(max_size=600) | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 3000), st.integers(0, 255)),
    max_size=25,
    unique=True,
)


def build_pack(datas, keys=KEYS, metadata=False, ts=1_700_000_000_000_000):
    hasher, aead = keys.content_hasher(), keys.content_aead()
    writer = PackWriter(new_pack_name(metadata, "0123456789abcdef"))
    for i, data in enumerate(datas):
        cid = hasher(data)
        compression, payload = compress(data, 3)
        writer.add(cid, compression, aead.seal(payload, content_aad(cid, compression)), len(data), ts + i)
    return writer


@settings(max_examples=40, deadline=None)
@given(contents, st.sampled_from(C.AEAD_ALGORITHMS), st.booleans())
def test_pack_round_trip(datas, algorithm, metadata):
    keys = RepositoryKeys(bytes(range(32)), bytes(range(32, 64)), algorithm)
    writer = build_pack(datas, keys, metadata)
    storage = MemoryStorage()
    storage.put(writer.name, writer.finish(keys.index_aead()))

    got = read_local_index(storage, writer.name, keys.index_aead())
    assert sorted(got, key=lambda e: e.content_id) == sorted(writer.entries, key=lambda e: e.content_id)
    assert len(got) == len(datas)

    aead, by_id = keys.content_aead(), {keys.content_hasher()(d): d for d in datas}
    for e in got:
        assert e.pack == writer.name and not e.deleted
        sealed = storage.get(e.pack, e.offset, e.packed_length)
        payload = aead.open(sealed, content_aad(e.content_id, e.compression))
        assert decompress(e.compression, payload, e.original_length) == by_id[e.content_id]
        assert writer.read_pending(e) == sealed


def test_pack_layout_matches_spec():
    writer = build_pack([b"a" * 1000, b"kdist"])
    pack = writer.finish(KEYS.index_aead())
    records_end = sum(e.packed_length for e in writer.entries)
    magic, version, offset, length, crc = C.PACK_POSTAMBLE.unpack(pack[-24:])
    assert C.PACK_POSTAMBLE.size == 24
    assert (magic, version, offset) == (b"KDPK", 1, records_end)
    assert pack[-19:-16] == b"\0\0\0"
    assert offset + length + 24 == len(pack)
    assert crc == zlib.crc32(pack[-24:-4])
    assert [e.offset for e in writer.entries] == [0, writer.entries[0].packed_length]
    assert writer.entries[0].compression == C.COMPRESSION_ZSTD
    assert writer.entries[1].compression == C.COMPRESSION_NONE  # under 64 bytes: stored as is


def test_empty_pack_round_trips():
    writer = PackWriter("p" + "0" * 32 + "-0123456789abcdef")
    storage = MemoryStorage()
    storage.put(writer.name, writer.finish(KEYS.index_aead()))
    assert read_local_index(storage, writer.name, KEYS.index_aead()) == []


def test_unknown_pack_version_is_refused_clearly():
    writer = build_pack([b"kdist"])
    pack = bytearray(writer.finish(KEYS.index_aead()))
    pack[-20] = 2  # version byte of the postamble
    pack[-4:] = zlib.crc32(bytes(pack[-24:-4])).to_bytes(4, "big")
    storage = MemoryStorage()
    storage.put(writer.name, bytes(pack))
    with pytest.raises(UnsupportedVersion, match="version 2"):
        read_local_index(storage, writer.name, KEYS.index_aead())


def test_postamble_pointing_outside_the_pack_is_corruption():
    writer = build_pack([b"kdist"])
    pack = bytearray(writer.finish(KEYS.index_aead()))
    pack[-16:-8] = (10**9).to_bytes(8, "big")  # local index offset, crc recomputed
    pack[-4:] = zlib.crc32(bytes(pack[-24:-4])).to_bytes(4, "big")
    storage = MemoryStorage()
    storage.put(writer.name, bytes(pack))
    with pytest.raises(CorruptionError, match="outside the pack"):
        read_local_index(storage, writer.name, KEYS.index_aead())


def test_pack_names_follow_spec():
    data, meta = new_pack_name(False, "0123456789abcdef"), new_pack_name(True, "0123456789abcdef")
    assert data[0] == "p" and meta[0] == "q"
    for name in (data, meta):
        assert len(name) == 1 + 32 + 1 + 16 and name[33] == "-"
        int(name[1:33], 16)
    assert new_pack_name(False, "s") != new_pack_name(False, "s")
