"""Damage and tampering are detected, never returned as data.

Every single-byte flip of a pack, an index blob or the format blob, every truncation, a missing
pack and blobs swapped into another place fail with a typed error (SPEC.md sections 2, 3, 5, 6).
"""

from __future__ import annotations

import random

import msgpack
import pytest

from repo_format import constants as C
from repo_format import format_blob
from repo_format.content import ContentStore, load_committed_index
from repo_format.crypto import unkeyed_checksum
from repo_format.errors import BlobNotFound, CorruptionError, UnsupportedVersion, WrongPassword
from repo_format.index import IndexEntry
from repo_format.pack import read_local_index
from repo_format.repository import Repository

SESSION = "0123456789abcdef"


@pytest.fixture
def small_repo(make_repo):
    """A repository with one data pack of four contents and one index blob."""
    repo = make_repo()
    rnd = random.Random(5)
    datas = [b"", b"kdist" * 40, rnd.randbytes(300), bytes(500)]
    ids = [repo.contents.write(d) for d in datas]
    repo.flush()
    return repo, dict(zip(ids, datas))


def _only(storage, prefix: str) -> str:
    (name,) = [m.name for m in storage.list(prefix)]
    return name


def _flipped(raw: bytes, pos: int, mask: int) -> bytes:
    out = bytearray(raw)
    out[pos] ^= mask
    return bytes(out)


def _reseal_checksum(body: bytes) -> bytes:
    """A format blob whose body was edited, with a valid checksum again."""
    return body + unkeyed_checksum(body)


# ---- packs ---------------------------------------------------------------------------------

def test_every_pack_byte_flip_is_detected(small_repo):
    repo, datas = small_repo
    storage, fmt = repo.storage, repo.format
    pack = _only(storage, C.DATA_PACK_PREFIX)
    original = storage.get(pack)
    committed = load_committed_index(storage, fmt)
    entries = sorted(read_local_index(storage, pack, fmt.keys.index_aead()), key=lambda e: e.content_id)
    assert len(entries) == len(datas)
    store = ContentStore(storage, fmt, SESSION, committed=committed)

    positions = [(p, 0x01) for p in range(len(original))] + [(p, 0xFF) for p in range(0, len(original), 7)]
    for pos, mask in positions:
        storage.put(pack, _flipped(original, pos, mask))
        detected = 0
        try:
            got = read_local_index(storage, pack, fmt.keys.index_aead())
            assert sorted(got, key=lambda e: e.content_id) == entries, f"wrong local index, flip at {pos}"
        except CorruptionError:
            detected += 1
        for cid, data in datas.items():
            try:
                assert store.read(cid) == data, f"wrong data returned, flip at {pos}"
            except CorruptionError:
                detected += 1
        assert detected >= 1, f"flip of pack byte {pos} went unnoticed"
    storage.put(pack, original)
    assert all(store.read(cid) == data for cid, data in datas.items())


def test_truncated_pack_is_corruption(small_repo):
    repo, datas = small_repo
    storage, fmt = repo.storage, repo.format
    pack = _only(storage, C.DATA_PACK_PREFIX)
    original = storage.get(pack)
    store = ContentStore(storage, fmt, SESSION, committed=load_committed_index(storage, fmt))
    entries = {e.content_id: e for e in load_committed_index(storage, fmt)}
    for length in list(range(0, len(original), 13)) + [len(original) - 1]:
        storage.put(pack, original[:length])
        with pytest.raises(CorruptionError):
            read_local_index(storage, pack, fmt.keys.index_aead())
        for cid, data in datas.items():
            e = entries[cid]
            if e.offset + e.packed_length <= length:
                assert store.read(cid) == data  # records before the cut are intact
            else:
                with pytest.raises(CorruptionError):
                    store.read(cid)


def test_missing_pack_raises_blob_not_found_naming_it(small_repo):
    repo, datas = small_repo
    pack = _only(repo.storage, C.DATA_PACK_PREFIX)
    repo.storage.delete(pack)
    fresh = Repository.open(repo.storage, "correct horse battery staple")
    cid = next(iter(datas))
    with pytest.raises(BlobNotFound) as info:
        fresh.contents.read(cid)
    assert info.value.name == pack
    assert pack in str(info.value) and cid.hex() in str(info.value)


def test_pack_copied_under_another_pack_name_fails_authentication(make_repo):
    repo = make_repo()
    a = repo.contents.write(b"first pack content " * 10)
    repo.flush()
    b = repo.contents.write(b"second pack content " * 10)
    repo.flush()
    storage, fmt = repo.storage, repo.format
    pack_a, pack_b = (repo.contents.lookup(x).pack for x in (a, b))
    assert pack_a != pack_b
    storage.put(pack_b, storage.get(pack_a))
    with pytest.raises(CorruptionError, match="local index"):
        read_local_index(storage, pack_b, fmt.keys.index_aead())
    fresh = ContentStore(storage, fmt, SESSION)
    with pytest.raises(CorruptionError):
        fresh.read(b)
    assert fresh.read(a) == b"first pack content " * 10


def test_content_record_under_another_id_or_compression_fails_authentication(small_repo):
    repo, datas = small_repo
    store = ContentStore(repo.storage, repo.format, SESSION)
    cids = [cid for cid, d in datas.items() if d]
    e_a, e_b = store.lookup(cids[0]), store.lookup(cids[1])
    moved = IndexEntry(e_b.content_id, e_a.pack, e_a.offset, e_a.packed_length, e_a.original_length,
                       e_a.compression, e_a.timestamp_us)
    with pytest.raises(CorruptionError, match="authentication"):
        store.read_entry(moved, moved.content_id)
    other_compression = IndexEntry(e_a.content_id, e_a.pack, e_a.offset, e_a.packed_length,
                                   e_a.original_length, 1 - e_a.compression, e_a.timestamp_us)
    with pytest.raises(CorruptionError):
        store.read_entry(other_compression, other_compression.content_id)
    wrong_length = IndexEntry(e_a.content_id, e_a.pack, e_a.offset, e_a.packed_length,
                              e_a.original_length + 1, e_a.compression, e_a.timestamp_us)
    with pytest.raises(CorruptionError):
        store.read_entry(wrong_length, wrong_length.content_id)


# ---- index blobs ---------------------------------------------------------------------------

def test_every_index_blob_byte_flip_and_truncation_is_detected(small_repo):
    repo, _ = small_repo
    storage, fmt = repo.storage, repo.format
    name = _only(storage, C.INDEX_PREFIX)
    original = storage.get(name)
    damaged = [_flipped(original, p, 0x01) for p in range(len(original))]
    damaged += [_flipped(original, p, 0xFF) for p in range(0, len(original), 5)]
    damaged += [original[:n] for n in range(len(original))]
    for raw in damaged:
        storage.put(name, raw)
        with pytest.raises(CorruptionError, match=name):
            load_committed_index(storage, fmt)
    storage.put(name, damaged[len(original) // 2])
    repo = Repository.open(storage, "correct horse battery staple")  # the index is loaded on first use
    with pytest.raises(CorruptionError):
        repo.contents.lookup(b"\0" * C.CONTENT_ID_SIZE)


def test_index_blob_under_another_name_fails_authentication(small_repo):
    repo, _ = small_repo
    storage = repo.storage
    name = _only(storage, C.INDEX_PREFIX)
    other = name.replace(f"-{repo.session}", f"-{SESSION}")
    assert other != name
    storage.put(other, storage.get(name))
    storage.delete(name)
    with pytest.raises(CorruptionError, match=other):
        load_committed_index(storage, repo.format)


# ---- the format blob -----------------------------------------------------------------------

def _header_span(blob: bytes) -> tuple[int, int]:
    _, _, header_len = C.FORMAT_PREAMBLE.unpack_from(blob)
    return C.FORMAT_PREAMBLE.size, C.FORMAT_PREAMBLE.size + header_len


def test_every_format_blob_byte_flip_is_detected(small_repo, password):
    repo, _ = small_repo
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    version_bytes = range(8, 10)
    positions = [(p, 0x01) for p in range(len(blob))] + [(p, 0xFF) for p in range(0, len(blob), 3)]
    for pos, mask in positions:
        # The version is read before the checksum, so a future format with another checksum
        # still gets "unsupported version" rather than "damaged".
        # (a flip to another version this kdist reads, 2 to 3, is damage like any other)
        flipped_version = int.from_bytes(_flipped(blob, pos, mask)[8:10], "big")
        expected = UnsupportedVersion if pos in version_bytes and flipped_version not in C.FORMAT_VERSIONS_READ \
            else CorruptionError
        with pytest.raises(expected):
            format_blob.decode(_flipped(blob, pos, mask), password)


def test_sealed_part_flip_with_valid_checksum_is_wrong_password(small_repo, password):
    repo, _ = small_repo
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    start, end = _header_span(blob)
    sealed = msgpack.unpackb(blob[start:end])["sealed"]
    s = blob.index(sealed)
    assert blob.count(sealed) == 1
    for pos in range(s, s + len(sealed)):
        with pytest.raises(WrongPassword):
            format_blob.decode(_reseal_checksum(_flipped(blob[:end], pos, 0x01)), password)


def test_any_header_flip_with_valid_checksum_is_a_typed_error(small_repo, password, monkeypatch):
    import hashlib as hashlib_module

    real_scrypt = hashlib_module.scrypt

    def bounded_scrypt(pw, *, salt, n, r, p, maxmem, dklen):
        assert n * r * p <= 2**12, "a damaged header made the reader run an expensive KDF"
        return real_scrypt(pw, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)

    monkeypatch.setattr(hashlib_module, "scrypt", bounded_scrypt)
    repo, _ = small_repo
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    start, end = _header_span(blob)
    for pos in range(start, end):
        for mask in (0x01, 0x80):
            with pytest.raises((CorruptionError, WrongPassword, UnsupportedVersion)):
                format_blob.decode(_reseal_checksum(_flipped(blob[:end], pos, mask)), password)


def test_truncated_or_extended_format_blob_is_corruption(small_repo, password):
    repo, _ = small_repo
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    for n in range(len(blob)):
        with pytest.raises(CorruptionError):
            format_blob.decode(blob[:n], password)
    with pytest.raises(CorruptionError):
        format_blob.decode(blob + b"\0", password)
    with pytest.raises(CorruptionError):
        format_blob.decode(b"\0" * (format_blob.MAX_FORMAT_BLOB_SIZE + 1), password)


def test_sanity_of_the_flip_helpers(small_repo, password):
    """The tamper loops above mean something only if the untampered blobs open."""
    repo, datas = small_repo
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    _, end = _header_span(blob)
    assert _reseal_checksum(blob[:end]) == blob
    assert format_blob.decode(blob, password).keys == repo.format.keys
    assert _flipped(_flipped(blob, 3, 0x01), 3, 0x01) == blob != _flipped(blob, 3, 0x01)
