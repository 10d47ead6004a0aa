"""Keys, key derivation, authenticated encryption and the keyed content hash.

Owns: the password KDF (scrypt), HKDF subkeys per purpose, AEAD sealing (AES-256-GCM or
ChaCha20-Poly1305, random 96-bit nonces) and BLAKE3-keyed content ids. Never logs, prints or
puts key material or passwords into exception messages.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import unicodedata
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_format import constants as C
from repo_format.convergent import ConvergentRecords
from repo_format.errors import CorruptionError, KdistError, UnsupportedVersion

WEAK_KDF_ENV = "KDIST_ALLOW_WEAK_KDF_FOR_TESTS"


def normalise_password(password: str) -> str:
    """The password kdist derives keys from when it writes: Unicode NFC, so the same password typed
    where input methods compose differently (a decomposed "é" on one system, a composed one on
    another) opens the same repository (SPEC.md section 2)."""
    return unicodedata.normalize("NFC", password)


def password_forms(password: str) -> list[str]:
    """The forms to try when opening: the NFC form (what kdist writes), then the password exactly
    as given when that differs (a key wrapped before kdist normalised passwords)."""
    nfc = normalise_password(password)
    return [nfc] if nfc == password else [nfc, password]


@dataclass(frozen=True)
class KdfParams:
    """scrypt parameters, stored in the format blob next to their salt."""

    n: int
    r: int
    p: int
    salt: bytes
    algorithm: str = C.KDF_SCRYPT

    # The default: 2**17 * 8 * 128 bytes = 128 MiB of memory, about 0.3-0.6 s on this machine.
    STRONG_N = 2**17
    STRONG_R = 8
    STRONG_P = 1
    # Anything below this is a test setting; refused unless the test environment variable is set.
    MIN_PRODUCTION_N = 2**15

    @classmethod
    def strong(cls) -> "KdfParams":
        return cls(cls.STRONG_N, cls.STRONG_R, cls.STRONG_P, secrets.token_bytes(16))

    @classmethod
    def weak_for_tests(cls) -> "KdfParams":
        """Fast parameters for tests; refused unless KDIST_ALLOW_WEAK_KDF_FOR_TESTS=1."""
        if os.environ.get(WEAK_KDF_ENV) != "1":
            raise KdistError(f"weak KDF parameters are for tests only (set {WEAK_KDF_ENV}=1 in tests)")
        return cls(2**4, 8, 1, secrets.token_bytes(16))

    def validate(self) -> None:
        """Refuse parameters that are not scrypt or could exhaust memory or time (hostile blob)."""
        if self.algorithm != C.KDF_SCRYPT:
            raise UnsupportedVersion(f"unknown key derivation function {self.algorithm!r}")
        ok = (
            isinstance(self.n, int) and 2 <= self.n <= 2**20 and self.n & (self.n - 1) == 0
            and isinstance(self.r, int) and 1 <= self.r <= 16
            and isinstance(self.p, int) and 1 <= self.p <= 4
            and isinstance(self.salt, bytes) and 8 <= len(self.salt) <= 64
            and 128 * self.n * self.r <= 2**30
        )
        if not ok:
            raise CorruptionError("the format blob holds out-of-range key derivation parameters")
        if self.n < self.MIN_PRODUCTION_N and os.environ.get(WEAK_KDF_ENV) != "1":
            raise CorruptionError(
                f"the repository uses test-only key derivation parameters (scrypt N={self.n}, below "
                f"{self.MIN_PRODUCTION_N}), which barely slow down guessing its password; refusing "
                f"to use them outside kdist's test suite ({WEAK_KDF_ENV}=1)"
            )

    def derive(self, password: str | bytes) -> bytes:
        """scrypt of the password's UTF-8 bytes; ``password_forms`` says which forms to give it."""
        self.validate()
        pw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        return hashlib.scrypt(
            pw, salt=self.salt, n=self.n, r=self.r, p=self.p,
            maxmem=128 * self.n * self.r * self.p + 2**20 * 64, dklen=32,
        )

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "n": self.n, "r": self.r, "p": self.p, "salt": self.salt}

    @classmethod
    def from_dict(cls, d: dict) -> "KdfParams":
        try:
            params = cls(n=d["n"], r=d["r"], p=d["p"], salt=d["salt"], algorithm=d["algorithm"])
        except (KeyError, TypeError) as exc:
            raise CorruptionError("the format blob's key derivation parameters are malformed") from exc
        params.validate()
        return params


def derive_subkey(master_key: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of the master key for one purpose (``info``)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master_key)


class Aead:
    """Seal and open byte strings: ``nonce(12) || ciphertext || tag(16)``.

    The associated data binds a ciphertext to where it belongs (a content id, a blob name), so a
    valid ciphertext moved elsewhere fails to open.
    """

    OVERHEAD = C.AEAD_NONCE_SIZE + C.AEAD_TAG_SIZE

    def __init__(self, algorithm: str, key: bytes):
        if algorithm == C.AEAD_AES_256_GCM:
            self._cipher = AESGCM(key)
        elif algorithm == C.AEAD_CHACHA20_POLY1305:
            self._cipher = ChaCha20Poly1305(key)
        else:
            raise UnsupportedVersion(f"unknown encryption algorithm {algorithm!r}")
        self.algorithm = algorithm

    def seal(self, plaintext, aad: bytes, nonce: bytes | None = None) -> bytes:
        nonce = nonce if nonce is not None else os.urandom(C.AEAD_NONCE_SIZE)
        return nonce + self._cipher.encrypt(nonce, plaintext, aad)

    def open(self, sealed, aad: bytes, what: str = "data") -> bytes:
        if len(sealed) < self.OVERHEAD:
            raise CorruptionError(f"{what} is truncated ({len(sealed)} bytes)")
        mv = memoryview(sealed)
        try:
            return self._cipher.decrypt(mv[: C.AEAD_NONCE_SIZE], mv[C.AEAD_NONCE_SIZE :], aad)
        except InvalidTag:
            raise CorruptionError(f"{what} failed authentication (corrupted or tampered)") from None


class ContentHasher:
    """Content ids: BLAKE3 keyed with the repository's hash secret (no confirmation-of-file)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("hash key must be 32 bytes")
        self._key = key

    def __call__(self, data) -> bytes:
        return blake3.blake3(data, key=self._key).digest()


def unkeyed_checksum(data) -> bytes:
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class RepositoryKeys:
    """The secrets of one repository, and the subkeys derived from them.

    ``fleet_secret`` (format 3): what the index, manifest, blob-name and local-cache keys derive
    from, which every key role holds; formats 1 and 2 derive them from the master key. In format
    3 only admins hold the master key (``master_key`` is None for other keys): no content record
    needs it (``repo_format.convergent``)."""

    master_key: bytes | None
    hash_secret: bytes
    aead_algorithm: str
    fleet_secret: bytes | None = None

    @classmethod
    def generate(cls, aead_algorithm: str = C.AEAD_AES_256_GCM, fleet: bool = False) -> "RepositoryKeys":
        return cls(secrets.token_bytes(C.MASTER_KEY_SIZE), secrets.token_bytes(C.HASH_SECRET_SIZE), aead_algorithm,
                   secrets.token_bytes(C.MASTER_KEY_SIZE) if fleet else None)

    def without_master_key(self) -> "RepositoryKeys":
        """What a format 3 key other than an admin's holds."""
        if self.fleet_secret is None:
            raise KdistError("formats 1 and 2 derive every key from the master key: every key holds it")
        return RepositoryKeys(None, self.hash_secret, self.aead_algorithm, self.fleet_secret)

    @property
    def _fleet(self) -> bytes:
        return self.fleet_secret if self.fleet_secret is not None else self.master_key

    def __repr__(self) -> str:  # never show key bytes
        return f"RepositoryKeys(aead={self.aead_algorithm!r})"

    def content_aead(self) -> Aead:
        """Formats 1 and 2's content key (format 3 seals contents with ``convergent_records``)."""
        if self.master_key is None or self.fleet_secret is not None:
            raise KdistError("format 3 has no content key: contents are sealed under keys from their plaintext")
        return Aead(self.aead_algorithm, derive_subkey(self.master_key, C.HKDF_INFO_CONTENT))

    def index_aead(self) -> Aead:
        return Aead(self.aead_algorithm, derive_subkey(self._fleet, C.HKDF_INFO_INDEX))

    def manifest_aead(self) -> Aead:
        return Aead(self.aead_algorithm, derive_subkey(self._fleet, C.HKDF_INFO_MANIFEST))

    def content_hasher(self) -> ContentHasher:
        return ContentHasher(derive_subkey(self.hash_secret, C.HKDF_INFO_HASH))

    def convergent_records(self) -> ConvergentRecords:
        """Format 3's content records (``repo_format.convergent``): both keys come from the hash
        secret, which every key role holds; no content record needs the master key."""
        return ConvergentRecords(derive_subkey(self.hash_secret, C.HKDF_INFO_RECORD_ID),
                                 derive_subkey(self.hash_secret, C.HKDF_INFO_CONVERGENCE))

    def name_hasher(self) -> ContentHasher:
        """Keyed hash for deterministic blob names (index blobs): reveals nothing of contents."""
        return ContentHasher(derive_subkey(self._fleet, C.HKDF_INFO_NAME))

    def local_cache_key(self) -> bytes:
        """Key of the BLAKE3-keyed MAC over every file of this repository's local cache."""
        return derive_subkey(self._fleet, C.HKDF_INFO_LOCAL_CACHE)

    def chunker_seed(self) -> int:
        """A secret seed for the content-defined chunker's gear table (hides chunk boundaries)."""
        raw = derive_subkey(self.hash_secret, C.HKDF_INFO_CHUNKER, length=8)
        return int.from_bytes(raw, "big") & 0x7FFF_FFFF_FFFF_FFFF


def open_with_password(kdf: KdfParams, password: str, sealed: bytes, aad: bytes) -> bytes | None:
    """What ``password`` wrapped (AES-256-GCM under its scrypt key: the format blob, key slots),
    trying each of ``password_forms``; None when none opens it."""
    for form in password_forms(password):
        try:
            return Aead(C.AEAD_AES_256_GCM, kdf.derive(form)).open(sealed, aad)
        except CorruptionError:
            continue
    return None

