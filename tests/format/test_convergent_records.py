"""Format 3's content records (repo_format.convergent, SPEC.md section 4a): the same plaintext
gives the same record and id to every writer; a reference opens its record and nothing else
does; and a record is checked against its id, compression and length without its plaintext."""

from __future__ import annotations

import os

import blake3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_format import constants as C
from repo_format.compression import compress
from repo_format.convergent import REF_SIZE, ConvergentRecords, split_ref
from repo_format.crypto import RepositoryKeys
from repo_format.errors import CorruptionError, KdistError
from repo_format.index import IndexEntry

KEYS = RepositoryKeys(master_key=bytes(range(32)), hash_secret=bytes(range(32, 64)),
                      aead_algorithm=C.AEAD_AES_256_GCM)
# Format change if these change (tests/format/test_golden_vectors.py's rule): the record and id
# of b"kdist golden record" * 8 at zstd level 3 under KEYS.
GOLDEN_ID = "84243aeca197cf98f6d3baf11c246cba20cc10817657bb1fd7d865cfff17d0fb"


def _entry(cid: bytes, compression: int, original_length: int, record: bytes) -> IndexEntry:
    return IndexEntry(cid, "p" + "0" * 64, 0, len(record), original_length, compression, 1)


def _of(s) -> IndexEntry:
    return _entry(s.content_id, s.compression, s.original_length, s.record)


def _records(hash_secret: bytes = bytes(range(32, 64))) -> ConvergentRecords:
    return RepositoryKeys(os.urandom(32), hash_secret, C.AEAD_AES_256_GCM).convergent_records()


def _from_spec(data: bytes, level: int) -> tuple[bytes, bytes, int]:
    """SPEC.md section 4a written out again from the primitives: ``(ref, record, compression)``."""
    def subkey(info: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, None, info).derive(bytes(range(32, 64)))  # of the hash secret
    seed = blake3.blake3(data, key=subkey(b"kdist/v3/convergence")).digest()
    record_key = HKDF(hashes.SHA256(), 64, None, b"kdist/v3/record-key").derive(seed)
    compression, payload = compress(data, level)
    header = bytes([compression]) + len(data).to_bytes(8, "big")
    record = AESSIV(record_key).encrypt(bytes([compression]) + bytes(payload), [b"kdist/v3/record", header])
    cid = blake3.blake3(b"kdist/v3/record-id\x00" + header + record, key=subkey(b"kdist/v3/record-id")).digest()
    return cid + seed, record, compression


@pytest.mark.parametrize("data", [b"", b"x", os.urandom(1000), b"compressible " * 5000],
                         ids=["empty", "one-byte", "random", "compressible"])
def test_every_writer_seals_the_same_plaintext_alike_and_the_spec_says_how(data):
    alice, bob = _records(), _records()  # two hosts: other master keys, the one hash secret
    a, b = alice.seal(data, 3), bob.seal(data, 3)
    assert a == b and len(a.ref) == REF_SIZE and a.original_length == len(data)
    assert (a.ref, a.record, a.compression) == _from_spec(data, 3)
    assert bob.open(a.ref, _of(a), a.record) == data
    assert _records(os.urandom(32)).seal(data, 3).ref != a.ref  # another repository's secret


def test_the_record_hides_the_plaintext_and_opens_only_with_its_seed():
    r = _records()
    data, other = os.urandom(5000), os.urandom(5000)
    s, t = r.seal(data, 3), r.seal(other, 3)
    assert data[:32] not in s.record
    cid, _seed = split_ref(s.ref)
    with pytest.raises(CorruptionError, match="does not open with its reference's seed"):
        r.open(cid + split_ref(t.ref)[1], _of(s), s.record)


def test_a_record_is_certified_without_its_plaintext_and_nothing_else_is():
    r = _records()
    s = r.seal(b"certify me " * 100, 3)
    cid = s.content_id
    r.certify(_of(s), s.record)  # (no seed, no plaintext)
    flipped = bytearray(s.record)
    flipped[-1] ^= 1
    other = r.seal(b"another content " * 100, 3)
    for compression, length, record in [
        (s.compression, s.original_length, bytes(flipped)),
        (s.compression, s.original_length, s.record[:-1]),
        (C.COMPRESSION_NONE, s.original_length, s.record),  # an entry lying about the compression
        (s.compression, s.original_length + 1, s.record),  # ... or the length
        (s.compression, -1, s.record),
        (256, s.original_length, s.record),
        (other.compression, other.original_length, other.record),  # a genuine record, another id
        (s.compression, s.original_length, b""),
    ]:
        with pytest.raises(CorruptionError, match="does not match its record"):
            r.certify(_entry(cid, compression, length, record), record)
        with pytest.raises(CorruptionError):
            r.open(s.ref, _entry(cid, compression, length, record), record)


def test_two_compressions_of_one_plaintext_are_two_records_and_both_open():
    """Writers with another zstd level (or version) store another record under the same record
    key: AES-SIV keeps both secure (deterministic encryption of different messages), and each has
    its own id, so they deduplicate only among themselves."""
    r = _records()
    data = b"the same plaintext " * 1000
    zstd, plain = r.seal(data, 3), r.seal(data, 0)
    assert (zstd.compression, plain.compression) == (C.COMPRESSION_ZSTD, C.COMPRESSION_NONE)
    assert zstd.content_id != plain.content_id and split_ref(zstd.ref)[1] == split_ref(plain.ref)[1]
    for s in (zstd, plain):
        assert r.open(s.ref, _of(s), s.record) == data


def test_a_record_sealed_under_a_seed_it_does_not_match_is_refused():
    """A writer that encrypts other bytes under a content's seed makes a record whose id
    certifies: opening it still checks the plaintext against the seed."""
    r = _records()
    seed = r.seed(b"what the reference promises")
    wrong = b"what the record holds"
    record_key = HKDF(hashes.SHA256(), 64, None, b"kdist/v3/record-key").derive(seed)
    header = bytes([C.COMPRESSION_NONE]) + len(wrong).to_bytes(8, "big")
    record = AESSIV(record_key).encrypt(bytes([C.COMPRESSION_NONE]) + wrong, [b"kdist/v3/record", header])
    cid = r.record_id(C.COMPRESSION_NONE, len(wrong), record)
    entry = _entry(cid, C.COMPRESSION_NONE, len(wrong), record)
    r.certify(entry, record)
    with pytest.raises(CorruptionError, match="does not match its reference's seed"):
        r.open(cid + seed, entry, record)
    assert r.matches(cid + seed, b"what the reference promises") and not r.matches(cid + seed, wrong)


def test_malformed_references_are_corruption():
    r = _records()
    s = r.seal(b"x", 3)
    for ref in (s.ref[:-1], s.ref + b"\0", s.ref.hex(), None):
        with pytest.raises(CorruptionError, match="malformed content reference"):
            r.open(ref, _of(s), s.record)


def test_the_keys_are_the_hash_secrets_and_differ():
    """Both keys come from the hash secret (every key role holds it), none from the master key."""
    a = RepositoryKeys(os.urandom(32), bytes(32), C.AEAD_AES_256_GCM).convergent_records()
    b = RepositoryKeys(os.urandom(32), bytes(32), C.AEAD_AES_256_GCM).convergent_records()
    assert a.seal(b"same", 3) == b.seal(b"same", 3)
    with pytest.raises(ValueError):
        ConvergentRecords(bytes(32), bytes(32))


def test_golden_record_id():
    s = KEYS.convergent_records().seal(b"kdist golden record" * 8, 3)
    assert s.content_id.hex() == GOLDEN_ID


def test_tree_records_converge_per_host_and_every_reader_opens_them():
    """A host's directory objects and chunk lists are sealed under its tree key (HKDF of the
    master key and the host name, SPEC.md section 4a) with the tree associated data: the same
    plaintext gives each host its own record, no other host's key or the fleet's convergence key
    gives it, and a reader holding neither key opens it with the reference alone."""
    from repo_format.convergent import tree_key

    master = os.urandom(32)
    data = b"a directory object of alice's " * 20
    fleet = _records()
    alice = fleet.for_trees(tree_key(master, "alice"))
    bob = fleet.for_trees(tree_key(master, "bob"))
    ref = alice.seal(data, 3).ref
    assert alice.seal(data, 3).ref == ref  # alice's next snapshot deduplicates it
    assert ref not in {bob.seal(data, 3).ref, fleet.seal(data, 3).ref}
    # the tree associated data: the same key as a data record's still gives another record
    assert fleet.for_trees(fleet._convergence_key).seal(data, 3).ref != fleet.seal(data, 3).ref
    want = HKDF(hashes.SHA256(), 32, None, b"kdist/v3/tree-key\x00alice").derive(master)
    assert tree_key(master, "alice") == want
    s = alice.seal(data, 3)
    for reader in (fleet, bob):  # a reader with no tree key, and another host's
        assert reader.open(ref, _of(s), s.record) == data
    with pytest.raises(CorruptionError, match="does not open"):
        fleet.open(ref[:C.CONTENT_ID_SIZE] + fleet.seed(data), _of(s), s.record)


def test_per_host_keys_have_generations_as_the_spec_says():
    """SPEC.md sections 3a and 8a: generation 0 is the host name alone; a later generation
    puts ``gen`` NUL and the u32 generation first, so no host name reads as another's
    generation (and a host name holding NUL is refused)."""
    from repo_format.convergent import tree_key
    from repo_format.sealed_payloads import host_private

    master = os.urandom(32)
    derive = lambda info: HKDF(hashes.SHA256(), 32, None, info).derive(master)  # noqa: E731
    assert host_private(master, "web1", 2) == derive(b"kdist/v3/host-key\x00gen\x00\x00\x00\x00\x02web1")
    assert tree_key(master, "web1", 1) == derive(b"kdist/v3/tree-key\x00gen\x00\x00\x00\x00\x01web1")
    keys = {host_private(master, h, g) for h in ("web1", "web2") for g in range(3)}
    assert len(keys) == 6
    with pytest.raises(KdistError, match="NUL"):
        host_private(master, "gen\x00\x00\x00\x00\x01web1")
