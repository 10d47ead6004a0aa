"""Format 3's content records: encrypted under a key only the plaintext gives, and named by the
keyed hash of what is stored (SPEC.md section 4a).

A content's **seed** is the keyed hash of its plaintext (the convergence key, which every key
role holds); its record key is HKDF of the seed, and its **record** the deterministic
authenticated encryption (AES-SIV, RFC 5297) of its compressed bytes under that key. Its **id**
is the keyed hash (the record-id key, which every role holds too) of the compression byte, the
plaintext length and the record. A reference to the content is ``id | seed`` (``REF_SIZE``).

What follows from that:
- *Deduplication across hosts*: two writers of the same plaintext derive the same seed, key,
  record and id (given the same compression result: another zstd version or level gives another
  record and id, so deduplication is lost between them, never safety; AES-SIV stays secure
  under one key for different messages).
- *Confidentiality*: a record opens only with its seed, which only the plaintext or a reference
  gives. References live in directory objects and chunk lists (themselves such records) and, at
  the top, in snapshot records: whoever cannot get a snapshot's root reference cannot read what
  it alone holds. A key holder who has a file can tell whether it is stored (the issue's
  "learn whether content it already has exists").
- *Authentication without the plaintext*: anyone with the record-id key checks a record
  against the id an index entry names, with its compression and length (``certify``); no
  decryption, so maintenance (merges, pack rewrite) and the dedup guard authenticate what they
  cannot read. A record that certifies is the one record the id's writer stored: ids are
  deterministic, so a writer of the plaintext refers to exactly the record its own encryption
  gives, and a forged entry can only point at bytes hashing to that id.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_format import constants as C
from repo_format.compression import compress, decompress
from repo_format.errors import CorruptionError, KdistError

SEED_SIZE = 32
REF_SIZE = C.CONTENT_ID_SIZE + SEED_SIZE
RECORD_KEY_INFO = b"kdist/v3/record-key"
RECORD_AAD = b"kdist/v3/record"
TREE_RECORD_AAD = b"kdist/v3/tree-record"  # a directory object's or chunk list's (a host's tree key)
TREE_KEY_INFO = b"kdist/v3/tree-key\x00"
ID_DOMAIN = b"kdist/v3/record-id\x00"
SIV_OVERHEAD = 16
MAX_ORIGINAL_LENGTH = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Sealed:
    """One content ready for a pack: ``ref`` (``id | seed``), and what its index entry records."""

    ref: bytes
    compression: int
    record: bytes
    original_length: int

    @property
    def content_id(self) -> bytes:
        return self.ref[: C.CONTENT_ID_SIZE]


def split_ref(ref: bytes) -> tuple[bytes, bytes]:
    """``(content id, seed)`` of a reference; ``CorruptionError`` for one of the wrong shape."""
    if type(ref) is not bytes or len(ref) != REF_SIZE:
        raise CorruptionError("malformed content reference")
    return ref[: C.CONTENT_ID_SIZE], ref[C.CONTENT_ID_SIZE:]


def _header(compression: int, original_length: int) -> bytes:
    if not (0 <= compression < 256 and 0 <= original_length <= MAX_ORIGINAL_LENGTH):
        raise CorruptionError("content record header out of range")
    return bytes([compression]) + original_length.to_bytes(8, "big")


def generation_info(info: bytes, host: str, generation: int) -> bytes:
    """The HKDF info of a per-host key: ``info`` and the host name for generation 0, else
    ``info`` followed by ``gen`` NUL, the generation (u32) and the host name (SPEC.md sections 4a, 8a)."""
    name = host.encode("utf-8", "surrogateescape")
    if b"\x00" in name:  # (so no host name of generation 0 reads as another's of a later one)
        raise KdistError(f"host name {host!r} holds a NUL character: format 3 has no keys for it")
    if generation == 0:
        return info + name
    if not 0 < generation < 2**32:
        raise ValueError("key generation out of range")
    return info + b"gen\x00" + generation.to_bytes(4, "big") + name


def tree_key(master_key: bytes, host: str, generation: int = 0) -> bytes:
    """``host``'s tree key at ``generation`` (``sealed_payloads.host_private``): the convergence
    key of its directory objects and chunk lists (admins derive it; a host key's slot holds its
    own). Another host cannot derive it, so it cannot confirm a guess of this host's directories
    by sealing the guess (SPEC.md section 4a)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=generation_info(TREE_KEY_INFO, host, generation)).derive(master_key)


class ConvergentRecords:
    """Seal, certify and open format 3 content records (the interface of
    ``repo_format.records.KeyedRecords``). ``record_id_key`` and
    ``convergence_key``: the two 32-byte keys (``RepositoryKeys``); thread-safe. With ``tree``,
    it seals tree records: under a host's tree key, with their own associated data. Every
    instance opens both kinds; a tree record's seed is not checked against its plaintext (a
    reader may not hold the host's tree key): its reference, certified id and AES-SIV bind it."""

    ref_size = REF_SIZE

    def __init__(self, record_id_key: bytes, convergence_key: bytes, tree: bool = False):
        if len(record_id_key) != 32 or len(convergence_key) != 32:
            raise ValueError("record keys must be 32 bytes")
        if record_id_key == convergence_key:
            raise ValueError("the record-id and convergence keys must differ")
        self._id_key = record_id_key
        self._convergence_key = convergence_key
        self.tree = tree
        self._aad = TREE_RECORD_AAD if tree else RECORD_AAD

    def for_trees(self, tree_convergence_key: bytes) -> "ConvergentRecords":
        """The codec sealing a host's tree records under its tree key (``tree_key``)."""
        return ConvergentRecords(self._id_key, tree_convergence_key, tree=True)

    def seed(self, data) -> bytes:
        """The plaintext's seed: its keyed hash under the convergence key."""
        return blake3.blake3(data, key=self._convergence_key).digest()

    def record_id(self, compression: int, original_length: int, record) -> bytes:
        h = blake3.blake3(ID_DOMAIN, key=self._id_key)
        h.update(_header(compression, original_length))
        h.update(record)
        return h.digest()

    @staticmethod
    def _cipher(seed: bytes) -> AESSIV:
        key = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=RECORD_KEY_INFO).derive(seed)
        return AESSIV(key)

    def seal(self, data, level: int, ref: bytes | None = None) -> Sealed:
        """The record of ``data`` compressed at zstd ``level``: the same bytes for the same
        plaintext and compression result, whoever seals it (``ref`` is not needed: the
        interface's, ``repo_format.records``)."""
        seed = self.seed(data)
        compression, payload = compress(data, level)
        # the compression byte leads the plaintext: AES-SIV refuses an empty one (the empty content)
        record = self._cipher(seed).encrypt(bytes([compression]) + payload,
                                            [self._aad, _header(compression, len(data))])
        cid = self.record_id(compression, len(data), record)
        return Sealed(cid + seed, compression, record, len(data))

    def identify(self, data, level: int) -> tuple[bytes, Sealed]:
        """The reference writing ``data`` gives, and its record: sealed first, since the id is
        the record's hash."""
        sealed = self.seal(data, level)
        return sealed.ref, sealed

    def certify(self, entry, record) -> None:
        """``CorruptionError`` unless ``record`` is the record ``entry.content_id`` names, with
        the entry's compression and length: what a reader without the seed can check. ``entry``:
        an ``IndexEntry`` or anything with those three fields."""
        try:
            ok = self.record_id(entry.compression, entry.original_length, record) == entry.content_id
        except CorruptionError:
            ok = False
        if not ok:
            raise CorruptionError(f"content {entry.content_id.hex()} does not match its record")

    def open(self, ref: bytes, entry, record) -> bytes:
        """The plaintext of the record ``ref`` names (``entry`` says where it is stored, with
        its compression and length): certified, decrypted, decompressed and checked against the
        reference's seed."""
        cid, seed = split_ref(ref)
        if cid != entry.content_id:
            raise CorruptionError(f"content {cid.hex()} is not the one its entry names")
        self.certify(entry, record)
        compression, original_length = entry.compression, entry.original_length
        header, cipher = _header(compression, original_length), self._cipher(seed)
        inner = tree = None
        # a data record, else a tree record (first the kind its pack usually holds: a failed
        # AES-SIV open costs as much as one that succeeds)
        kinds = (TREE_RECORD_AAD, RECORD_AAD) if str(entry.pack).startswith(C.METADATA_PACK_PREFIX) \
            else (RECORD_AAD, TREE_RECORD_AAD)
        for aad in kinds:
            try:
                inner, tree = cipher.decrypt(bytes(record), [aad, header]), aad == TREE_RECORD_AAD
                break
            except InvalidTag:
                continue
        if inner is None:
            raise CorruptionError(f"content {cid.hex()} does not open with its reference's seed")
        if not inner or inner[0] != compression:
            raise CorruptionError(f"content {cid.hex()} has a record of another compression")
        data = decompress(compression, memoryview(inner)[1:], original_length)
        if not tree and self.seed(data) != seed:  # (a data record's seed: the one key every role holds)
            raise CorruptionError(f"content {cid.hex()} does not match its reference's seed")
        return data

    def matches(self, ref: bytes, data) -> bool:
        """Whether ``data`` is the plaintext ``ref`` names (by its seed: nothing is sealed)."""
        return len(ref) == REF_SIZE and self.seed(data) == ref[C.CONTENT_ID_SIZE:]
