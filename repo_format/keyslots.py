"""Key slots and roles: who a password makes you, and whose manifest records count.

Owns: the key slot blobs ``ks<key id>`` (one per password besides the format blob's), the
``Identity`` a password opens (role, host, key id, Ed25519 signing key, the root's public key),
signing and verifying manifest records, and ``Trust``: which signer's record a reader honours.
Never logs, prints or puts a key or password into an exception message.

Roles (SECURITY.md): ``admin`` signs with the repository's root key (kept in the format blob and
in admin slots) and may write anything; ``maintenance`` signs with its own key and may write any
record but a key record; ``host`` signs with its own key and may write only snapshot records
and failure records (``kdist.failures``) that carry its host name, under ids of 24 hex and its
key id, each id once, and tombstones of its own checkpoints (or of a snapshot within
``WITHDRAW_WINDOW`` of publishing it). Every non-root record carries the root's certificate of
its key. A root-signed record of type ``key`` lists a
key; a removed key's lists the records it signed before removal, and nothing else it signs counts.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

import blake3
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from repo_format import constants as C
from repo_format.crypto import Aead, KdfParams, normalise_password, open_with_password
from repo_format.errors import BlobNotFound, CorruptionError, KdistError, WrongPassword
from repo_format.storage.base import BlobStorage

ADMIN, MAINTENANCE, HOST = "admin", "maintenance", "host"
ROLES = (ADMIN, MAINTENANCE, HOST)
ROOT_KEY_ID = "root"  # admins share the root key; its public half is in every slot
KEY_RECORD_TYPE = "key"
# the only records a host key may write (besides tombstones of its own): what maintenance trusts
# from its own runs (history: watermarks, pack candidates, set merges) must never come from one.
# A failure record (kdist.failures) refers to nothing and decides nothing maintenance does.
HOST_RECORD_TYPES = ("snapshot", "failure")
KEY_RECORD_ID_PREFIX = "key-"  # a key record's id: this and the key id
WITHDRAW_WINDOW = 3600.0  # seconds (storage clock): how long after publishing a host may withdraw a snapshot
MAX_RECORD_TS = 2**62  # microseconds: a later record time is implausible (and its tombstone's would overflow)
_HEX = re.compile(r"[0-9a-f]+")


def record_digest(raw: bytes) -> str:
    """What a key removal's ``keep`` list names a record by: a digest of its signed bytes."""
    return blake3.blake3(raw).hexdigest()[:32]
KEY_ID_BYTES = 4
MAX_SLOT_SIZE = 64 * 1024


class PermissionRefused(KdistError):
    """This key's role may not do what was asked (e.g. a host key running maintenance)."""


def public_key(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_signing_key() -> bytes:
    return secrets.token_bytes(32)


def root_identity(signing_key: bytes) -> "Identity":
    return Identity(ADMIN, ROOT_KEY_ID, signing_key, public_key(signing_key))


def new_root_identity() -> "Identity":
    return root_identity(new_signing_key())


@dataclass(frozen=True)
class Identity:
    """What an opened password is: its role, the key id it signs as (admins: the root), its
    host (host keys), signing key, and the slot it came from ("" for the format blob)."""

    role: str
    key_id: str
    signing_key: bytes = field(repr=False)
    root_public: bytes = field(repr=False)
    host: str = ""
    slot: str = ""
    # the root's certificate of this key (key id, role, host, public key) and its signature;
    # every record this key signs carries them, so a reader needs no registry to trust it
    cert: bytes = field(default=b"", repr=False)
    cert_sig: bytes = field(default=b"", repr=False)

    def require(self, *roles: str, what: str) -> None:
        if self.role not in roles:
            raise PermissionRefused(f"a {self.role} key may not {what} (it needs a key of role "
                                    f"{' or '.join(roles)}; see SECURITY.md)")

    def new_record_id(self) -> str:
        """A fresh manifest id: random, ending with this key's id (a host may only write its own)."""
        suffix = "" if self.key_id == ROOT_KEY_ID else self.key_id
        return secrets.token_hex(16 - len(suffix) // 2) + suffix


# ---- signatures -----------------------------------------------------------------------------
RECORD_DOMAIN = b"kdist/v2/manifest-record\x00"
COMPACTED_DOMAIN = b"kdist/v2/compacted-manifest\x00"
CERT_DOMAIN = b"kdist/v2/key-certificate\x00"
MARKER_DOMAIN = b"kdist/v2/epoch-marker\x00"  # epoch markers and the signed-sets blob: a name only
SET_DOMAIN = b"kdist/v2/index-set\x00"  # an index set's signature: its name and its members' digests


def sign(identity: Identity, domain: bytes, unique_id: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(identity.signing_key).sign(domain + unique_id + message)


def signed_marker(identity: Identity, unique_id: bytes, name: str) -> bytes:
    """The body of a signed epoch marker ``name``: msgpack ``{"k": key id, "s": signature of the
    name, "c", "cs": the key's certificate}`` (no certificate for the root)."""
    return _signed_doc(identity, {"s": sign(identity, MARKER_DOMAIN, unique_id, name.encode("ascii"))})


def set_message(name: str, digests: list[bytes]) -> bytes:
    """What an index set's signature covers: the signature blob's name (the set's kind, epoch and
    id) and the BLAKE3 digest of each member's stored bytes, in member order."""
    return name.encode("ascii") + b"\x00" + b"".join(digests)


def signed_set(identity: Identity, unique_id: bytes, name: str, digests: list[bytes]) -> bytes:
    """The body of index set signature ``name``: the marker's fields plus ``"d"``, the digests."""
    return _signed_doc(identity, {"d": list(digests), "s": sign(identity, SET_DOMAIN, unique_id,
                                                                  set_message(name, digests))})


def _signed_doc(identity: Identity, doc: dict) -> bytes:
    doc["k"] = identity.key_id
    if identity.cert:
        doc.update(c=identity.cert, cs=identity.cert_sig)
    return msgpack.packb(doc)


def verify(public: bytes, signature: bytes, domain: bytes, unique_id: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, domain + unique_id + message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    role: str
    host: str
    public: bytes
    revoked: bool = False
    keep: frozenset = frozenset()  # digests (record_digest) of the records a removed key signed before


def certify(root: "Identity", unique_id: bytes, key_id: str, role: str, host: str, public: bytes) -> tuple[bytes, bytes]:
    """The root's certificate of a key: (its bytes, the root's signature over them)."""
    cert = msgpack.packb({"key": key_id, "role": role, "host": host, "public": public})
    return cert, sign(root, CERT_DOMAIN, unique_id, cert)


def key_record_labels(key_id: str, role: str, host: str, revoked: bool = False) -> dict:
    labels = {"type": KEY_RECORD_TYPE, "key": key_id, "role": role, "host": host}
    if revoked:
        labels["revoked"] = "1"
    return labels


def key_record_payload(public: bytes, keep: list | None = None, generation: int = 0) -> bytes:
    """``generation``: format 3, a host key's (SPEC.md section 3a), recorded for `key list`."""
    return msgpack.packb({"public": public, "keep": keep or [], **({"gen": generation} if generation else {})})


class Trust:
    """Which manifest records a reader honours in a signed repository.

    A record counts when the root signed it, or when a key signed it whose root-signed
    certificate it carries and whose role allows what it says (a host: its own host's records
    and ids). Nothing else is looked up, so a genuine record counts in every listing, whatever
    its order. The only registry is of removals: root-signed key records that mark a key
    removed, listing what it signed before; its other records do not count.
    ``judge(records)`` returns those that count and, for ``repo check``, the others with the
    reason each was refused."""

    def __init__(self, unique_id: bytes, root_public: bytes):
        self.unique_id = unique_id
        self.root_public = root_public
        self._verified: dict[tuple, bool] = {}  # (domain, public key, signature, digest of the message) -> valid
        self._certs: dict[tuple, KeyInfo | None] = {}

    def verify_once(self, domain: bytes, public: bytes, sig: bytes, message: bytes) -> bool:
        """``verify``, remembered: the message is part of what is remembered (a signature seen
        once must not vouch for other bytes)."""
        k = (domain, public, sig, blake3.blake3(message).digest())
        ok = self._verified.get(k)
        if ok is None:
            ok = self._verified[k] = bool(sig) and verify(public, sig, domain, self.unique_id, message)
        return ok

    def _valid(self, public: bytes, rec) -> bool:
        """The record's signature verifies under ``public``, or a trusted compaction vouches for it."""
        return rec.vouched or self.verify_once(RECORD_DOMAIN, public, rec.sig, rec.raw)

    def certificate(self, cert: bytes, cert_sig: bytes) -> KeyInfo | None:
        """The key a root-signed certificate describes, or None if the root did not sign it."""
        if type(cert) is not bytes or type(cert_sig) is not bytes:
            return None  # (and nothing unhashable becomes a key of the memory below)
        k = (cert, cert_sig)
        if k not in self._certs:
            info = None
            if type(cert) is bytes and type(cert_sig) is bytes and self.verify_once(CERT_DOMAIN, self.root_public,
                                                                                 cert_sig, cert):
                try:
                    c = msgpack.unpackb(cert, raw=False)
                    info = KeyInfo(c["key"], c["role"], c["host"], bytes(c["public"]))
                    if info.role not in ROLES or type(info.key_id) is not str or type(info.host) is not str:
                        info = None
                except (ValueError, KeyError, TypeError):
                    info = None
            self._certs[k] = info
        return self._certs[k]

    def marker_signed(self, name: str, body: bytes) -> bool:
        """Whether ``body`` is epoch marker ``name`` signed by the root or a maintenance key the
        root certified (hosts hold the key that seals markers: only a signature is theirs alone)."""
        doc = self._maintenance_doc(body)
        return doc is not None and self.verify_once(MARKER_DOMAIN, doc[0], doc[1], name.encode("ascii"))

    def set_digests(self, name: str, body: bytes) -> list[bytes] | None:
        """The member digests index set signature ``name`` holds, if the root or a maintenance
        key signed them (``signed_set``); None for anything else."""
        doc = self._maintenance_doc(body)
        if doc is None:
            return None
        digests = doc[2].get("d")
        if type(digests) is not list or not digests or not all(type(d) is bytes and len(d) == 32 for d in digests):
            return None
        ok = self.verify_once(SET_DOMAIN, doc[0], doc[1], set_message(name, digests))
        return digests if ok else None

    def _maintenance_doc(self, body: bytes) -> tuple[bytes, bytes, dict] | None:
        """(public key, signature, document) of a body signed by the root or a maintenance key
        whose root-signed certificate it carries; None for anything else, however malformed."""
        try:
            doc = msgpack.unpackb(body, raw=False)
            key_id, sig = doc["k"], doc["s"]
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        if type(sig) is not bytes or type(key_id) is not str:
            return None
        if key_id == ROOT_KEY_ID:
            return self.root_public, sig, doc
        key = self.certificate(doc.get("c"), doc.get("cs"))
        if key is None or key.key_id != key_id or key.role != MAINTENANCE:
            return None
        return key.public, sig, doc

    def registry(self, records) -> dict[str, KeyInfo]:
        """Every key record the root signed (newest per key): what ``key list`` shows and which
        keys are removed."""
        keys: dict[str, tuple[int, KeyInfo]] = {}
        for r in records:
            if r.labels.get("type") != KEY_RECORD_TYPE or r.deleted or r.signer != ROOT_KEY_ID:
                continue
            if not self._valid(self.root_public, r):
                continue
            try:
                body = msgpack.unpackb(r.payload, raw=False)
                info = KeyInfo(r.labels["key"], r.labels["role"], r.labels.get("host", ""), bytes(body["public"]),
                               r.labels.get("revoked") == "1", frozenset(str(d) for d in body.get("keep", [])))
                if info.role not in ROLES or type(info.key_id) is not str:
                    continue
            except (ValueError, KeyError, TypeError):
                continue
            cur = keys.get(info.key_id)
            if cur is None or (r.ts, info.revoked) > (cur[0], cur[1].revoked):
                keys[info.key_id] = (r.ts, info)
        return {k: v for k, (_, v) in keys.items()}

    def judge(self, records) -> tuple[list, list]:
        """(records that count, [(record, reason)] of those that do not)."""
        keys = self.registry(records)
        good, bad, hosts = [], [], {}
        for r in records:
            reason = self._refusal(r, keys)
            if reason is not None:
                bad.append((r, reason))
                continue
            good.append(r)
            key = self.signer_key(r.signer, r.cert, r.cert_sig, keys) if r.signer != ROOT_KEY_ID else None
            if isinstance(key, KeyInfo) and key.role == HOST:
                hosts[id(r)] = key
        if not hosts:
            return good, bad
        return self._host_history(good, bad, hosts)

    @staticmethod
    def _host_history(good: list, bad: list, hosts: dict) -> tuple[list, list]:
        """The rules of a host key's history: a record id is written once (the first stored
        record counts, a later one under the same id does not), and a host's tombstone counts
        only for a checkpoint of its own, or a snapshot it withdraws within ``WITHDRAW_WINDOW``
        of publishing it (a backup that found, after publishing, that maintenance collected
        something it refers to). A host cannot forget its own history. ``hosts``: the host key
        of each host-signed record (by ``id()``)."""
        first: dict[str, object] = {}
        for r in good:
            if not r.deleted and id(r) in hosts:
                cur = first.get(r.id)
                if cur is None or (r.stored, r.ts, r.blob) < (cur.stored, cur.ts, cur.blob):
                    first[r.id] = r
        kept = []
        for r in good:
            if id(r) not in hosts:
                kept.append(r)
                continue
            if not r.deleted:
                if first[r.id] is r:
                    kept.append(r)
                else:
                    bad.append((r, f"host key {r.signer} wrote a second record under id {r.id}"))
                continue
            target = first.get(r.id)
            if target is None or target.signer != r.signer:
                bad.append((r, f"host key {r.signer} wrote a tombstone of nothing of its own ({r.id})"))
            elif target.labels.get("checkpoint") == "1" or r.stored - target.stored <= WITHDRAW_WINDOW:
                kept.append(r)
            else:
                bad.append((r, f"host key {r.signer} tried to forget its snapshot {r.id} (hosts never forget)"))
        return kept, bad

    def signer_key(self, signer: str, cert: bytes, cert_sig: bytes, keys: dict[str, KeyInfo]) -> KeyInfo | str:
        """The certified, not removed key ``signer``, or why there is none."""
        key = self.certificate(cert, cert_sig)
        if key is None:
            return f"key {signer} has no certificate from the root"
        if key.key_id != signer:
            return f"key {signer} carries the certificate of key {key.key_id}"
        reg = keys.get(signer)
        if reg is not None and reg.revoked and reg.public == key.public:
            return KeyInfo(key.key_id, key.role, key.host, key.public, True, reg.keep)
        return key

    def _refusal(self, r, keys: dict[str, KeyInfo]) -> str | None:
        if not r.signer:
            return "unsigned"
        if r.signer == ROOT_KEY_ID:
            return None if self._valid(self.root_public, r) else "bad signature (root)"
        key = self.signer_key(r.signer, r.cert, r.cert_sig, keys)
        if isinstance(key, str):
            return key
        if not self._valid(key.public, r):
            return f"bad signature (key {r.signer})"
        if r.labels.get("type") == KEY_RECORD_TYPE:
            return f"key record signed by {key.role} key {r.signer} (only the root may)"
        if key.revoked and record_digest(r.raw) not in key.keep:
            return f"written by removed key {r.signer}"
        if not 0 <= r.ts < MAX_RECORD_TS:
            return f"implausible time {r.ts} (key {r.signer})"
        if key.role == HOST:
            if not (len(r.id) == 32 and r.id.endswith(r.signer) and _HEX.fullmatch(r.id)):
                return f"host key {r.signer} ({key.host}) wrote a record of another writer's id"
            if not r.deleted and r.labels.get("type") not in HOST_RECORD_TYPES:
                return (f"host key {r.signer} ({key.host}) wrote a {r.labels.get('type')!r} record "
                        "(hosts write snapshots and failure records)")
            if not r.deleted and r.labels.get("host") != key.host:
                return f"host key {r.signer} ({key.host}) wrote a record for host {r.labels.get('host')!r}"
        if r.deleted and r.id.startswith(KEY_RECORD_ID_PREFIX):  # (a removal must never be undone)
            return f"tombstone of key record {r.id} signed by {key.role} key {r.signer} (only the root may)"
        return None


# ---- key slots ------------------------------------------------------------------------------
def slot_name(key_id: str) -> str:
    return f"{C.KEY_SLOT_PREFIX}{key_id}"


def _slot_aad(unique_id: bytes, name: str) -> bytes:
    return b"kdist/v2/key-slot\x00" + unique_id + name.encode("ascii")


def encode_slot(unique_id: bytes, kdf: KdfParams, password: str, identity: Identity, secrets_payload: dict) -> tuple[str, bytes]:
    """A key slot blob: ``{key id, kdf}`` in clear, the rest sealed under the password (scrypt,
    then AES-256-GCM bound to the repository and the slot's name)."""
    name = slot_name(identity.slot)
    payload = msgpack.packb({**secrets_payload, "role": identity.role, "key_id": identity.key_id, "host": identity.host,
                             "signing_key": identity.signing_key, "root_public": identity.root_public,
                             "slot": identity.slot, "cert": identity.cert, "cert_sig": identity.cert_sig})
    wrapping = Aead(C.AEAD_AES_256_GCM, kdf.derive(normalise_password(password)))
    sealed = wrapping.seal(payload, _slot_aad(unique_id, name))
    return name, msgpack.packb({"v": 1, "key_id": identity.slot, "kdf": kdf.to_dict(), "sealed": sealed})


def open_slot(unique_id: bytes, name: str, blob: bytes, password: str) -> dict | None:
    """The slot's sealed payload, or None if the password is not this slot's."""
    if len(blob) > MAX_SLOT_SIZE:
        raise CorruptionError(f"key slot {name} is implausibly large")
    try:
        doc = msgpack.unpackb(blob, raw=False)
        kdf = KdfParams.from_dict(doc["kdf"])
        sealed = doc["sealed"]
        if doc.get("v") != 1 or type(sealed) is not bytes or slot_name(doc["key_id"]) != name:
            raise ValueError("slot fields")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
        raise CorruptionError(f"key slot {name} is malformed") from exc
    plain = open_with_password(kdf, password, sealed, _slot_aad(unique_id, name))
    if plain is None:
        return None
    try:
        p = msgpack.unpackb(plain, raw=False)
        if p["role"] not in ROLES or type(p["signing_key"]) is not bytes or len(p["signing_key"]) != 32:
            raise ValueError("slot payload")
        return p
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptionError(f"key slot {name}'s sealed payload is malformed") from exc


def identity_of(payload: dict) -> Identity:
    return Identity(payload["role"], payload["key_id"], payload["signing_key"], payload["root_public"],
                    payload.get("host") or "", payload["slot"], payload.get("cert", b""), payload.get("cert_sig", b""))


def find_slot(storage: BlobStorage, unique_id: bytes, password: str, key_id: str | None = None) -> dict:
    """The payload of the slot this password opens: the slot ``key_id`` names (one scrypt), or
    else each slot in turn (one scrypt each: give the key id to a fleet of many keys)."""
    if key_id is not None:
        names = [slot_name(key_id)]
    else:
        names = sorted(m.name for m in storage.list(C.KEY_SLOT_PREFIX))
    for name in names:
        try:
            blob = storage.get(name, 0, MAX_SLOT_SIZE + 1)
        except BlobNotFound:
            if key_id is not None:
                raise WrongPassword(f"no key {key_id} in this repository (removed, or a wrong key id)") from None
            continue
        try:
            payload = open_slot(unique_id, name, blob, password)
        except CorruptionError:
            if key_id is not None:
                raise
            continue  # a damaged (or planted) slot is not this password's: try the others
        if payload is not None:
            return payload
    raise WrongPassword("wrong password for this repository" + (f" (key {key_id})" if key_id else ""))


def new_key_id(storage: BlobStorage, registered: set = frozenset()) -> str:
    """A key id no slot has and no key record names (a removed key's id is never reused)."""
    taken = {m.name for m in storage.list(C.KEY_SLOT_PREFIX)}
    while True:
        key_id = secrets.token_hex(KEY_ID_BYTES)
        if slot_name(key_id) not in taken and key_id not in registered:
            return key_id
