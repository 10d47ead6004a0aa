"""The snapshot model: directory objects, entries and snapshot manifests.

A directory object is a metadata object (msgpack) listing its entries sorted by name; each entry
carries type, mode, size, mtime in nanoseconds, ownership, a symlink target or an object id, and
for directories a summary of the subtree. A snapshot manifest names the root directory object and
what was backed up, by whom, when, with which totals. Decoding validates everything it reads: a
hostile directory object yields a ``CorruptionError``, never a traversal or an exception trace.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass, field

import msgpack

from repo_format.errors import CorruptionError, KdistError
from repo_format.manifest import ManifestRecord
from repo_format.objects import ObjectStore

DIR_VERSION = 1
SNAPSHOT_LABEL = "snapshot"
TYPE_FILE, TYPE_DIR, TYPE_SYMLINK = "f", "d", "l"
ENTRY_TYPES = (TYPE_FILE, TYPE_DIR, TYPE_SYMLINK)
MAX_NAME_BYTES = 4096


def _wire_str(s: str) -> str | bytes:
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s)


def check_entry_name(name: str) -> str:
    """Refuse names that could escape a directory when restored (``..``, ``/``, NUL, empty)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name
            or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES):
        raise CorruptionError(f"directory entry has an unsafe name {name!r}")
    return name


@dataclass
class Entry:
    name: str
    type: str
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    target: str = ""  # symlink target
    oid: str = ""  # object id of file data or of the subdirectory's directory object
    inode: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    # directories: totals of the subtree (files, dirs, bytes), for fast ls/diff/stats
    summary: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        d = asdict(self)
        for k in ("name", "target"):  # names that are not UTF-8 travel as raw bytes
            d[k] = _wire_str(d[k])
        return {k: v for k, v in d.items() if v not in ("", 0, {}) or k in ("name", "type")}

    @classmethod
    def from_wire(cls, d: dict) -> "Entry":
        try:
            d = dict(d)
            for k in ("name", "target"):
                if isinstance(d.get(k), bytes):
                    d[k] = os.fsdecode(d[k])
            e = cls(**d)
        except TypeError as exc:
            raise CorruptionError("directory entry has unknown or missing fields") from exc
        check_entry_name(e.name)
        if e.type not in ENTRY_TYPES:
            raise CorruptionError(f"directory entry {e.name!r} has unknown type {e.type!r}")
        if not all(isinstance(getattr(e, k), int) for k in ("mode", "size", "mtime_ns", "uid", "gid")):
            raise CorruptionError(f"directory entry {e.name!r} has malformed metadata")
        if e.size < 0 or not isinstance(e.oid, str) or not isinstance(e.target, str):
            raise CorruptionError(f"directory entry {e.name!r} has malformed metadata")
        return e


def encode_directory(entries: list[Entry]) -> bytes:
    entries = sorted(entries, key=lambda e: e.name)
    return msgpack.packb({"v": DIR_VERSION, "entries": [e.to_wire() for e in entries]}, use_bin_type=True)


def decode_directory(data: bytes) -> list[Entry]:
    try:
        doc = msgpack.unpackb(data, raw=False)
        if doc.get("v") != DIR_VERSION:
            raise CorruptionError(f"directory object has unknown version {doc.get('v')!r}")
        entries = [Entry.from_wire(d) for d in doc["entries"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptionError("directory object is malformed") from exc
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise CorruptionError("directory object has duplicate entry names")
    return entries


def read_directory(objects: ObjectStore, oid: str) -> list[Entry]:
    return decode_directory(objects.read_all(oid))


@dataclass
class Source:
    host: str
    user: str
    path: str

    @classmethod
    def local(cls, path: str) -> "Source":
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry (containers)
            user = "unknown"
        return cls(socket.gethostname(), user, path)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.path}"


@dataclass
class Snapshot:
    """A snapshot manifest's payload plus its manifest id and timestamp."""

    source: Source
    root: str
    start: float
    end: float
    totals: dict = field(default_factory=dict)  # files, dirs, bytes, new_bytes, errors, ...
    tags: list = field(default_factory=list)
    description: str = ""
    checkpoint: bool = False
    errors: list = field(default_factory=list)  # [{path, error}] (first few hundred)
    run: str = ""  # a sharded backup's run id, on the checkpoints of its parts (kdist.distributed)
    id: str = ""
    ts: int = 0

    def labels(self) -> dict:
        return {
            "type": SNAPSHOT_LABEL,
            "host": self.source.host,
            "user": self.source.user,
            "path": self.source.path,
            "checkpoint": "1" if self.checkpoint else "0",
            **({"run": self.run} if self.run else {}),
        }

    def payload(self) -> bytes:
        d = asdict(self)
        d.pop("id")
        d.pop("ts")
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def from_record(cls, rec: ManifestRecord) -> "Snapshot":
        try:
            d = msgpack.unpackb(rec.payload, raw=False)
            d["source"] = Source(**d["source"])
            snap = cls(**d)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"snapshot manifest {rec.id} is malformed") from exc
        snap.id, snap.ts = rec.id, rec.ts
        return snap

    @property
    def short_id(self) -> str:
        return self.id[:8]


def list_snapshots(manifests, include_checkpoints: bool = False, **labels) -> list[Snapshot]:
    """Snapshots, oldest first; checkpoints only when asked."""
    if not include_checkpoints:
        labels["checkpoint"] = "0"
    return [Snapshot.from_record(r) for r in manifests.find(type=SNAPSHOT_LABEL, **labels)]


class SnapshotNotFound(KdistError):
    """No snapshot matches, or a prefix matches more than one."""


def resolve_snapshot(manifests, ref: str, source_path: str | None = None) -> Snapshot:
    """Find a snapshot by unique id prefix or ``latest`` (optionally of one source path)."""
    snaps = list_snapshots(manifests, include_checkpoints=True)
    if ref == "latest":
        finals = [s for s in snaps if not s.checkpoint and (source_path is None or s.source.path == source_path)]
        if not finals:
            raise SnapshotNotFound("the repository has no snapshots" + (f" of {source_path}" if source_path else ""))
        return max(finals, key=lambda s: (s.end, s.ts))
    matches = [s for s in snaps if s.id.startswith(ref.lower())] if ref else []
    if not matches:
        raise SnapshotNotFound(f"no snapshot with id {ref!r}")
    if len(matches) > 1:
        raise SnapshotNotFound(f"snapshot id {ref!r} is ambiguous ({len(matches)} snapshots match); give more characters")
    return matches[0]
