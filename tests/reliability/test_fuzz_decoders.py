"""Fuzzing every decoder that reads repository bytes: a clean ``KdistError`` or a well-typed
result, never another exception type, never a hang.

Each decoder is fuzzed at two layers. The sealed layer takes random or mutated bytes, as an
attacker without the key can write them. The plaintext layer takes random or mutated msgpack and
binary structures sealed with the repository's own keys, as a compromised writer can: whatever
decodes must then be usable by its consumers (typed fields within their ranges).

The number of examples per test is ``KDIST_FUZZ_EXAMPLES`` (default 400: 13 tests, 5,200 cases,
about 15 s on two cores); a longer soak (260,000 cases, about 15 minutes) is::

    KDIST_FUZZ_EXAMPLES=20000 pytest -q tests/reliability/test_fuzz_decoders.py
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import zlib
from unittest import mock

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")  # as the other test folders do

import msgpack  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdist.snapshot import (ENTRY_TYPES, MAX_NAME_BYTES, Entry, Snapshot, Source,  # noqa: E402
                            check_entry_name, decode_directory, encode_directory)
from repo_format import constants as C  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format.crypto import Aead, KdfParams, RepositoryKeys  # noqa: E402
from repo_format.errors import KdistError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import IndexBlob, IndexEntry, encode_index, open_index  # noqa: E402
from repo_format.manifest import ManifestRecord, ManifestStore  # noqa: E402
from repo_format.objects import ObjectStore  # noqa: E402
from repo_format.safety import safety_of  # noqa: E402
from repo_format.records import KeyedRecords  # noqa: E402
from repo_format.pack import (MAX_LOCAL_INDEX, PackWriter, local_index_aad, parse_postamble,  # noqa: E402
                              read_local_index)
from repo_format.storage.base import validate_name  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

EXAMPLES = int(os.environ.get("KDIST_FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_SECONDS = 5.0  # any one decode taking longer than this counts as a hang

PASSWORD = "fuzz password"
KEYS = RepositoryKeys(bytes(range(32)), bytes(range(32, 64)), C.AEAD_AES_256_GCM)
INDEX_AEAD, MANIFEST_AEAD = KEYS.index_aead(), KEYS.manifest_aead()
SESSION = "0123456789abcdef"
PACK = "p" + "ab" * 16 + "-" + SESSION
WEAK_KDF = KdfParams(n=16, r=8, p=1, salt=bytes(16))
PARAMETERS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024,
                                  chunk_avg=1024, chunk_min=256, chunk_max=4096)
UNIQUE_ID = bytes(16)
VALID_FORMAT_BLOB = format_blob.encode(UNIQUE_ID, WEAK_KDF, PASSWORD, KEYS, PARAMETERS, nonce=bytes(12))
WRAPPING_KEY = WEAK_KDF.derive(PASSWORD)

# ---- strategies ----------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
interesting_ints = st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
scalars = (st.none() | st.booleans() | interesting_ints | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=12) | st.binary(max_size=40))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), kids, max_size=4),
                      max_leaves=12)


def mutated(doc, draw):
    """``doc`` with a random field somewhere replaced, removed or added (a dict or list path)."""
    node = doc
    for _ in range(draw(st.integers(0, 4))):
        kids = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        kids = [(k, v) for k, v in kids if isinstance(v, (dict, list))]
        if not kids:
            break
        node = draw(st.sampled_from(kids))[1]
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node, key=repr)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[key] = draw(values)
        elif action == "delete":
            del node[key]
        else:
            node[draw(st.text(max_size=8))] = draw(values)
    elif isinstance(node, list) and node:
        node[draw(st.integers(0, len(node) - 1))] = draw(values)
    return doc


def flipped(raw: bytes, draw) -> bytes:
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out[:draw(st.integers(0, len(out)))]) if draw(st.booleans()) else bytes(out)


def clean(fn, *args):
    """Run one decode: it returns, or raises a ``KdistError``, within the hang bound."""
    start = time.monotonic()
    try:
        return fn(*args)
    except KdistError:
        return None
    finally:
        assert time.monotonic() - start < HANG_SECONDS, "a decode took too long"


# ---- the format blob -----------------------------------------------------------------------

def _bounded_scrypt(real):
    def scrypt(pw, *, salt, n, r, p, maxmem, dklen):
        assert 128 * n * r <= 2**30 and p <= 4, "a hostile format blob ran the KDF out of its documented range"
        return real(pw, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)
    return scrypt


def _with_checksum(body: bytes) -> bytes:
    from repo_format.crypto import unkeyed_checksum
    return body + unkeyed_checksum(body)


def _format_blob(header) -> bytes:
    raw = msgpack.packb(header)
    return _with_checksum(C.FORMAT_PREAMBLE.pack(C.FORMAT_MAGIC, C.FORMAT_VERSION, len(raw)) + raw)


def _check_format_blob(fb) -> None:
    if fb is None:
        return
    assert fb.keys.master_key == KEYS.master_key and fb.keys.hash_secret == KEYS.hash_secret
    fb.parameters.validate()
    fb.keys.content_aead(), fb.keys.index_aead(), fb.keys.content_hasher()(b"x"), fb.keys.chunker_seed()


@fuzz
@given(st.data())
def test_format_blob_sealed_layer(data):
    """Random bytes, and the valid blob with bytes changed or cut (checksum fixed up or not)."""
    kind = data.draw(st.sampled_from(["random", "after magic", "flipped", "flipped, checksum fixed"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=400))
    elif kind == "after magic":
        raw = C.FORMAT_MAGIC + b"\0\1" + data.draw(st.binary(max_size=400))
    else:
        raw = flipped(VALID_FORMAT_BLOB, data.draw)
        if kind.endswith("fixed"):
            raw = _with_checksum(raw[:-C.FORMAT_CHECKSUM_SIZE])
    with mock.patch.object(hashlib, "scrypt", _bounded_scrypt(hashlib.scrypt)):
        _check_format_blob(clean(format_blob.decode, raw, PASSWORD))


def _valid_header() -> dict:
    start = C.FORMAT_PREAMBLE.size
    return msgpack.unpackb(VALID_FORMAT_BLOB[start:-C.FORMAT_CHECKSUM_SIZE])


@fuzz
@given(st.data())
def test_format_blob_header_plaintext(data):
    """The header map (unique id, KDF parameters, sealed payload) forged or mutated."""
    header = data.draw(values) if data.draw(st.booleans()) else mutated(_valid_header(), data.draw)
    with mock.patch.object(hashlib, "scrypt", _bounded_scrypt(hashlib.scrypt)):
        _check_format_blob(clean(format_blob.decode, _format_blob(header), PASSWORD))


def _valid_payload() -> dict:
    return {"master_key": KEYS.master_key, "hash_secret": KEYS.hash_secret, "parameters": PARAMETERS.to_dict()}


@fuzz
@given(st.data())
def test_format_blob_sealed_payload_plaintext(data):
    """The payload sealed under the password (keys and tunables) forged by someone who knows it."""
    payload = data.draw(values) if data.draw(st.booleans()) else mutated(_valid_payload(), data.draw)
    aad = C.FORMAT_MAGIC + C.FORMAT_VERSION.to_bytes(2, "big") + UNIQUE_ID
    sealed = Aead(C.AEAD_AES_256_GCM, WRAPPING_KEY).seal(msgpack.packb(payload), aad)
    header = {"unique_id": UNIQUE_ID, "kdf": WEAK_KDF.to_dict(), "sealed": sealed}
    fb = clean(format_blob.decode, _format_blob(header), PASSWORD)
    if fb is not None:
        fb.parameters.validate()
        clean(safety_of, fb.parameters)  # the GC margins stored in ``extra``
        assert type(fb.keys.master_key) is bytes and len(fb.keys.master_key) == 32
        fb.keys.content_aead(), fb.keys.manifest_aead(), fb.keys.content_hasher()(b"x"), fb.keys.chunker_seed()


# ---- packs: postamble and local index ------------------------------------------------------

def _postamble(magic, version, offset, length, fix_crc=True) -> bytes:
    post = C.PACK_POSTAMBLE.pack(magic, version, offset, length, 0)[:-4]
    crc = zlib.crc32(post) if fix_crc else 0
    return post + crc.to_bytes(4, "big")


u64 = st.integers(0, 2**64 - 1) | interesting_ints.filter(lambda i: 0 <= i < 2**64)
postambles = st.builds(_postamble, st.sampled_from([C.PACK_MAGIC, b"KDPX"]), st.sampled_from([1, 2, 255]), u64, u32,
                       st.booleans())


@fuzz
@given(st.binary(max_size=30) | postambles, st.integers(0, 2**64) | st.sampled_from([24, 100, 2**32]))
def test_pack_postamble(post, size):
    got = clean(parse_postamble, post, size, PACK)
    if got is not None:
        offset, length = got
        assert offset + length + C.PACK_POSTAMBLE.size == size and length <= MAX_LOCAL_INDEX


def _valid_pack() -> bytes:
    w = PackWriter(PACK)
    aead = KEYS.content_aead()
    for i in range(3):
        w.add(bytes([i]) * 32, 0, aead.seal(b"record %d" % i, bytes([i]) * 32 + b"\0"), 8, 1)
    return w.finish(INDEX_AEAD)


VALID_PACK = _valid_pack()


@fuzz
@given(st.data())
def test_pack_sealed_layer(data):
    """Random pack bytes, and the valid pack flipped or cut; a postamble with a valid CRC too."""
    kind = data.draw(st.sampled_from(["random", "flipped", "random body, valid postamble"]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=300))
    elif kind == "flipped":
        raw = flipped(VALID_PACK, data.draw)
    else:
        body = data.draw(st.binary(max_size=300))
        cut = data.draw(st.integers(0, len(body)))
        raw = body + _postamble(C.PACK_MAGIC, 1, cut, len(body) - cut)
    storage = MemoryStorage()
    storage.put(PACK, raw)
    entries = clean(read_local_index, storage, PACK, INDEX_AEAD)
    if entries is not None:
        _check_entries(entries, len(raw))


def _check_entries(entries: list[IndexEntry], pack_size: int) -> None:
    for e in entries:
        assert e.pack == PACK and e.offset + e.packed_length <= pack_size


# ---- index encodings (index blobs and local indexes) ---------------------------------------

@st.composite
def index_plaintexts(draw) -> bytes:
    """Index encodings with plausible and absurd headers, pack tables and entry tables."""
    if draw(st.integers(0, 4)) == 0:  # a valid encoding, then damaged
        es = [IndexEntry(draw(st.binary(min_size=32, max_size=32)), draw(st.sampled_from([PACK, "q1-" + SESSION])),
                         draw(u32), draw(u32), draw(u32), draw(st.integers(0, 255)),
                         draw(st.integers(-(2**63), 2**63 - 1)), draw(st.booleans()))
              for _ in range(draw(st.integers(0, 4)))]
        return flipped(encode_index(es), draw)
    names = draw(st.lists(st.sampled_from([PACK.encode(), b"", b"../../x", b"p" * 201, "ü".encode(), b"q1-a"])
                          | st.binary(max_size=12), max_size=3))
    count = draw(st.integers(0, 4) | interesting_ints.filter(lambda i: 0 <= i < 2**32))
    npacks = draw(st.just(len(names)) | st.integers(0, 5) | interesting_ints.filter(lambda i: 0 <= i < 2**32))
    header = C.INDEX_HEADER.pack(draw(st.sampled_from([C.INDEX_MAGIC, b"KDIY"])), draw(st.sampled_from([1, 1, 2])),
                                 draw(st.integers(0, 255)), 0, count, npacks)
    table = b"".join(C.INDEX_PACK_NAME_LENGTH.pack(draw(st.just(len(n)) | st.integers(0, 65535))) + n for n in names)
    entries = b"".join(draw(st.binary(min_size=60, max_size=60)) for _ in range(draw(st.integers(0, 4))))
    return header + table + entries + draw(st.sampled_from([b"", b"\0", b"\0" * 59]))


def _check_index(blob: IndexBlob) -> None:
    for name in blob.packs:
        validate_name(name)
    ids = [e.content_id for e in blob]
    assert ids == sorted(set(ids)) and len(ids) == len(blob)
    for e in blob:
        assert e.pack in blob.packs and blob.lookup(e.content_id) == e


@fuzz
@given(st.binary(max_size=200) | index_plaintexts(),
       st.sampled_from(["xn0_" + "ab" * 16 + "-" + SESSION, "xs3_00_0of1"]))
def test_index_blob_sealed_layer(raw, name):
    """Random bytes under an index blob name: authentication fails, with the name in the error."""
    try:
        open_index(INDEX_AEAD, name, raw)
    except KdistError as exc:
        assert name in str(exc)
    else:
        raise AssertionError("random bytes opened as an index blob")


@fuzz
@given(index_plaintexts())
def test_index_plaintext(plain):
    """A compromised writer's index encoding, sealed correctly: refused or consistent."""
    name = "xn0_" + "cd" * 16 + "-" + SESSION
    blob = clean(open_index, INDEX_AEAD, name, INDEX_AEAD.seal(plain, name.encode()))
    if blob is not None:
        _check_index(blob)


@fuzz
@given(index_plaintexts(), st.binary(max_size=200))
def test_pack_local_index_plaintext(plain, records):
    """A pack whose sealed local index is a forged encoding: refused, or every entry inside the
    records and naming the pack itself."""
    sealed = INDEX_AEAD.seal(plain, local_index_aad(PACK))
    raw = records + sealed + _postamble(C.PACK_MAGIC, 1, len(records), len(sealed))
    storage = MemoryStorage()
    storage.put(PACK, raw)
    entries = clean(read_local_index, storage, PACK, INDEX_AEAD)
    if entries is not None:
        _check_entries(entries, len(records))


# ---- directory objects ---------------------------------------------------------------------

def _valid_directory() -> dict:
    es = [Entry("file", "f", mode=0o644, size=12, mtime_ns=1_600_000_000 * 10**9, uid=1000, gid=1000, user="u",
                group="g", oid="ab" * 32, inode=7, ctime_ns=5, nlink=1),
          Entry("dir", "d", mode=0o755, oid="I" + "cd" * 32, summary={"files": 1, "dirs": 0, "bytes": 12}),
          Entry("link", "l", target="../file")]
    return msgpack.unpackb(encode_directory(es), raw=False)


def _check_directory(entries: list[Entry]) -> None:
    """What restore, ls, diff and the uploader do with entries must work on anything decoded."""
    names = set()
    for e in entries:
        check_entry_name(e.name)
        assert e.name not in names and e.type in ENTRY_TYPES
        names.add(e.name)
        for k in ("mode", "size", "mtime_ns", "ctime_ns", "uid", "gid", "inode", "nlink"):
            assert type(getattr(e, k)) is int
        assert 0 <= e.uid < 2**32 and 0 <= e.gid < 2**32 and -(2**63) <= e.mtime_ns < 2**63 and e.size >= 0
        assert all(type(getattr(e, k)) is str for k in ("user", "group", "target", "oid"))
        assert "\0" not in e.target and len(os.fsencode(e.target)) <= MAX_NAME_BYTES
        datetime.datetime.fromtimestamp(e.mtime_ns / 1e9)  # what ``snapshot ls`` prints
        f"{e.type} {oct(e.mode)[2:]:>4} {e.size:>12} {e.summary.get('files', 0)}"
    encode_directory(entries)  # the uploader writes reused entries back


@fuzz
@given(st.data())
def test_directory_object_sealed_bytes(data):
    """Random bytes as a directory object's plaintext (contents are authenticated before this:
    these are what a compromised writer can store)."""
    raw = data.draw(st.binary(max_size=300)) if data.draw(st.booleans()) else flipped(
        encode_directory([Entry("a", "f", size=3, oid="ab" * 32), Entry("b", "l", target="a")]), data.draw)
    entries = clean(decode_directory, raw)
    if entries is not None:
        _check_directory(entries)


@fuzz
@given(st.data())
def test_directory_object_plaintext(data):
    doc = data.draw(values) if data.draw(st.integers(0, 3)) == 0 else mutated(_valid_directory(), data.draw)
    entries = clean(decode_directory, msgpack.packb(doc))
    if entries is not None:
        _check_directory(entries)


# ---- manifests, snapshot payloads and chunk lists ------------------------------------------

def _valid_manifest() -> dict:
    rec = ManifestRecord("ab" * 16, {"type": "snapshot", "host": "h"}, 1_700_000_000_000_000, b"payload")
    return {"v": 1, "records": [rec.to_wire(), ManifestRecord("cd" * 16, {}, 5, deleted=True).to_wire()]}


@fuzz
@given(st.data())
def test_manifest_blob(data):
    """Sealed layer (random bytes under a manifest name) and plaintext layer (forged documents)."""
    name = f"m{'ef' * 12}-{SESSION}"
    layer = data.draw(st.sampled_from(["sealed", "plaintext", "mutated"]))
    if layer == "sealed":
        sealed = data.draw(st.binary(max_size=300))
    else:
        doc = data.draw(values) if layer == "plaintext" else mutated(_valid_manifest(), data.draw)
        sealed = MANIFEST_AEAD.seal(msgpack.packb(doc), name.encode())
    storage = MemoryStorage()
    storage.put(name, sealed)
    records = clean(ManifestStore(storage, MANIFEST_AEAD, SESSION).read_blob, name)
    assert layer != "sealed" or records is None
    for r in records or ():
        assert type(r.id) is str and type(r.labels) is dict and type(r.ts) is int
        assert type(r.payload) is bytes and type(r.deleted) is bool
        r.labels.get("type") == "snapshot"


def _valid_snapshot_payload() -> dict:
    snap = Snapshot(Source("h", "u", "/p"), root="I" + "ab" * 32, start=1.5, end=2.5,
                    totals={"files": 1, "bytes": 10}, tags=["t"], errors=[{"path": "x", "error": "y"}])
    return msgpack.unpackb(snap.payload(), raw=False)


@fuzz
@given(st.data())
def test_snapshot_payload(data):
    payload = data.draw(values) if data.draw(st.integers(0, 3)) == 0 else mutated(_valid_snapshot_payload(), data.draw)
    rec = ManifestRecord("ab" * 16, {"type": "snapshot"}, 1, msgpack.packb(payload))
    snap = clean(Snapshot.from_record, rec)
    if snap is not None:  # what list, restore, gc and the JSON output do with it
        datetime.datetime.fromtimestamp(snap.end)
        sorted([snap, snap], key=lambda s: (s.end, s.ts))
        f"{snap.source.host[:15]:<16}{snap.totals.get('files', 0):>8} {', '.join(snap.tags)} {snap.source.path}"
        json.dumps({"source": vars(snap.source), "totals": snap.totals, "errors": snap.errors, "tags": snap.tags,
                    "root": snap.root, "description": snap.description, "checkpoint": snap.checkpoint})
        snap.root.startswith("I")


class _OneContent:
    """Stands in for the content store (of format 2's 32-byte references): every content reads
    as ``data``."""

    def __init__(self, data: bytes):
        self.data = data
        self.records = KeyedRecords

    def read(self, cid: bytes) -> bytes:
        return self.data


@fuzz
@given(st.data())
def test_object_chunk_list(data):
    if data.draw(st.booleans()):
        listing = data.draw(values)
    else:
        listing = mutated({"v": 1, "chunks": [[b"\1" * 32, 100], [b"\2" * 32, 7]]}, data.draw)
    store = ObjectStore(_OneContent(msgpack.packb(listing)), splitter=None)
    chunks = clean(store.chunks, "I" + "ab" * 32)
    for cid, n in chunks or ():
        assert type(cid) is bytes and len(cid) == 32 and type(n) is int and 0 <= n < 2**63
