"""Format 3's sealed snapshot payloads, the construction (SPEC.md section 8a; ``ManifestStore``
uses it for snapshot, failure and tag edit records): a payload readable by its host and by the
readers (admins, maintenance), and by no other key.

A payload is encrypted once under a random key (AES-256-GCM), and that key is wrapped for each
recipient under a key agreed with an ephemeral X25519 key (HKDF-SHA256 of the shared secret,
bound to both public keys). Both kinds of recipient key derive from the master key, which only
admins hold: a host's from its name and generation (so a key added later for the same host, say
on the machine that replaced it, holds the host's earlier generations and opens its earlier
snapshots, while the removed key derives none of the later ones), the readers' from a fixed
label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_format.convergent import generation_info, tree_key
from repo_format.errors import CorruptionError

HOST_KEY_INFO = b"kdist/v3/host-key\x00"
READERS_KEY_INFO = b"kdist/v3/readers"
WRAP_INFO = b"kdist/v3/payload-key\x00"
SEALED_VERSION = 1
MAX_RECIPIENTS = 8
_KEY = 32
_ZERO_NONCE = bytes(12)  # every key below encrypts exactly one message


def _derive(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=info).derive(ikm)


def host_private(master_key: bytes, host: str, generation: int = 0) -> bytes:
    """The X25519 private key of ``host``'s snapshots at ``generation`` (how many of the host's
    keys were removed before: ``ManifestStore.host_generation``); admins derive it, a host
    key's slot holds those of its generation and every earlier one."""
    return _derive(master_key, generation_info(HOST_KEY_INFO, host, generation))


def readers_private(master_key: bytes) -> bytes:
    """The X25519 private key of the readers (admins derive it; maintenance keys hold it)."""
    return _derive(master_key, READERS_KEY_INFO)


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _agrees(public: bytes) -> bool:
    """Whether ``public`` is an X25519 key an agreement works with (not of low order)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
        return True
    except (ValueError, TypeError):
        return False


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return _derive(shared, WRAP_INFO + ephemeral + recipient)


def seal(payload: bytes, recipients: list[bytes], aad: bytes) -> bytes:
    """``payload`` sealed for the X25519 public keys ``recipients`` (duplicates once), bound to
    ``aad`` (the record it belongs to)."""
    unique = list(dict.fromkeys(recipients))
    if not 1 <= len(unique) <= MAX_RECIPIENTS or not all(type(r) is bytes and len(r) == _KEY for r in unique):
        raise ValueError("a sealed payload needs 1 to 8 recipients' 32-byte public keys")
    key = os.urandom(_KEY)
    box = AESGCM(key).encrypt(_ZERO_NONCE, payload, aad)
    ephemeral = X25519PrivateKey.generate()
    e_pub = ephemeral.public_key().public_bytes_raw()
    to = []
    for r in unique:
        wrap = _wrap_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(r)), e_pub, r)
        to.append([r, AESGCM(wrap).encrypt(_ZERO_NONCE, key, aad)])
    return msgpack.packb({"v": SEALED_VERSION, "e": e_pub, "to": to, "box": box})


def recipients_of(sealed: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """``(ephemeral public key, [(recipient, wrapped key)], box)``; ``CorruptionError`` unless
    the value has exactly that shape (exact types: nothing hostile is converted)."""
    try:
        doc = msgpack.unpackb(sealed, raw=False) if type(sealed) is bytes else None
        e_pub, to, box = doc["e"], doc["to"], doc["box"]
        ok = (set(doc) == {"v", "e", "to", "box"} and type(doc["v"]) is int and doc["v"] == SEALED_VERSION
              and type(e_pub) is bytes and len(e_pub) == _KEY and type(box) is bytes
              and type(to) is list and 1 <= len(to) <= MAX_RECIPIENTS
              and all(type(t) is list and len(t) == 2 and type(t[0]) is bytes and len(t[0]) == _KEY
                      and type(t[1]) is bytes and len(t[1]) == _KEY + 16 for t in to)
              and len({t[0] for t in to}) == len(to))  # each recipient once: no decoy before the real one
    except (ValueError, KeyError, TypeError, msgpack.ExtraData):
        ok = False
    if not ok:
        raise CorruptionError("malformed sealed payload")
    return e_pub, [(r, w) for r, w in to], box


def open_sealed(sealed: bytes, privates: list[bytes], aad: bytes) -> bytes | None:
    """The payload, if one of ``privates`` (X25519 private keys) is a recipient; None if none is;
    ``CorruptionError`` if it is malformed or does not open for a recipient it names."""
    e_pub, to, box = recipients_of(sealed)
    mine = {public_of(p): p for p in privates}
    for r, wrapped in to:
        private = mine.get(r)
        if private is None:
            continue
        try:
            shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(e_pub))
            key = AESGCM(_wrap_key(shared, e_pub, r)).decrypt(_ZERO_NONCE, wrapped, aad)
            return AESGCM(key).decrypt(_ZERO_NONCE, box, aad)
        except (InvalidTag, ValueError):  # (ValueError: a low-order ephemeral key)
            raise CorruptionError("sealed payload does not open (damaged, or not this record's)") from None
    return None


def payload_aad(unique_id: bytes, record_id: str) -> bytes:
    return b"kdist/v3/record-payload\x00" + unique_id + record_id.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class PayloadKeys:
    """What one key seals and opens payloads with (format 3): the readers' public key; the
    private keys it opens with (the readers' for admins and maintenance, its host's for a host
    key); and, for admins, the master key, from which any host's key derives. Also the one other
    per-host secret, the tree key a host's trees converge under (``tree_key``)."""

    readers_public: bytes
    privates: tuple[bytes, ...] = ()
    host: str = ""
    master_key: bytes | None = field(default=None, repr=False)
    host_tree_key: bytes | None = field(default=None, repr=False)  # a host key's own (SPEC.md section 4a)

    def __repr__(self) -> str:  # never show key bytes
        return f"PayloadKeys(host={self.host!r}, opens={len(self.privates)})"

    @classmethod
    def of_admin(cls, master_key: bytes) -> "PayloadKeys":
        readers = readers_private(master_key)
        return cls(public_of(readers), (readers,), "", master_key)

    def host_public(self, host: str, generation: int = 0) -> bytes | None:
        """``host``'s public key: at ``generation`` for admins, its newest for a host key's own
        host (``privates[0]``), None for any other."""
        if self.master_key is not None:
            return public_of(host_private(self.master_key, host, generation))
        if self.host and host == self.host and self.privates:
            return public_of(self.privates[0])
        return None

    def tree_key(self, host: str, generation: int = 0) -> bytes | None:
        """The key ``host``'s directory objects and chunk lists converge under, if this key
        may write them: admins derive any host's (at ``generation``), a host key holds its own
        host's newest; None otherwise."""
        if self.master_key is not None:
            return tree_key(self.master_key, host, generation)
        return self.host_tree_key if self.host and host == self.host else None

    def seal(self, payload: bytes, host: str, aad: bytes, also: list[bytes] | tuple = (),
             generation: int = 0) -> bytes:
        """For ``host`` (if this key knows its public key: admins, at ``generation``, and the
        host's own keys), the readers, and, only when this key does not know the host's public
        key, ``also`` (the recipients of the snapshot a tag edit is of: how a maintenance key
        reaches the host), at most ``MAX_RECIPIENTS`` in all."""
        mine = self.host_public(host, generation)
        first = [self.readers_public] + ([mine] if mine is not None else [])
        # ``also`` comes from a record a host wrote: only well-formed keys an agreement works with
        usable = [r for r in also if mine is None and _agrees(r)]
        return seal(payload, list(dict.fromkeys(first + usable))[:MAX_RECIPIENTS], aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes | None:
        return open_sealed(sealed, list(self.privates), aad)
