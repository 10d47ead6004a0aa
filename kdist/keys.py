"""Managing keys: adding and removing key slots, and upgrading a version-1 repository to them.

Owns the library side of ``kdist key`` and ``kdist repo upgrade``: a key is a slot blob (what its
password opens) plus a root-signed key record (what readers trust its signatures for). Removing
a key deletes its slot and writes a record listing what it signed so far: nothing it signs later
counts. Only an admin (the root key) may do any of this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import msgpack

from repo_format import constants as C
from repo_format import format_blob
from repo_format.content import make_epoch_manager
from repo_format.crypto import KdfParams
from repo_format.errors import KdistError
from repo_format.keyslots import (ADMIN, HOST, KEY_RECORD_ID_PREFIX, KEY_RECORD_TYPE, ROLES, ROOT_KEY_ID, Identity,
                                  key_record_labels, key_record_payload, new_root_identity, public_key, record_digest,
                                  slot_name)
from repo_format.manifest import ManifestStore
from repo_format.repository import Repository
from repo_format.session import live_sessions
from repo_format.storage.base import BlobStorage, delete_unless_locked

log = logging.getLogger(__name__)

KEY_RECORD_PREFIX = KEY_RECORD_ID_PREFIX


class KeyManagementError(KdistError):
    """A key cannot be added or removed as asked (unknown id, the key in use, no host name)."""


@dataclass
class KeyRow:
    key_id: str
    role: str
    host: str
    state: str  # "active", "removed", "no slot" (its password opens nothing)
    current: bool = False
    # format 3: an active host key of an older generation than its host's (a key of the host was
    # removed after it was added): it does not see what admins write for the host; replace it
    older_generation: bool = False


def _need_admin(repo: Repository, what: str) -> Identity:
    if not repo.format.signed:
        raise KeyManagementError("this repository has one password and no key slots (format version 1): "
                        "run `kdist repo upgrade` first")
    repo.require(ADMIN, what=what)
    return repo.identity


def add_key(repo: Repository, password: str, role: str, host: str = "", kdf: KdfParams | None = None) -> Identity:
    """Add a key of ``role`` opened by ``password``; a host key names its ``host``."""
    _need_admin(repo, "add keys")
    if role not in ROLES:
        raise KeyManagementError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if (role == HOST) != bool(host):
        raise KeyManagementError("a host key needs --host NAME (the host it backs up), and only a host key has one")
    if "\x00" in host:
        raise KeyManagementError("a host name cannot hold a NUL character")
    registered = {r.labels.get("key") for r in repo.manifests.find(type=KEY_RECORD_TYPE)}
    # format 3: a host key added after one of its host's was removed gets the next generation of
    # the host's payload and tree keys, which the removed one cannot derive (SPEC.md section 8a)
    per_host = role == HOST and repo.format.version >= C.FORMAT_VERSION_CONVERGENT
    generation = repo.manifests.host_generation(host) if per_host else 0
    identity = format_blob.add_slot(repo.storage, repo.format, password, role, host, kdf, registered, generation)
    repo.manifests.put(key_record_labels(identity.slot, role, host),
                       key_record_payload(public_key(identity.signing_key), generation=generation),
                       manifest_id=KEY_RECORD_PREFIX + identity.slot)
    return identity


def list_keys(repo: Repository) -> list[KeyRow]:
    slots = {m.name for m in repo.storage.list(C.KEY_SLOT_PREFIX)}
    rows = []
    records = repo.manifests.find(type=KEY_RECORD_TYPE)
    per_host = repo.format.version >= C.FORMAT_VERSION_CONVERGENT  # (generations: format 3's)
    for r in records:
        key_id = r.labels["key"]
        state = "removed" if r.labels.get("revoked") == "1" else ("active" if slot_name(key_id) in slots else "no slot")
        host = r.labels.get("host", "")
        older = False
        if per_host and state == "active" and r.labels["role"] == HOST:
            older = _generation_of(r) < repo.manifests.host_generation(host)
        rows.append(KeyRow(key_id, r.labels["role"], host, state, key_id == repo.identity.slot, older))
    return sorted(rows, key=lambda k: (k.state != "active", k.role, k.host, k.key_id))


def _generation_of(rec) -> int:
    try:
        generation = msgpack.unpackb(rec.payload, raw=False).get("gen", 0)
    except (ValueError, TypeError, AttributeError):
        return 0
    return generation if type(generation) is int else 0


def remove_key(repo: Repository, key_id: str) -> int:
    """Remove key ``key_id``: its slot is deleted and a root-signed record lists the records it
    signed so far, which keep counting (a host's earlier snapshots); nothing it writes later
    does. Returns how many of its records stay valid."""
    _need_admin(repo, "remove keys")
    if key_id == repo.identity.slot:
        raise KeyManagementError("refusing to remove the key this command was opened with; "
                                 "open the repository with another admin key")
    current = {r.id: r for r in repo.manifests.find(type=KEY_RECORD_TYPE)}
    rec = current.get(KEY_RECORD_PREFIX + key_id)
    if rec is None or rec.labels.get("revoked") == "1":
        raise KeyManagementError(f"no active key {key_id} (see `kdist key list`)")
    role, host = rec.labels["role"], rec.labels.get("host", "")
    signer = ROOT_KEY_ID if role == ADMIN else key_id
    best, _ = repo.manifests._current()
    keep = sorted(record_digest(r.raw) for r in best.values() if r.signer == signer) if role != ADMIN else []
    public = msgpack.unpackb(rec.payload, raw=False)["public"]
    repo.manifests.put(key_record_labels(key_id, role, host, revoked=True),
                       key_record_payload(public, keep, _generation_of(rec)), manifest_id=KEY_RECORD_PREFIX + key_id)
    if not delete_unless_locked(repo.storage, slot_name(key_id)):
        log.warning("Object Lock keeps the slot of key %s for now: its password still opens it until the "
                    "lock ends, then maintenance deletes it; what it signs from now on does not count", key_id)
    return len(keep)


def upgrade_repository(storage: BlobStorage, password: str, now: float, session_expiry: float) -> int:
    """Make a version-1 repository version 2 (the root key, key slots, signed manifests), its
    existing manifest records signed with the new root key first: a crash in between leaves a
    version-1 repository with one more (ignored) blob, and running it again finishes the job.
    Refused while another client writes: a version-1 writer's record published after the switch
    would be unsigned and not count. Returns how many records were signed."""
    writing = live_sessions(list(storage.list(C.SESSION_PREFIX)), now, session_expiry)
    if writing:
        raise KeyManagementError(f"{len(writing)} client(s) are writing to this repository; stop backups and "
                                 "maintenance and upgrade again")
    fmt = format_blob.decode(format_blob.read_blob(storage), password)
    if fmt.version >= 2:
        raise KeyManagementError("this repository already has key slots (format version 2)")
    legacy = Repository(storage, fmt, heartbeat_thread=False)
    root = new_root_identity()
    signer = ManifestStore(storage, fmt.keys.manifest_aead(), legacy.session, identity=root, unique_id=fmt.unique_id)
    done: set = set()
    for switch in (True, False):  # before the switch, and what was published meanwhile
        records = [r for r in _every_record(legacy.manifests) if _key(r) not in done]
        if records:
            signer.write_records([replace(r, signer="", sig=b"", raw=b"") for r in records])
            done.update(_key(r) for r in records)
        if switch:
            format_blob.upgrade(storage, password, root.signing_key)
    # its epochs signed: from now on a marker counts only with the root's or maintenance's signature
    epochs = make_epoch_manager(storage, format_blob.read(storage, password), legacy.session)
    epochs.sign_epochs(epochs.refresh())
    return len(done)


def _key(r) -> bytes:
    return msgpack.packb(r.fields_wire())


def _every_record(manifests: ManifestStore) -> list:
    """Every record of every manifest blob, superseded ones too: each gets a signed copy, so that
    `repo check` can tell an unsigned record from before the upgrade (it has one) from a forgery."""
    seen, out = set(), []
    for m in manifests.storage.list(C.MANIFEST_PREFIX):
        for r in manifests.read_blob(m.name):
            if r.signer:
                continue  # a copy an earlier, interrupted upgrade signed with a key that never became the root
            k = _key(r)
            if k not in seen:
                seen.add(k)
                out.append(r)
    return out
