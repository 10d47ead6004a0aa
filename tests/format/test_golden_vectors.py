"""Golden vectors: exact bytes for fixed keys, nonces and inputs, and a repository written by an
earlier kdist that every later one must read (STYLE.md rule 7).

A failing literal here means the bytes kdist writes changed: that is a format change. Do not
update a literal to make the test pass; bump the version in constants.py and keep a reader for
the old bytes (SPEC.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from repo_format import constants as C
from repo_format import format_blob
from repo_format.compression import compress, decompress
from repo_format.content import load_committed_index
from repo_format.crypto import KdfParams, RepositoryKeys
from repo_format.format_blob import RepositoryParameters
from repo_format.index import IndexBlob, IndexEntry, encode_index, index_blob_name
from repo_format.index_rebuild import entries_from_packs
from repo_format.pack import content_aad
from repo_format.repository import Repository
from repo_format.storage.memory import MemoryStorage

KEYS = RepositoryKeys(master_key=bytes(range(32)), hash_secret=bytes(range(32, 64)),
                      aead_algorithm=C.AEAD_AES_256_GCM)
UNIQUE_ID = bytes(range(16))
KDF = KdfParams(n=16, r=8, p=1, salt=bytes(range(64, 80)))  # weak: needs the test env variable
PASSWORD = "kdist golden password"
NONCE = bytes(range(100, 112))
PARAMETERS = RepositoryParameters(
    aead=C.AEAD_AES_256_GCM, hash=C.HASH_BLAKE3_KEYED, zstd_level=3, pack_size=64 * 1024,
    metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256, chunk_max=4096, extra={},
)

# Format change if any of these change.
GOLDEN_FORMAT_BLOB = bytes.fromhex(
    "4b4449535452455000010000016983a9756e697175655f6964c410000102030405060708090a0b0c0d0e0fa36b"
    "646685a9616c676f726974686da6736372797074a16e10a17208a17001a473616c74c410404142434445464748"
    "494a4b4c4d4e4fa67365616c6564c5010c6465666768696a6b6c6d6e6fbbcb977973684f861676cc2b680d2701"
    "3c3da1197f91982c718b68c0a6117c11d279857f34df1e0dfa3f71b06d7433f3a843592adbb556550b6f3ac17e"
    "366f256fcf443149afa95f077f8404a731c02c8ae80b176442ebf8f363dbf702f24fd0171bcece1270550fe43a"
    "87a8b03225466cab37cc014cd375e53a98855dcc18b4c9553f64de11f309062eaa23f1cfb81c3aa2674eed298e"
    "ef05e0eeaf5d91cdd0a9417b9494e24d4bca00a286da56cac81b7b617d1bf50f502e06c1b2f8ab69b6ff14547d"
    "456de1a1316945d8eec7dbe0c4aba92398a86920311aa781cf69e2dc06a7e35e75195d30989e12f0d9afdb5b03"
    "04c409d3bd31240be03f9918b67bf9305635a018307ed1403df0193973690391a5026655012f1a4c81a89f906d"
    "61a3"
)
GOLDEN_CONTENT_ID_KDIST = "9398fc72738af269bb2b0408730c1607f64df3b30c39478978f8f0bfc2d07f89"
GOLDEN_CONTENT = b"kdist golden content " * 20
GOLDEN_CONTENT_ID = "c411fbd37ec49c4c80103201f56c6ebfd183e001378d0f7cc564297c63998922"
# zstd output is not pinned (libzstd may compress differently across versions and that is not a
# format change); this frame is the input of the sealing vector and must always decompress.
GOLDEN_ZSTD_FRAME = bytes.fromhex("28b52ffd60a400e50000a86b6469737420676f6c64656e20636f6e74656e7420010019519d4c")
GOLDEN_SEALED_CONTENT = bytes.fromhex(
    "000000000000000000000000c91134fcd65eb5dc7878f9a0e3a40aeb507d3117e382ac561bd42a14e2cd8c74bd"
    "ade83f128f2608bd241610a1b269f9dc7cc43cfb65"
)
GOLDEN_INDEX_ENTRIES = [
    IndexEntry(bytes([1]) * 32, "pb", 0, 40, 12, C.COMPRESSION_NONE, 1_700_000_000_000_000),
    IndexEntry(bytes([2]) * 32, "pa", 4096, 1000, 2000, C.COMPRESSION_ZSTD, -5, deleted=True),
]
GOLDEN_INDEX = bytes.fromhex(
    "4b444958010000000000000200000002000270610002706201010101010101010101010101010101010101010101"
    "010101010101010101010000000100000000000000280000000c0000000000060a24181e40000202020202020202"
    "0202020202020202020202020202020202020202020202020000000000001000000003e8000007d001010000ffff"
    "fffffffffffb"
)
GOLDEN_INDEX_BLOB_NAME = "xn3_ea2200e64f9b19889442b1f72c8dc5b5-0123456789abcdef"
GOLDEN_CHUNKER_SEED = 957776130097844748

GOLDEN_REPOSITORY = Path(__file__).parent / "data" / "repository_v1.json"


def test_format_blob_bytes_are_pinned():
    blob = format_blob.encode(UNIQUE_ID, KDF, PASSWORD, KEYS, PARAMETERS, nonce=NONCE)
    assert blob.hex() == GOLDEN_FORMAT_BLOB.hex()


def test_golden_format_blob_decodes_to_its_keys():
    fb = format_blob.decode(GOLDEN_FORMAT_BLOB, PASSWORD)
    assert fb.unique_id == UNIQUE_ID and fb.kdf == KDF and fb.parameters == PARAMETERS
    assert (fb.keys.master_key, fb.keys.hash_secret, fb.keys.aead_algorithm) == (
        KEYS.master_key, KEYS.hash_secret, KEYS.aead_algorithm)


def test_content_id_is_pinned():
    assert KEYS.content_hasher()(b"kdist").hex() == GOLDEN_CONTENT_ID_KDIST
    assert KEYS.content_hasher()(GOLDEN_CONTENT).hex() == GOLDEN_CONTENT_ID


def test_sealed_content_is_pinned_and_opens():
    cid = bytes.fromhex(GOLDEN_CONTENT_ID)
    aad = content_aad(cid, C.COMPRESSION_ZSTD)
    sealed = KEYS.content_aead().seal(GOLDEN_ZSTD_FRAME, aad, nonce=bytes(12))
    assert sealed.hex() == GOLDEN_SEALED_CONTENT.hex()
    payload = KEYS.content_aead().open(GOLDEN_SEALED_CONTENT, aad)
    assert decompress(C.COMPRESSION_ZSTD, payload, len(GOLDEN_CONTENT)) == GOLDEN_CONTENT
    compression, fresh = compress(GOLDEN_CONTENT, 3)  # today's zstd: same kind, same plaintext
    assert compression == C.COMPRESSION_ZSTD
    assert decompress(compression, fresh, len(GOLDEN_CONTENT)) == GOLDEN_CONTENT


def test_index_encoding_is_pinned():
    assert encode_index(GOLDEN_INDEX_ENTRIES).hex() == GOLDEN_INDEX.hex()
    assert list(IndexBlob(GOLDEN_INDEX)) == sorted(GOLDEN_INDEX_ENTRIES, key=lambda e: e.content_id)


def test_index_blob_name_and_chunker_seed_are_pinned():
    assert index_blob_name(KEYS.name_hasher(), GOLDEN_INDEX, 3, "0123456789abcdef") == GOLDEN_INDEX_BLOB_NAME
    assert KEYS.chunker_seed() == GOLDEN_CHUNKER_SEED


def _golden_storage() -> tuple[MemoryStorage, dict]:
    fixture = json.loads(GOLDEN_REPOSITORY.read_text())
    storage = MemoryStorage()
    for name, hexdata in fixture["blobs"].items():
        storage.put(name, bytes.fromhex(hexdata))
    return storage, fixture


def test_repository_written_by_version_1_still_reads():
    storage, fixture = _golden_storage()
    repo = Repository.open(storage, fixture["password"])
    assert len(fixture["objects"]) == 2
    for oid, sha in fixture["objects"].items():
        assert hashlib.sha256(repo.objects.read_all(oid)).hexdigest() == sha
    committed = sorted(load_committed_index(storage, repo.format), key=lambda e: e.content_id)
    rebuilt = entries_from_packs(storage, repo.format)
    assert not rebuilt.damaged_packs and rebuilt.packs_read == 2
    assert sorted(rebuilt.entries, key=lambda e: e.content_id) == committed
