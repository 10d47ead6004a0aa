"""The format blob ``kdist.repository``: version, unique id, KDF parameters, sealed keys and tunables.

Layout (see SPEC.md): ``magic | version | header length | header (msgpack) | checksum``. The header
holds the unique id, the KDF parameters, and the sealed payload: the master key, the hash secret
and every tunable (version 2: also the root signing key), encrypted with AES-256-GCM under the
password-derived key. It is rewritten only by a password change and by ``upgrade``. Other
passwords open key slots (``repo_format.keyslots``): ``read`` tries the format blob, then them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field, fields, replace

import msgpack

from repo_format import constants as C
from repo_format.convergent import tree_key
from repo_format.crypto import (Aead, KdfParams, RepositoryKeys, normalise_password, open_with_password,
                                unkeyed_checksum)
from repo_format.errors import (
    BlobNotFound,
    CorruptionError,
    KdistError,
    RepositoryExists,
    RepositoryNotFound,
    UnsupportedVersion,
    WrongPassword,
)
from repo_format.keyslots import (ADMIN, MAINTENANCE, Identity, PermissionRefused, certify, encode_slot, find_slot,
                                  identity_of, new_key_id, new_signing_key, public_key, root_identity)
from repo_format.sealed_payloads import PayloadKeys, host_private, public_of, readers_private
from repo_format.storage.base import BlobStorage

MAX_FORMAT_BLOB_SIZE = 64 * 1024
MAX_GENERATIONS = 256  # format 3: a host key slot holds at most this many generations of its host's payload key


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
    """An opened format blob (or key slot): everything a client needs to read and write the
    repository, and who it is. ``identity`` is None in a version-1 repository (one password,
    unsigned manifests); ``signing_key`` is the root's, held by admins only."""

    unique_id: bytes
    kdf: KdfParams
    keys: RepositoryKeys
    parameters: RepositoryParameters
    version: int = 1
    identity: Identity | None = None
    payload_keys: PayloadKeys | None = None  # format 3: what this key seals and opens payloads with

    @property
    def signed(self) -> bool:
        return self.identity is not None


def _aad(unique_id: bytes, version: int = 1) -> bytes:
    return C.FORMAT_MAGIC + version.to_bytes(2, "big") + unique_id


def _secrets(keys: RepositoryKeys, parameters: RepositoryParameters, role: str = ADMIN, host: str = "",
             generation: int = 0) -> dict:
    """The secrets a format blob or key slot seals: in format 3 (a fleet secret) only an admin's
    hold the master key; a maintenance key holds the readers' payload key, a host key its
    host's, the readers' public key (SPEC.md section 8a) and its host's tree key (section 4a)."""
    if keys.fleet_secret is None:
        return {"master_key": keys.master_key, "hash_secret": keys.hash_secret, "parameters": parameters.to_dict()}
    held = keys if role == ADMIN else keys.without_master_key()
    out = {"hash_secret": held.hash_secret, "fleet_secret": held.fleet_secret, "parameters": parameters.to_dict()}
    if held.master_key is not None:
        out["master_key"] = held.master_key
    elif role == MAINTENANCE:
        out["readers_key"] = readers_private(keys.master_key)
    else:
        # its host's payload keys of this generation and every earlier one (newest first: a key
        # added for a replaced machine opens the host's older snapshots), the newest tree key
        out["host_keys"] = [host_private(keys.master_key, host, g) for g in range(generation, -1, -1)]
        out["readers_public"] = public_of(readers_private(keys.master_key))
        out["tree_key"] = tree_key(keys.master_key, host, generation)
    return out


def _payload_keys(keys: RepositoryKeys, p: dict, identity: Identity | None) -> PayloadKeys:
    """A format 3 key's ``PayloadKeys``, from its master key (admins) or its slot's fields."""
    if keys.master_key is not None:
        return PayloadKeys.of_admin(keys.master_key)
    role = identity.role if identity is not None else ""
    if role == MAINTENANCE:
        private = p["readers_key"]
        if type(private) is not bytes or len(private) != 32:
            raise ValueError("payload key")
        return PayloadKeys(public_of(private), (private,))
    privates, readers, trees = p["host_keys"], p["readers_public"], p["tree_key"]
    if not (type(privates) is list and 1 <= len(privates) <= MAX_GENERATIONS
            and all(type(k) is bytes and len(k) == 32 for k in (*privates, readers, trees))):
        raise ValueError("payload key")
    return PayloadKeys(readers, tuple(privates), identity.host if identity is not None else "", host_tree_key=trees)


def encode(unique_id: bytes, kdf: KdfParams, password: str, keys: RepositoryKeys,
           parameters: RepositoryParameters, nonce: bytes | None = None, version: int = 1,
           signing_key: bytes | None = None) -> bytes:
    """Serialise and seal a format blob (``nonce`` only for golden test vectors). Version 2
    also seals the root signing key."""
    secret = _secrets(keys, parameters)
    if version >= 2:
        if signing_key is None:
            raise ValueError("a version-2 format blob holds the root signing key")
        secret["signing_key"] = signing_key
    wrapping = Aead(C.AEAD_AES_256_GCM, kdf.derive(normalise_password(password)))
    header = msgpack.packb({
        "unique_id": unique_id,
        "kdf": kdf.to_dict(),
        "sealed": wrapping.seal(msgpack.packb(secret), _aad(unique_id, version), nonce=nonce),
    })
    body = C.FORMAT_PREAMBLE.pack(C.FORMAT_MAGIC, version, len(header)) + header
    return body + unkeyed_checksum(body)


def _decode_header(blob: bytes) -> tuple[bytes, KdfParams, bytes, int]:
    """The unencrypted header: unique id, KDF parameters, sealed payload; typed errors for damage."""
    pre = C.FORMAT_PREAMBLE.size
    if len(blob) < pre + C.FORMAT_CHECKSUM_SIZE or len(blob) > MAX_FORMAT_BLOB_SIZE:
        raise CorruptionError(f"the format blob has an impossible size ({len(blob)} bytes)")
    magic, version, header_len = C.FORMAT_PREAMBLE.unpack_from(blob)
    if magic != C.FORMAT_MAGIC:
        raise CorruptionError("this is not a kdist format blob (bad magic)")
    if version not in C.FORMAT_VERSIONS_READ:
        raise UnsupportedVersion(
            f"repository format version {version} is not supported by this kdist "
            f"(it reads versions {', '.join(map(str, C.FORMAT_VERSIONS_READ))}); upgrade kdist"
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
    return unique_id, kdf, sealed, version


def _opened(unique_id: bytes, kdf: KdfParams, p: dict, version: int, identity: Identity | None,
            what: str) -> FormatBlob:
    try:
        parameters = RepositoryParameters.from_dict(p["parameters"])
        if version >= C.FORMAT_VERSION_CONVERGENT:  # the master key: admins only
            keys = RepositoryKeys(p.get("master_key"), p["hash_secret"], parameters.aead, p["fleet_secret"])
            master_ok = keys.master_key is None and (identity is None or identity.role != ADMIN) or \
                type(keys.master_key) is bytes and len(keys.master_key) == C.MASTER_KEY_SIZE
            if not (master_ok and type(keys.fleet_secret) is bytes and len(keys.fleet_secret) == C.MASTER_KEY_SIZE):
                raise ValueError("key sizes")
            payload_keys = _payload_keys(keys, p, identity)
        else:
            keys = RepositoryKeys(p["master_key"], p["hash_secret"], parameters.aead)
            payload_keys = None
            if not (type(keys.master_key) is bytes and len(keys.master_key) == C.MASTER_KEY_SIZE):
                raise ValueError("key sizes")
        if not (type(keys.hash_secret) is bytes and len(keys.hash_secret) == C.HASH_SECRET_SIZE):
            raise ValueError("key sizes")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptionError(f"{what}'s sealed payload is malformed") from exc
    return FormatBlob(unique_id, kdf, keys, parameters, version, identity, payload_keys)


def decode(blob: bytes, password: str) -> FormatBlob:
    """Open a format blob with the admin password; typed errors for damage, unknown versions
    and a wrong password (which may still open a key slot: ``read``)."""
    unique_id, kdf, sealed, version = _decode_header(blob)
    payload = open_with_password(kdf, password, sealed, _aad(unique_id, version))
    if payload is None:
        raise WrongPassword("wrong password for this repository")
    try:
        p = msgpack.unpackb(payload, raw=False)
        identity = None
        if version >= 2:
            sk = p["signing_key"]
            if type(sk) is not bytes or len(sk) != 32:
                raise ValueError("signing key")
            identity = root_identity(sk)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptionError("the format blob's sealed payload is malformed") from exc
    return _opened(unique_id, kdf, p, version, identity, "the format blob")


def create(storage: BlobStorage, password: str, parameters: RepositoryParameters | None = None,
           kdf: KdfParams | None = None, version: int = C.FORMAT_VERSION) -> FormatBlob:
    """Write a new format blob (the admin's password and the root key); refuses to touch an
    existing repository. ``version=1`` only for tests of older repositories; 3 keeps hosts
    apart (SPEC.md sections 4a and 8a)."""
    if version not in C.FORMAT_VERSIONS_READ:
        raise UnsupportedVersion(f"this kdist does not write repository format version {version}")
    parameters = parameters or RepositoryParameters()
    parameters.validate()
    kdf = kdf or KdfParams.strong()
    keys = RepositoryKeys.generate(parameters.aead, fleet=version >= C.FORMAT_VERSION_CONVERGENT)
    unique_id = secrets.token_bytes(16)
    signing_key = new_signing_key() if version >= 2 else None
    blob = encode(unique_id, kdf, password, keys, parameters, version=version, signing_key=signing_key)
    if not storage.put_if_absent(C.FORMAT_BLOB_NAME, blob):
        raise RepositoryExists(f"a kdist repository already exists at {storage.describe()}")
    identity = root_identity(signing_key) if signing_key else None
    payload_keys = PayloadKeys.of_admin(keys.master_key) if keys.fleet_secret is not None else None
    return FormatBlob(unique_id, kdf, keys, parameters, version, identity, payload_keys)


def _get(storage: BlobStorage) -> bytes:
    try:
        return storage.get(C.FORMAT_BLOB_NAME, 0, MAX_FORMAT_BLOB_SIZE + 1)  # decode refuses longer
    except BlobNotFound:
        raise RepositoryNotFound(f"no kdist repository at {storage.describe()}") from None


def read(storage: BlobStorage, password: str, key_id: str | None = None) -> FormatBlob:
    """Open the repository with ``password``: the format blob's (the admin's), or else a key
    slot's (``key_id`` names it; without it every slot is tried, one scrypt each)."""
    blob = _get(storage)
    unique_id, kdf, _sealed, version = _decode_header(blob)
    if key_id is None:
        try:
            return decode(blob, password)
        except WrongPassword:
            if version < 2:
                raise
    elif version < 2:
        raise WrongPassword("this repository has no key slots (format version 1): give no key id")
    p = find_slot(storage, unique_id, password, key_id)
    return _opened(unique_id, kdf, p, version, identity_of(p), f"key slot {p.get('key_id')}")


def add_slot(storage: BlobStorage, admin: FormatBlob, password: str, role: str, host: str = "",
             kdf: KdfParams | None = None, registered: set = frozenset(), generation: int = 0) -> Identity:
    """Add a key slot for ``password`` with ``role`` (a host key names its host); returns its
    identity (the caller registers it with a root-signed key record)."""
    if admin.identity is None or admin.identity.role != ADMIN:
        raise PermissionRefused("only an admin key may add keys")
    key_id = new_key_id(storage, registered)
    root = admin.identity
    if role == ADMIN:  # admins sign as the root
        identity = replace(root, slot=key_id)
    else:
        signing_key = new_signing_key()
        cert, cert_sig = certify(root, admin.unique_id, key_id, role, host, public_key(signing_key))
        identity = Identity(role, key_id, signing_key, root.root_public, host, key_id, cert, cert_sig)
    kdf = kdf or KdfParams(admin.kdf.n, admin.kdf.r, admin.kdf.p, os.urandom(16))
    if not 0 <= generation < MAX_GENERATIONS:
        raise KdistError(f"host {host!r} has had {generation} keys removed: no more than {MAX_GENERATIONS - 1}")
    secret = _secrets(admin.keys, admin.parameters, role, host, generation)
    name, blob = encode_slot(admin.unique_id, kdf, password, identity, secret)
    if not storage.put_if_absent(name, blob):
        raise KdistError(f"key slot {name} already exists; try again")
    return identity


def change_password(storage: BlobStorage, old_password: str, new_password: str,
                    kdf: KdfParams | None = None) -> FormatBlob:
    """Re-wrap the same keys and parameters under a new password; rewrites only the format blob
    (the admin's password; other keys are replaced with ``key add`` and ``key remove``)."""
    current = decode(_get(storage), old_password)
    kdf = kdf or KdfParams(current.kdf.n, current.kdf.r, current.kdf.p, os.urandom(16))
    sk = current.identity.signing_key if current.identity else None
    blob = encode(current.unique_id, kdf, new_password, current.keys, current.parameters, version=current.version,
                  signing_key=sk)
    storage.put(C.FORMAT_BLOB_NAME, blob)
    return replace(current, kdf=kdf)


def upgrade(storage: BlobStorage, password: str, signing_key: bytes) -> FormatBlob:
    """Make a version-1 format blob version 2: the same keys and parameters, plus the root
    signing key (``kdist.keys.upgrade_repository`` signs the existing manifests with it first)."""
    current = decode(_get(storage), password)
    if current.version >= 2:
        raise KdistError("the repository is at format version 2 already")
    storage.put(C.FORMAT_BLOB_NAME, encode(current.unique_id, current.kdf, password, current.keys,
                                           current.parameters, version=2, signing_key=signing_key))
    return replace(current, version=2, identity=root_identity(signing_key))


def read_blob(storage: BlobStorage) -> bytes:
    """The format blob's bytes (``decode`` opens them)."""
    return _get(storage)


def read_unique_id(storage: BlobStorage) -> bytes:
    """The repository's unique id, from the format blob's unencrypted header (no password: for
    finding its local cache; nothing read this way is trusted for anything else)."""
    return _decode_header(_get(storage))[0]


def version_of(storage: BlobStorage) -> int:
    return _decode_header(_get(storage))[3]
