"""Pack blobs: many encrypted contents, then the pack's own sealed index, then a postamble.

    record*  |  local index (sealed index encoding, AAD "pack-index:" + pack name)  |  postamble

Each record is ``nonce | ciphertext | tag`` of one (possibly compressed) content, sealed with the
content id and compression as associated data. The postamble (fixed size, last bytes of the pack)
locates the local index, so every index entry can be rebuilt from packs alone.
"""

from __future__ import annotations

import bisect
import secrets
import zlib

from repo_format import constants as C
from repo_format.crypto import Aead
from repo_format.errors import CorruptionError, UnsupportedVersion
from repo_format.index import IndexBlob, IndexEntry, encode_index
from repo_format.storage.base import BlobStorage

MAX_LOCAL_INDEX = 256 * 1024 * 1024


def new_pack_name(metadata: bool, session: str) -> str:
    prefix = C.METADATA_PACK_PREFIX if metadata else C.DATA_PACK_PREFIX
    return f"{prefix}{secrets.token_hex(C.PACK_RANDOM_BYTES)}-{session}"


def content_aad(content_id: bytes, compression: int) -> bytes:
    return content_id + bytes([compression])


def local_index_aad(pack_name: str) -> bytes:
    return b"pack-index:" + pack_name.encode("ascii")


class PackWriter:
    """Builds one pack in memory. Not thread-safe: the content store serialises ``add``.

    Records are kept as the sealed bytes they arrive as and joined once, in ``finish``: growing
    one buffer would copy every record again on each reallocation, with the GIL held.
    """

    def __init__(self, name: str):
        self.name = name
        self._parts: list[bytes] = []
        self._size = 0
        self.entries: list[IndexEntry] = []

    def __len__(self) -> int:
        return self._size

    def add(self, content_id: bytes, compression: int, sealed: bytes, original_length: int,
            timestamp_us: int) -> IndexEntry:
        entry = IndexEntry(content_id, self.name, self._size, len(sealed), original_length,
                           compression, timestamp_us)
        self._parts.append(sealed)
        self._size += len(sealed)
        self.entries.append(entry)
        return entry

    def read_pending(self, entry: IndexEntry) -> bytes | None:
        """The sealed record of one of this pack's entries (None if it is not one of them)."""
        i = bisect.bisect_left(self.entries, entry.offset, key=lambda e: e.offset)
        if i == len(self.entries) or self.entries[i] != entry:
            return None
        return bytes(self._parts[i])

    def finish(self, index_aead: Aead) -> bytes:
        """The complete pack: records, sealed local index, postamble."""
        sealed_index = index_aead.seal(encode_index(self.entries), local_index_aad(self.name))
        post = C.PACK_POSTAMBLE.pack(C.PACK_MAGIC, C.PACK_VERSION, self._size, len(sealed_index), 0)
        crc = zlib.crc32(post[:-4])
        return b"".join([*self._parts, sealed_index, post[:-4], crc.to_bytes(4, "big")])


def parse_postamble(post: bytes, pack_size: int, name: str) -> tuple[int, int]:
    if len(post) != C.PACK_POSTAMBLE.size:
        raise CorruptionError(f"pack {name} is truncated (no postamble)")
    magic, version, offset, length, crc = C.PACK_POSTAMBLE.unpack(post)
    if magic != C.PACK_MAGIC or zlib.crc32(post[:-4]) != crc:
        raise CorruptionError(f"pack {name} has a damaged postamble")
    if version != C.PACK_VERSION:
        raise UnsupportedVersion(f"pack {name} has format version {version}, not supported")
    if length > MAX_LOCAL_INDEX or offset + length + C.PACK_POSTAMBLE.size != pack_size:
        raise CorruptionError(f"pack {name} postamble points outside the pack")
    return offset, length


def read_local_index(storage: BlobStorage, name: str, index_aead: Aead) -> list[IndexEntry]:
    """Every entry of a pack, from the pack alone (for ``index rebuild`` and checks)."""
    size = storage.stat(name).length
    post_size = C.PACK_POSTAMBLE.size
    if size < post_size:
        raise CorruptionError(f"pack {name} is truncated ({size} bytes)")
    offset, length = parse_postamble(storage.get(name, size - post_size, post_size), size, name)
    sealed = storage.get(name, offset, length)
    blob = IndexBlob(index_aead.open(sealed, local_index_aad(name), what=f"local index of pack {name}"))
    if blob.packs not in ([name], []):
        raise CorruptionError(f"local index of pack {name} names another pack")
    entries = list(blob)
    for e in entries:
        if e.offset + e.packed_length > offset:
            raise CorruptionError(f"local index of pack {name} points outside its records")
    return entries
