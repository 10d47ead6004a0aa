"""The format blob ``kdist.repository``: version, unique id, KDF parameters, sealed keys and tunables.

Layout (see SPEC.md): ``magic | version | header length | header (msgpack) | checksum``. The header
holds the unique id, the KDF parameters, and the sealed payload: the master key, the hash secret
and every tunable, encrypted with AES-256-GCM under the password-derived key. It is the only blob
ever overwritten (password change rewrites it with the same payload under a new wrapping).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field, fields

import msgpack

from repo_format import constants as C
from repo_format.crypto import Aead, KdfParams, RepositoryKeys, unkeyed_checksum
from repo_format.errors import (
    BlobNotFound,
    CorruptionError,
    RepositoryExists,
    RepositoryNotFound,
    UnsupportedVersion,
    WrongPassword,
)
from repo_format.storage.base import BlobStorage

MAX_FORMAT_BLOB_SIZE = 64 * 1024


@dataclass(frozen=True)
class RepositoryParameters:
    """Tunables stored (encrypted) in the format blob; validated on create and on open."""

    aead: str = C.AEAD_AES_256_GCM
    hash: str = C.HASH_BLAKE3_KEYED
    zstd_level: int = 1
    pack_size: int = 32 * 1024 * 1024
    metadata_pack_size: int = 8 * 1024 * 1024
    chunk_avg: int = 1024 * 1024
    chunk_min: int = 256 * 1024
    chunk_max: int = 4 * 1024 * 1024
    # Parameters of later layers (epochs, GC margins) live here, validated by their owners.
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        def bad(msg: str):
            raise CorruptionError(f"invalid repository parameter: {msg}")

        if self.aead not in C.AEAD_ALGORITHMS:
            raise UnsupportedVersion(f"unknown encryption algorithm {self.aead!r}")
        if self.hash != C.HASH_BLAKE3_KEYED:
            raise UnsupportedVersion(f"unknown content hash {self.hash!r}")
        sizes = (self.zstd_level, self.pack_size, self.metadata_pack_size, self.chunk_avg, self.chunk_min,
                 self.chunk_max)
        if not all(type(v) is int for v in sizes):
            bad("sizes and levels must be integers")
        if not (0 <= self.zstd_level <= 19):
            bad(f"zstd level {self.zstd_level}")
        if not (64 * 1024 <= self.metadata_pack_size <= self.pack_size <= 2**31):
            bad("pack sizes")
        if not (64 <= self.chunk_min <= self.chunk_avg <= self.chunk_max <= 16 * 1024 * 1024):
            bad("chunk sizes")
        if not (256 <= self.chunk_avg <= 4 * 1024 * 1024 and self.chunk_max >= 1024):
            bad("chunk sizes out of the chunker's range")
        if not isinstance(self.extra, dict) or not isinstance(self.extra.get("safety", {}), dict):
            bad("extra")  # the sections of later layers are maps, validated by their owners

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RepositoryParameters":
        known = {f.name for f in fields(cls)}
        try:
            params = cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, AttributeError) as exc:  # AttributeError: not a map
            raise CorruptionError("the format blob's parameters are malformed") from exc
        params.validate()
        return params


@dataclass(frozen=True)
class FormatBlob:
    """An opened format blob: everything a client needs to read and write the repository."""

    unique_id: bytes
    kdf: KdfParams
    keys: RepositoryKeys
    parameters: RepositoryParameters


def _aad(unique_id: bytes) -> bytes:
    return C.FORMAT_MAGIC + C.FORMAT_VERSION.to_bytes(2, "big") + unique_id


def encode(unique_id: bytes, kdf: KdfParams, password: str, keys: RepositoryKeys,
           parameters: RepositoryParameters, nonce: bytes | None = None) -> bytes:
    """Serialise and seal a format blob (``nonce`` only for golden test vectors)."""
    payload = msgpack.packb({
        "master_key": keys.master_key,
        "hash_secret": keys.hash_secret,
        "parameters": parameters.to_dict(),
    })
    wrapping = Aead(C.AEAD_AES_256_GCM, kdf.derive(password))
    header = msgpack.packb({
        "unique_id": unique_id,
        "kdf": kdf.to_dict(),
        "sealed": wrapping.seal(payload, _aad(unique_id), nonce=nonce),
    })
    body = C.FORMAT_PREAMBLE.pack(C.FORMAT_MAGIC, C.FORMAT_VERSION, len(header)) + header
    return body + unkeyed_checksum(body)


def _decode_header(blob: bytes) -> tuple[bytes, KdfParams, bytes]:
    """The unencrypted header: unique id, KDF parameters, sealed payload; typed errors for damage."""
    pre = C.FORMAT_PREAMBLE.size
    if len(blob) < pre + C.FORMAT_CHECKSUM_SIZE or len(blob) > MAX_FORMAT_BLOB_SIZE:
        raise CorruptionError(f"the format blob has an impossible size ({len(blob)} bytes)")
    magic, version, header_len = C.FORMAT_PREAMBLE.unpack_from(blob)
    if magic != C.FORMAT_MAGIC:
        raise CorruptionError("this is not a kdist format blob (bad magic)")
    if version != C.FORMAT_VERSION:
        raise UnsupportedVersion(
            f"repository format version {version} is not supported by this kdist "
            f"(it reads version {C.FORMAT_VERSION}); upgrade kdist"
        )
    body_end = pre + header_len
    if body_end + C.FORMAT_CHECKSUM_SIZE != len(blob):
        raise CorruptionError("the format blob is truncated or has trailing bytes")
    if unkeyed_checksum(memoryview(blob)[:body_end]) != blob[body_end:]:
        raise CorruptionError("the format blob is damaged (checksum mismatch)")
    try:
        header = msgpack.unpackb(blob[pre:body_end], raw=False)
        unique_id, sealed = header["unique_id"], header["sealed"]
        kdf = KdfParams.from_dict(header["kdf"])
        if not isinstance(unique_id, bytes) or not isinstance(sealed, bytes):
            raise TypeError("field types")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
        raise CorruptionError("the format blob's header is malformed") from exc
    return unique_id, kdf, sealed


def decode(blob: bytes, password: str) -> FormatBlob:
    """Open a format blob; typed errors for damage, unknown versions and a wrong password."""
    unique_id, kdf, sealed = _decode_header(blob)
    wrapping = Aead(C.AEAD_AES_256_GCM, kdf.derive(password))
    try:
        payload = wrapping.open(sealed, _aad(unique_id))
    except CorruptionError:
        raise WrongPassword("wrong password for this repository") from None
    try:
        p = msgpack.unpackb(payload, raw=False)
        parameters = RepositoryParameters.from_dict(p["parameters"])
        keys = RepositoryKeys(p["master_key"], p["hash_secret"], parameters.aead)
        if not (type(keys.master_key) is bytes and len(keys.master_key) == C.MASTER_KEY_SIZE
                and type(keys.hash_secret) is bytes and len(keys.hash_secret) == C.HASH_SECRET_SIZE):
            raise ValueError("key sizes")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptionError("the format blob's sealed payload is malformed") from exc
    return FormatBlob(unique_id, kdf, keys, parameters)


def create(storage: BlobStorage, password: str, parameters: RepositoryParameters | None = None,
           kdf: KdfParams | None = None) -> FormatBlob:
    """Write a new format blob; refuses to touch an existing repository."""
    parameters = parameters or RepositoryParameters()
    parameters.validate()
    kdf = kdf or KdfParams.strong()
    keys = RepositoryKeys.generate(parameters.aead)
    unique_id = secrets.token_bytes(16)
    blob = encode(unique_id, kdf, password, keys, parameters)
    if not storage.put_if_absent(C.FORMAT_BLOB_NAME, blob):
        raise RepositoryExists(f"a kdist repository already exists at {storage.describe()}")
    return FormatBlob(unique_id, kdf, keys, parameters)


def _get(storage: BlobStorage) -> bytes:
    try:
        return storage.get(C.FORMAT_BLOB_NAME, 0, MAX_FORMAT_BLOB_SIZE + 1)  # decode refuses longer
    except BlobNotFound:
        raise RepositoryNotFound(f"no kdist repository at {storage.describe()}") from None


def read(storage: BlobStorage, password: str) -> FormatBlob:
    return decode(_get(storage), password)


def change_password(storage: BlobStorage, old_password: str, new_password: str,
                    kdf: KdfParams | None = None) -> FormatBlob:
    """Re-wrap the same keys and parameters under a new password; rewrites only the format blob."""
    current = read(storage, old_password)
    kdf = kdf or KdfParams(current.kdf.n, current.kdf.r, current.kdf.p, os.urandom(16))
    blob = encode(current.unique_id, kdf, new_password, current.keys, current.parameters)
    storage.put(C.FORMAT_BLOB_NAME, blob)
    return FormatBlob(current.unique_id, kdf, current.keys, current.parameters)


def read_unique_id(storage: BlobStorage) -> bytes:
    """The repository's unique id, from the format blob's unencrypted header (no password: for
    finding its local cache; nothing read this way is trusted for anything else)."""
    return _decode_header(_get(storage))[0]
