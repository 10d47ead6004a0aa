"""How a content becomes a record in a pack, and back: one codec per format, one interface.

- ``KeyedRecords`` (format versions 1 and 2): AEAD under the master key's content subkey; the id
  is the keyed hash of the plaintext, and a reference is the id. Checking a record means
  opening it.
- ``ConvergentRecords`` (format version 3, ``repo_format.convergent``): deterministic AEAD under
  a key from the plaintext; the id is the keyed hash of the record, and a reference is the id
  followed by the seed that opens it. Checking a record needs no key but the hash secret's.

The interface (what the content store uses, nothing else):
- ``ref_size``: the bytes of a reference; its first ``CONTENT_ID_SIZE`` are the content id;
- ``identify(data, level)``: ``(reference, Sealed or None)``; None when the id comes cheaper
  than the record (format 2 hashes the plaintext), so a deduplicated content is never sealed;
- ``seal(data, level, ref=None)``: the ``Sealed`` record (``ref``: what ``identify`` gave for
  ``data``, which spares format 2 hashing it again);
- ``certify(entry, record)``: ``CorruptionError`` unless the record is the one the entry names;
- ``open(ref, entry, record)``: the plaintext, certified and checked against the reference;
- ``matches(ref, data)``: whether ``data`` is the plaintext ``ref`` names.
"""

from __future__ import annotations

from repo_format import constants as C
from repo_format.compression import compress, decompress
from repo_format.convergent import ConvergentRecords, Sealed
from repo_format.crypto import RepositoryKeys
from repo_format.errors import CorruptionError
from repo_format.pack import content_aad

__all__ = ["ConvergentRecords", "KeyedRecords", "Sealed", "records_for"]


class KeyedRecords:
    ref_size = C.CONTENT_ID_SIZE

    def __init__(self, keys: RepositoryKeys):
        self._aead = keys.content_aead()
        self._hash = keys.content_hasher()

    def identify(self, data, level: int) -> tuple[bytes, None]:
        return self._hash(data), None

    def seal(self, data, level: int, ref: bytes | None = None) -> Sealed:
        cid = self._hash(data) if ref is None else ref
        compression, payload = compress(data, level)
        return Sealed(cid, compression, self._aead.seal(payload, content_aad(cid, compression)), len(data))

    def certify(self, entry, record) -> None:
        self.open(entry.content_id, entry, record)

    def open(self, ref: bytes, entry, record) -> bytes:
        """A sealed record's plaintext: authenticated against the entry's id and compression,
        decompressed, and checked against its id."""
        if ref != entry.content_id:
            raise CorruptionError(f"content {bytes(ref).hex()[:64]} is not the one its entry names")
        payload = self._aead.open(record, content_aad(entry.content_id, entry.compression),
                                  what=f"content {entry.content_id.hex()} in pack {entry.pack}")
        data = decompress(entry.compression, payload, entry.original_length)
        if self._hash(data) != entry.content_id:
            raise CorruptionError(f"content {entry.content_id.hex()} does not match its id")
        return data

    def matches(self, ref: bytes, data) -> bool:
        return self._hash(data) == ref


def records_for(keys: RepositoryKeys, version: int) -> KeyedRecords | ConvergentRecords:
    """The codec of a repository at format ``version``."""
    return keys.convergent_records() if version >= C.FORMAT_VERSION_CONVERGENT else KeyedRecords(keys)
