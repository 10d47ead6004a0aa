"""Manifests: small immutable, timestamped records (snapshots, checkpoints, policies).

Each manifest blob ``m<random>-<session>`` holds one or more sealed records
``{id, labels, ts, deleted, payload}``. Records are never edited: a newer record with the same id
replaces an older one (newest ``ts`` wins; on a tie a tombstone wins, then the larger blob name),
and deleting writes a tombstone. ``compact`` writes every current record into one blob and, in a
later run, removes the blobs that blob surely covers, so listing stays one LIST plus a few GETs
and no reader (maintenance's walk included) ever lists neither the old blobs nor the new one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import msgpack

from repo_format import changing, clock
from repo_format import constants as C
from repo_format.crypto import Aead
from repo_format.io_pool import parallel_map
from repo_format.keyslots import (ADMIN, COMPACTED_DOMAIN, HOST, HOST_RECORD_TYPES, KEY_RECORD_TYPE, MAINTENANCE,
                                  RECORD_DOMAIN, ROOT_KEY_ID, Trust, sign)
from repo_format.sealed_payloads import payload_aad, recipients_of
from repo_format.errors import BlobNotFound, CorruptionError, KdistError
from repo_format.storage.base import BlobStorage, delete_unless_locked

if TYPE_CHECKING:
    from repo_format.keyslots import Identity
    from repo_format.local_cache import LocalCache

MAX_MANIFEST_BLOB = 256 * 1024 * 1024
# format 3: the records whose payload, and every label but ``CLEAR_LABELS``, are sealed to their
# host and the readers (SPEC.md section 8a): snapshots, failures, and tag edits of snapshots
SEALED_RECORD_TYPES = HOST_RECORD_TYPES + ("tags",)
CLEAR_LABELS = ("type", "host", "checkpoint")  # what every reader needs to judge a record (section 8)


@dataclass(frozen=True)
class ManifestRecord:
    id: str
    labels: dict
    ts: int  # microseconds since the Unix epoch (writer's clock; see gc/README.md)
    payload: bytes = b""
    deleted: bool = False
    blob: str = field(default="", compare=False)
    # version-2 records: the signer's key id, its Ed25519 signature, and the signed bytes
    signer: str = field(default="", compare=False)
    sig: bytes = field(default=b"", compare=False, repr=False)
    raw: bytes = field(default=b"", compare=False, repr=False)
    cert: bytes = field(default=b"", compare=False, repr=False)  # the signer's root-signed certificate
    cert_sig: bytes = field(default=b"", compare=False, repr=False)
    vouched: bool = field(default=False, compare=False)  # read from a compacted blob the root or maintenance signed
    # when the record was first stored, on the storage's clock (the listing's timestamp of its
    # blob, or what a trusted compaction carried over); 0.0 when not known
    stored: float = field(default=0.0, compare=False)

    def fields_wire(self) -> dict:
        return {"id": self.id, "labels": self.labels, "ts": self.ts, "payload": self.payload, "deleted": self.deleted}

    def to_wire(self) -> dict:
        """The record as a blob of its version holds it (a signed one exactly as it was signed)."""
        if self.signer:
            wire = {"r": self.raw, "k": self.signer, "s": self.sig}
            if self.cert:
                wire.update(c=self.cert, cs=self.cert_sig)
            return wire
        return self.fields_wire()


def _record(r: dict, blob: str, version: int = 1) -> ManifestRecord:
    """One decoded record, its field types checked exactly: a conversion such as ``bytes(n)``
    or ``int(inf)`` of a hostile value would allocate without bound or raise untyped errors."""
    signer, sig, raw, cert, cert_sig = "", b"", b"", b"", b""
    if "r" in r:  # a signed record (by its shape: an older compactor may have copied one into a v1 blob)
        signer, sig, raw, cert, cert_sig = r["k"], r["s"], r["r"], r.get("c", b""), r.get("cs", b"")
        if not all(type(x) is bytes for x in (sig, raw, cert, cert_sig)) or type(signer) is not str:
            raise TypeError("signed manifest record field types")
        r = msgpack.unpackb(raw, raw=False)
    rec = ManifestRecord(r["id"], r["labels"], r["ts"], r["payload"], r["deleted"], blob, signer, sig, raw,
                         cert, cert_sig)
    if not (type(rec.id) is str and type(rec.labels) is dict and type(rec.ts) is int
            and type(rec.payload) is bytes and type(rec.deleted) is bool):
        raise TypeError("manifest record field types")
    return rec


def _sealed_part(plain: bytes) -> tuple[dict, bytes]:
    """The sealed labels and payload of a format 3 record, exactly ``{"labels": {str: str},
    "payload": bin}`` (SPEC.md section 8a); ``({}, b"")`` for any other shape, with no label
    that readers judge records by (those stay in the clear)."""
    try:
        doc = msgpack.unpackb(plain, raw=False)
        labels, payload = doc["labels"], doc["payload"]
        if (type(doc) is dict and set(doc) == {"labels", "payload"} and type(payload) is bytes
                and type(labels) is dict and not set(labels) & set(CLEAR_LABELS)
                and all(type(k) is str and type(v) is str for k, v in labels.items())):
            return labels, payload
    except (ValueError, KeyError, TypeError, msgpack.ExtraData):
        pass
    return {}, b""


def newer(a: ManifestRecord, b: ManifestRecord) -> bool:
    if a.ts != b.ts:
        return a.ts > b.ts
    if a.deleted != b.deleted:
        return a.deleted
    return a.blob > b.blob


def new_manifest_id() -> str:
    return secrets.token_hex(16)


class ManifestStore:
    """Manifest blobs of one repository. With an ``identity`` (format version 2) every record
    written is signed with it, and readers honour only the records ``Trust`` accepts: the
    others are left out of every view and listed in ``refused`` for ``repo check``."""

    def __init__(self, storage: BlobStorage, aead: Aead, session: str, cache: "LocalCache | None" = None,
                 identity: "Identity | None" = None, unique_id: bytes = b"", payload_keys=None):
        self.storage = storage
        # format 3: the payloads and most labels of snapshot, failure and tag edit records are
        # sealed to their host and the readers (repo_format.sealed_payloads); ``find`` opens
        # them, and leaves out what this key cannot open (another host's)
        self.payload_keys = payload_keys
        self._opened: dict[tuple[str, bytes], tuple | None] = {}  # (id, sealed payload) -> what it opened to
        self._recipients: dict[str, list[bytes]] = {}  # id -> the recipients of a record this key opened
        self._aead = aead
        self.session = session
        self.cache = cache  # copies of manifest blobs (immutable; authenticated when read)
        self.identity = identity
        self.unique_id = unique_id
        self.trust = Trust(unique_id, identity.root_public) if identity is not None else None
        self.refused: list[tuple[ManifestRecord, str]] = []  # what the last full read did not honour
        self.keys: dict = {}  # the registry of keys the last full read found
        self._registry_read: float | None = None  # when the registry (``keys``) was last read (monotonic)
        self.covered: list[str] = []  # the blobs the last compaction found covered (deleted, or kept by a lock)
        # Clients that decide nothing from what is missing (listing, restoring, backing up) pass
        # over a blob that does not open or decode, and name it in ``unreadable``: any client
        # holding the key, or none (random bytes), can put one, and must not stop every restore
        # and backup of the fleet. Maintenance and forget stay strict (False): what they do not
        # see they would take for gone.
        self.skip_unreadable = False
        self.unreadable: list[str] = []

    def signer_role(self, signer: str) -> str:
        """The role of the key that signed a record (as the last full read found the keys); a
        version-1 repository's one password, and the root, are admin."""
        if self.trust is None or signer == ROOT_KEY_ID:
            return ADMIN
        key = self.keys.get(signer)
        return key.role if key is not None else ""

    def _blob_name(self) -> str:
        return f"{C.MANIFEST_PREFIX}{secrets.token_hex(12)}-{self.session}"

    def new_id(self) -> str:
        return self.identity.new_record_id() if self.identity is not None else new_manifest_id()

    def _signed(self, rec: ManifestRecord) -> ManifestRecord:
        if self.identity is None or rec.signer:
            return rec
        raw = msgpack.packb(rec.fields_wire())
        sig = sign(self.identity, RECORD_DOMAIN, self.unique_id, raw)
        return replace(rec, signer=self.identity.key_id, sig=sig, raw=raw, cert=self.identity.cert,
                       cert_sig=self.identity.cert_sig)

    def write_records(self, records: list[ManifestRecord]) -> str:
        name = self._blob_name()
        records = [self._signed(r) for r in records]
        plain = msgpack.packb({"v": 2 if self.identity else 1, "records": [r.to_wire() for r in records]})
        sealed = self._aead.seal(plain, name.encode("ascii"))
        self.storage.put(name, sealed)
        if self.cache is not None:
            self.cache.store_blob(name, sealed)
        return name

    def put(self, labels: dict, payload: bytes, manifest_id: str | None = None) -> ManifestRecord:
        """Write one record; returns it (a sealed one as ``find`` gives it: opened again)."""
        record_id = manifest_id or self.new_id()
        stored, clear = payload, dict(labels)
        if self.payload_keys is not None and labels.get("type") in SEALED_RECORD_TYPES:
            clear = {k: v for k, v in labels.items() if k in CLEAR_LABELS}
            hidden = {k: v for k, v in labels.items() if k not in CLEAR_LABELS}
            host = labels["host"] if type(labels.get("host")) is str else ""
            # a tag edit goes to whoever its snapshot's record went to: a maintenance key, which
            # cannot derive a host's public key, so still reaches the host
            also = self._recipients.get(labels["snapshot"], []) if type(labels.get("snapshot")) is str else []
            generation = self.host_generation(host) if self.payload_keys.master_key is not None else 0
            stored = self.payload_keys.seal(msgpack.packb({"labels": hidden, "payload": payload}), host,
                                            payload_aad(self.unique_id, record_id), also, generation)
        rec = self._signed(ManifestRecord(record_id, clear, int(clock.now() * 1e6), stored))
        self.write_records([rec])
        if labels.get("type") == KEY_RECORD_TYPE:
            self._registry_read = None  # (host_generation reads the registry again)
        return replace(rec, labels=dict(labels), payload=payload)

    def host_generation(self, host: str, max_age: float | None = None) -> int:
        """Format 3: the generation of ``host``'s payload and tree keys, how many of its host
        keys the registry says were removed (root-signed records only: a host cannot forge
        one). What an admin seals and writes for the host uses it; a key added for the host gets
        it (``kdist.keys.add_key``); the removed keys hold only earlier ones. ``max_age``
        (seconds): list again if the last listing's registry is older (another process may have
        removed a key since)."""
        if self.trust is None or not host:
            return 0
        if self._registry_read is None or max_age is not None and clock.monotonic() - self._registry_read > max_age:
            self._current()
        return sum(1 for k in self.keys.values() if k.role == HOST and k.host == host and k.revoked)

    def opened(self, rec: ManifestRecord) -> ManifestRecord | None:
        """``rec`` as its readers see it: in format 3 a snapshot, failure or tag edit record with
        its payload and its sealed labels opened (the clear ones win), or None if this key is
        none of its recipients (another host's). A sealed part that does not open for a
        recipient, or is not of its exact shape, is left empty: the record reads as malformed."""
        if self.payload_keys is None or rec.deleted or rec.labels.get("type") not in SEALED_RECORD_TYPES:
            return rec
        key = (rec.id, rec.payload)  # (an X25519 agreement each: once per record, not per ``find``)
        if key not in self._opened:
            try:
                plain = self.payload_keys.open(rec.payload, payload_aad(self.unique_id, rec.id))
                self._opened[key] = None if plain is None else _sealed_part(plain)
                if plain is not None:
                    self._recipients[rec.id] = [r for r, _wrapped in recipients_of(rec.payload)[1]]
            except CorruptionError:
                self._opened[key] = ({}, b"")
        part = self._opened[key]
        if part is None:
            return None
        hidden, payload = part
        return replace(rec, labels={**hidden, **rec.labels}, payload=payload)

    def delete(self, manifest_ids: list[str]) -> None:
        """Write one tombstone blob for the given ids. Each tombstone is timestamped after the
        record it deletes, whatever this client's clock says: newer records win, and a forget
        from a host whose clock is behind the snapshot's writer's must not be a no-op."""
        if not manifest_ids:
            return
        best, _ = self._current()
        now = int(clock.now() * 1e6)
        self.write_records([ManifestRecord(i, {}, max(now, best[i].ts + 1) if i in best else now, deleted=True)
                            for i in manifest_ids])

    def read_blob(self, name: str) -> list[ManifestRecord]:
        return self._read_blob(name)[0]

    def _read_blob(self, name: str) -> tuple[list[ManifestRecord], dict]:
        return self._parse(name, self._read_doc(name))

    def _read_blob_or_skip(self, name: str, unreadable: list) -> tuple[list[ManifestRecord], dict]:
        try:
            return self._read_blob(name)
        except CorruptionError:
            if not self.skip_unreadable:
                raise
            unreadable.append(name)  # (list.append is atomic: parallel_map's threads share it)
            return [], {}

    def _parse(self, name: str, doc: dict) -> tuple[list[ManifestRecord], dict]:
        """The blob's records, and for a compacted version-2 blob its signed body (``read_at``,
        ``stored``, ``signer``, ``sig``, ``body``); the records' ``stored`` is not set here."""
        extra = {}
        try:
            version = doc["v"]
            if "body" in doc:  # a compacted version-2 blob: its body is signed by its compactor
                body, signer, sig = doc["body"], doc["k"], doc["s"]
                if not (type(body) is bytes and type(signer) is str and type(sig) is bytes):
                    raise TypeError("compacted manifest field types")
                inner = msgpack.unpackb(body, raw=False)
                extra = {"read_at": inner["read_at"], "stored": inner["stored"], "signer": signer, "sig": sig,
                         "body": body, "cert": doc.get("c", b""), "cert_sig": doc.get("cs", b"")}
                if not (type(extra["cert"]) is bytes and type(extra["cert_sig"]) is bytes
                        and type(extra["read_at"]) in (int, float)):
                    raise TypeError("compacted manifest field types")
                wires = inner["records"]
                if type(extra["stored"]) is not list or len(extra["stored"]) != len(wires):
                    raise TypeError("compacted manifest stored times")
            else:
                wires = doc["records"]
            records = [_record(r, name, version) for r in wires]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"manifest blob {name} is malformed") from exc
        return records, extra

    def _read_doc(self, name: str, cached: bool = True) -> dict:
        plain = None
        if cached and self.cache is not None and (sealed := self.cache.sealed_blob(name, MAX_MANIFEST_BLOB)) is not None:
            try:
                plain = self._aead.open(sealed, name.encode("ascii"), what=f"manifest blob {name}")
            except CorruptionError:
                self.cache.drop_blob(name)
        if plain is None:
            sealed = self.storage.get(name, 0, MAX_MANIFEST_BLOB + 1)  # never load more than the cap
            if len(sealed) > MAX_MANIFEST_BLOB:
                raise CorruptionError(f"manifest blob {name} is implausibly large")
            plain = self._aead.open(sealed, name.encode("ascii"), what=f"manifest blob {name}")
            if self.cache is not None:
                self.cache.store_blob(name, sealed)
        try:
            doc = msgpack.unpackb(plain, raw=False)
            if not isinstance(doc, dict) or doc["v"] not in (1, 2):
                raise CorruptionError(f"manifest blob {name} has an unknown version")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"manifest blob {name} is malformed") from exc
        return doc

    def _trusted_compaction(self, name: str, extra: dict, keys: dict | None) -> bool:
        """Whether a compacted version-2 blob was signed by the root or a maintenance key: only
        then do its ``read_at`` (which lets compaction delete the blobs it covers) and its
        records' first-stored times count. Legacy repositories trust every blob."""
        if self.trust is None:
            return True
        if not extra:
            return False
        signer = extra["signer"]
        if signer == ROOT_KEY_ID:
            public = self.trust.root_public
        else:
            key = self.trust.signer_key(signer, extra.get("cert", b""), extra.get("cert_sig", b""), keys or {})
            if isinstance(key, str) or key.role != MAINTENANCE or key.revoked:
                return False
            public = key.public
        return self.trust.verify_once(COMPACTED_DOMAIN, public, extra["sig"], name.encode("ascii") + extra["body"])

    def _read_at(self, meta, keys: dict | None) -> float | None:
        """When a compacted blob's writer started reading the records it holds (storage clock);
        blobs from before this field: their put time. None if it is gone meanwhile, or, in a
        signed repository, unless a trusted compactor signed it (a forged ``read_at`` must never
        let compaction delete a blob)."""
        try:
            doc = self._read_doc(meta.name, cached=False)  # whether it is still there matters here
        except BlobNotFound:
            return None
        if "body" in doc:
            extra = self._parse(meta.name, doc)[1]
            return float(extra["read_at"]) if self._trusted_compaction(meta.name, extra, keys) else None
        if self.trust is not None:
            return None
        read_at = doc.get("read_at")
        return float(read_at) if isinstance(read_at, (int, float)) else meta.timestamp

    def _current(self, live_ids: set | None = None) -> tuple[dict[str, ManifestRecord], list[str]]:
        """Every id's winning record among those that count. If a listed blob vanishes before
        it is read (a concurrent compaction merged it), list again: the merged blob is then in
        the listing. Never return a view that silently lacks records: maintenance decides what
        is live from it. ``live_ids`` gets every id a live (not tombstone) record of some listed
        blob has. Each record's ``stored`` is its blob's listing time, or the earlier time a
        trusted compaction carried over."""
        for _ in changing.attempts("the manifest blobs"):
            metas = list(self.storage.list(C.MANIFEST_PREFIX))
            names = [m.name for m in metas]
            unreadable: list[str] = []
            try:
                blobs = parallel_map(lambda name: self._read_blob_or_skip(name, unreadable), names)
            except BlobNotFound:
                continue
            self.unreadable = sorted(unreadable)
            if self.cache is not None:
                self.cache.retain_blobs(C.MANIFEST_PREFIX, set(names))
            every = [r for records, _ in blobs for r in records]
            keys = self.trust.registry(every) if self.trust is not None else None
            records = []
            for m, (recs, extra) in zip(metas, blobs):
                carried = extra["stored"] if extra and self._trusted_compaction(m.name, extra, keys) else None
                # a trusted compactor judged each record it kept: their signatures are not checked
                # again here (the rules of their signers' roles are); `repo check` checks them all
                vouched = carried is not None and self.trust is not None
                for i, r in enumerate(recs):
                    t = m.timestamp
                    if carried is not None and isinstance(carried[i], (int, float)):
                        t = min(t, float(carried[i]))
                    records.append(replace(r, stored=t, vouched=vouched))
            if live_ids is not None:
                live_ids.update(r.id for r in records if not r.deleted)
            if self.trust is not None:
                records, self.refused = self.trust.judge(records)
            self.keys = keys or {}
            self._registry_read = clock.monotonic()
            best: dict[str, ManifestRecord] = {}
            for r in records:
                cur = best.get(r.id)
                if cur is None or newer(r, cur):
                    best[r.id] = r
            return best, names
        raise AssertionError("unreachable: changing.attempts raises when they run out")

    def find(self, **labels) -> list[ManifestRecord]:
        """Live records whose labels include ``labels``, oldest first, as ``opened`` gives them
        (format 3 matches the sealed labels once opened)."""
        best, _ = self._current()
        clear = {k: v for k, v in labels.items() if k in CLEAR_LABELS}  # (never sealed: no opening needed)
        out = [o for r in best.values() if not r.deleted and all(r.labels.get(k) == v for k, v in clear.items())
               and (o := self.opened(r)) is not None and all(o.labels.get(k) == v for k, v in labels.items())]
        return sorted(out, key=lambda r: (r.ts, r.id))

    def compact(self, now: float, settle: float, min_blobs: int = 16, tombstone_rule: bool = True,
                delete=None) -> int:
        """Merge manifest blobs, in two phases so that no listing ever misses a record.

        A blob is deleted only when a compacted blob whose writer started reading more than
        ``settle`` after the blob was written (so its listing surely included it) has itself been
        listed for ``settle``. The compacted blob records that start (``read_at``, ``now`` given by
        the caller before anything is read), not its put time: a writer paused between reading and
        putting must not cover what was published during the pause.
        A new compacted blob is written when at least ``min_blobs`` blobs would remain; it leaves
        out the tombstones that nothing needs any more (``_without_spent_tombstones``).
        ``now`` is the storage's time. Returns the number of blobs deleted: ``delete(name, put
        time)`` says whether it did (maintenance's skips what Object Lock keeps, left for later)."""
        # a signed repository reads the records first: their registry of keys says which
        # compactors to trust, and the same read feeds the compacted blob (one read, not two;
        # ``now`` was taken before either listing, so both cover every blob older than it)
        live_ids: set[str] = set()
        best, keys = None, None
        if self.trust is not None:
            best, _ = self._current(live_ids)
            keys = self.keys
        metas = list(self.storage.list(C.MANIFEST_PREFIX))
        merged = [(m, self._read_at(m, keys)) for m in metas if m.name.startswith(C.MANIFEST_COMPACTED_PREFIX)]
        merged = [(m, t) for m, t in merged if t is not None]

        def covered(b) -> bool:
            return any(m.name != b.name and read_at - settle > b.timestamp and now - m.timestamp >= settle
                       for m, read_at in merged)

        deletable = [b for b in metas if covered(b)]
        if len(metas) - len(deletable) >= min_blobs:
            if best is None:
                best, _ = self._current(live_ids)
            if tombstone_rule:
                best = _without_spent_tombstones(best, live_ids, {m.name: m.timestamp for m in metas}, now, settle)
            else:  # the simulator's mutation: every tombstone dropped
                best = {i: r for i, r in best.items() if not r.deleted}
            name = f"{C.MANIFEST_COMPACTED_PREFIX}{secrets.token_hex(12)}-{self.session}"
            self.storage.put(name, self._aead.seal(self._compacted_doc(name, now, list(best.values())),
                                                   name.encode("ascii")))
        self.covered = [b.name for b in deletable]
        delete = delete or (lambda name, _written_at: delete_unless_locked(self.storage, name))
        return sum(delete(b.name, b.timestamp) for b in deletable)

    def _compacted_doc(self, name: str, read_at: float, records: list[ManifestRecord]) -> bytes:
        if self.identity is None:
            return msgpack.packb({"v": 1, "read_at": read_at, "records": [r.to_wire() for r in records]})
        body = msgpack.packb({"read_at": read_at, "records": [r.to_wire() for r in records],
                              "stored": [r.stored for r in records]})
        sig = sign(self.identity, COMPACTED_DOMAIN, self.unique_id, name.encode("ascii") + body)
        doc = {"v": 2, "body": body, "k": self.identity.key_id, "s": sig}
        if self.identity.cert:
            doc.update(c=self.identity.cert, cs=self.identity.cert_sig)
        return msgpack.packb(doc)


def _without_spent_tombstones(best: dict[str, ManifestRecord], live_ids: set[str], listed: dict[str, float],
                              now: float, settle: float) -> dict[str, ManifestRecord]:
    """``best`` less the tombstones that no longer hide anything: no listed blob holds a live
    record of their id (``live_ids``), and the blob they were read from has been listed for
    ``settle``. A record a tombstone deletes was written before it, so a blob still holding one
    was written earlier still and is in the listing; once no blob holds one, nothing brings the
    record back, and readers that still see the tombstone and those that no longer do agree."""
    return {i: r for i, r in best.items()
            if not (r.deleted and i not in live_ids and now - listed.get(r.blob, now) >= settle)}
