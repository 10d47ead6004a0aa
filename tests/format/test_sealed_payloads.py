"""Format 3's sealed snapshot payloads, the construction (repo_format.sealed_payloads, SPEC.md
section 8a): a payload opens for its recipients only, is bound to its record, and refuses every
malformed or altered value; the recipients' keys derive from the master key."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_format.errors import CorruptionError
from repo_format.sealed_payloads import (host_private, open_sealed, public_of, readers_private, recipients_of,
                                         seal)

MASTER = os.urandom(32)
ALICE, BOB, READERS = host_private(MASTER, "alice"), host_private(MASTER, "bob"), readers_private(MASTER)
AAD = b"kdist/v3/snapshot\x00" + bytes(16) + b"record-id"


def _sealed(payload: bytes = b"root reference and paths") -> bytes:
    return seal(payload, [public_of(ALICE), public_of(READERS)], AAD)


def test_the_host_and_the_readers_open_it_and_no_other_host_does():
    s = _sealed()
    assert open_sealed(s, [ALICE], AAD) == open_sealed(s, [READERS], AAD) == b"root reference and paths"
    assert open_sealed(s, [BOB], AAD) is None
    assert open_sealed(s, [BOB, ALICE], AAD) == b"root reference and paths"
    assert b"root reference" not in s


def test_keys_derive_from_the_master_key_by_host_name():
    assert host_private(MASTER, "alice") == ALICE  # a key added later for alice opens her payloads
    assert len({ALICE, BOB, READERS, host_private(os.urandom(32), "alice")}) == 4


def test_it_is_bound_to_its_record():
    s = _sealed()
    with pytest.raises(CorruptionError, match="does not open"):
        open_sealed(s, [ALICE], AAD + b"-another")


@pytest.mark.parametrize("part", ["box", "wrapped", "ephemeral"])
def test_an_altered_value_does_not_open(part):
    doc = msgpack.unpackb(_sealed(), raw=False)
    if part == "box":
        doc["box"] = doc["box"][:-1] + bytes([doc["box"][-1] ^ 1])
    elif part == "wrapped":
        doc["to"][0][1] = bytes(48)
    else:
        doc["e"] = public_of(os.urandom(32))
    with pytest.raises(CorruptionError, match="does not open"):
        open_sealed(msgpack.packb(doc), [ALICE], AAD)


@pytest.mark.parametrize("doc", [
    b"not msgpack \xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "e": bytes(32), "to": [], "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(31), "to": [[bytes(32), bytes(48)]], "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [], "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [[bytes(32), bytes(48)]] * 9, "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [[bytes(32), "str"]], "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [[bytes(32), bytes(48)]], "box": 7}),
    msgpack.packb({"v": True, "e": bytes(32), "to": [[bytes(32), bytes(48)]], "box": b""}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [[bytes(32), bytes(48)]], "box": b"", "x": 1}),
    msgpack.packb({"v": 1, "e": bytes(32), "to": [[bytes(32), bytes(48)], [bytes(32), bytes(48)]], "box": b""}),
], ids=["garbage", "list", "version", "short-key", "nobody", "too-many", "str", "box-type", "bool-version",
        "extra-key", "a-recipient-twice"])
def test_malformed_values_are_corruption(doc):
    with pytest.raises(CorruptionError, match="malformed sealed payload"):
        open_sealed(doc, [ALICE], AAD)


def test_a_low_order_ephemeral_key_is_corruption_not_a_crash():
    doc = msgpack.unpackb(_sealed(), raw=False)
    doc["e"] = bytes(32)  # the all-zero point: X25519 refuses the exchange
    with pytest.raises(CorruptionError):
        open_sealed(msgpack.packb(doc), [ALICE], AAD)


def test_the_spec_written_out_again_opens_it():
    """SPEC.md section 8a from the primitives: the wrap key is HKDF-SHA256 of the shared secret
    with info "kdist/v3/payload-key" NUL, the ephemeral and the recipient's public keys."""
    e_pub, to, box = recipients_of(_sealed(b"spec"))
    r, wrapped = to[1]
    assert r == public_of(READERS)
    shared = X25519PrivateKey.from_private_bytes(READERS).exchange(X25519PublicKey.from_public_bytes(e_pub))
    wrap = HKDF(hashes.SHA256(), 32, None, b"kdist/v3/payload-key\x00" + e_pub + r).derive(shared)
    key = AESGCM(wrap).decrypt(bytes(12), wrapped, AAD)
    assert AESGCM(key).decrypt(bytes(12), box, AAD) == b"spec"
    assert READERS == HKDF(hashes.SHA256(), 32, None, b"kdist/v3/readers").derive(MASTER)


def test_recipients_are_counted_once_and_bounded():
    assert len(recipients_of(seal(b"x", [public_of(ALICE)] * 3, AAD))[1]) == 1
    with pytest.raises(ValueError):
        seal(b"x", [], AAD)
    with pytest.raises(ValueError):
        seal(b"x", [public_of(os.urandom(32)) for _ in range(9)], AAD)


def test_extra_recipients_reach_a_host_only_for_a_key_that_cannot_derive_it_and_only_usable_ones():
    """A tag edit's ``also`` (the recipients of its snapshot's record, which a host wrote) counts
    only for a key that does not know the host's public key (maintenance), and only its
    well-formed, not low-order keys: a host cannot make another host's tagging raise."""
    from repo_format.sealed_payloads import PayloadKeys

    maintenance = PayloadKeys(public_of(READERS), (READERS,))
    low_order = bytes(32)
    sealed = maintenance.seal(b"tags", "alice", b"aad", also=[low_order, public_of(ALICE), public_of(READERS)])
    assert [r for r, _w in recipients_of(sealed)[1]] == [public_of(READERS), public_of(ALICE)]
    assert open_sealed(sealed, [ALICE], b"aad") == b"tags"
    admin = PayloadKeys.of_admin(MASTER)  # knows alice's key: another record's recipients do not count
    sealed = admin.seal(b"tags", "alice", b"aad", also=[public_of(BOB)])
    assert [r for r, _w in recipients_of(sealed)[1]] == [public_of(READERS), public_of(ALICE)]
