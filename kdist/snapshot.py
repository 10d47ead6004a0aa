"""The snapshot model: directory objects, entries and snapshot manifests.

A directory object is a metadata object (msgpack) listing its entries sorted by name; each entry
carries type, mode, size, mtime in nanoseconds, ownership, a symlink target or an object id, and
for directories a summary of the subtree. A snapshot manifest names the root directory object and
what was backed up, by whom, when, with which totals. Decoding validates everything it reads: a
hostile directory object yields a ``CorruptionError``, never a traversal or an exception trace.
"""

from __future__ import annotations

import contextlib
import gc
import getpass
import math
import operator
import os
import socket
import threading
from dataclasses import asdict, dataclass, field, fields, replace

import msgpack

from repo_format.errors import CorruptionError, KdistError
from repo_format.keyslots import ADMIN, HOST, MAINTENANCE, PermissionRefused
from repo_format.manifest import ManifestRecord
from repo_format.objects import ObjectStore, parse_object_id

DIR_VERSION = 1  # a directory whose entries need nothing newer
DIR_VERSION_SPECIAL = 2  # one holding special entries: kdist before them refuses it ("unknown version 2")
DIR_VERSION_LINKS = 3  # one with extended attributes or hard-link devices (special entries too, or not)
DIR_VERSIONS = (DIR_VERSION, DIR_VERSION_SPECIAL, DIR_VERSION_LINKS)
# Linux's limits (XATTR_NAME_MAX, XATTR_SIZE_MAX, XATTR_LIST_MAX): a name of at most 255 bytes,
# a value of at most 64 KiB, and the names of one file together at most 64 KiB
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTRS = 65536 // 2
SNAPSHOT_LABEL = "snapshot"
# on a part's checkpoint (label ``run``): the session of the process that publishes the snapshot
DRIVER_LABEL = "driver"
TYPE_FILE, TYPE_DIR, TYPE_SYMLINK = "f", "d", "l"
# special files: recorded (type, mode, owner, times; rdev for devices), nothing to read
TYPE_FIFO, TYPE_SOCKET, TYPE_CHAR_DEVICE, TYPE_BLOCK_DEVICE = "p", "s", "c", "b"
SPECIAL_TYPES = (TYPE_FIFO, TYPE_SOCKET, TYPE_CHAR_DEVICE, TYPE_BLOCK_DEVICE)
DEVICE_TYPES = (TYPE_CHAR_DEVICE, TYPE_BLOCK_DEVICE)
ENTRY_TYPES = (TYPE_FILE, TYPE_DIR, TYPE_SYMLINK) + SPECIAL_TYPES
MAX_NAME_BYTES = 4096
# How deep ls, diff and verify follow directories (restore stops at the same depth): a hostile
# chain of directory objects must not make them run or print without bound.
MAX_TREE_DEPTH = 1000


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
    rdev: int = 0  # character and block devices: the device number (st_rdev)
    # extended attributes (every namespace the backup could read: user, security, trusted,
    # system.posix_acl_* for ACLs; security.capability for file capabilities), as
    # (name, value) byte pairs sorted by name
    xattrs: list = field(default_factory=list)
    dev: int = 0  # a file of several links: its device (st_dev); with ``inode`` it names the link group

    def to_wire(self) -> dict:
        # one pass, in field order as always, empty values left out (name and type never): this
        # runs once per entry written; not dataclasses.asdict, which deep-copies
        d = {k: v for k, v in zip(ENTRY_FIELDS, _entry_values(self)) if v or k in _ALWAYS_ON_WIRE}
        d["name"] = _wire_str(self.name)  # names that are not UTF-8 travel as raw bytes
        if self.target:
            d["target"] = _wire_str(self.target)
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "Entry":
        try:
            d = dict(d)
            for k in ("name", "target"):
                if isinstance(d.get(k), bytes):
                    d[k] = os.fsdecode(d[k])
            if "xattrs" in d:
                d["xattrs"] = _xattrs_from_wire(d["xattrs"])
            e = cls(**d)
        except TypeError as exc:
            raise CorruptionError("directory entry has unknown or missing fields") from exc
        check_entry_name(e.name)
        if e.type not in ENTRY_TYPES:
            raise CorruptionError(f"directory entry {e.name!r} has unknown type {e.type!r}")
        bad = _malformed_field(e)
        if bad:
            raise CorruptionError(f"directory entry {e.name!r} has malformed metadata ({bad})")
        return e


# What the stat() fields behind each integer can hold. Outside these ranges a value would fail
# deep inside a restore (os.utime and os.fchown raise OverflowError), so it is corruption here.
_INT_RANGES = (
    ("mode", 0, 0o177777), ("size", 0, 2**63 - 1), ("mtime_ns", -(2**63), 2**63 - 1),
    ("ctime_ns", -(2**63), 2**63 - 1), ("uid", 0, 2**32 - 1), ("gid", 0, 2**32 - 1),
    ("inode", 0, 2**64 - 1), ("nlink", 0, 2**64 - 1), ("rdev", 0, 2**64 - 1), ("dev", 0, 2**64 - 1),
)
_STR_FIELDS = ("user", "group", "target", "oid")
MAX_OID_LENGTH = 129  # "I" and a reference in hex: 64 characters (formats 1, 2) or 128 (format 3)


def _malformed_field(e: Entry) -> str:
    """The name of the first field of ``e`` of the wrong type or out of range, else ``""``."""
    for k, lo, hi in _INT_RANGES:
        v = getattr(e, k)
        if type(v) is not int or not lo <= v <= hi:
            return k
    for k in _STR_FIELDS:
        if type(getattr(e, k)) is not str:
            return k
    if len(e.oid) > MAX_OID_LENGTH:
        return "oid"
    # a symlink target is handed to os.symlink: no NUL, at most PATH_MAX, never empty
    if "\x00" in e.target or len(e.target.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return "target"
    if e.type == TYPE_SYMLINK and not e.target:
        return "target"
    if e.type in SPECIAL_TYPES and (e.oid or e.size or e.target):  # a special entry holds no data
        return "oid" if e.oid else "size" if e.size else "target"
    if e.rdev and e.type not in DEVICE_TYPES:
        return "rdev"
    if e.dev and e.type != TYPE_FILE:  # hard links are kept for regular files
        return "dev"
    if _malformed_xattrs(e.xattrs) or any(not _XATTR_TYPES.get(n, e.type).count(e.type) for n, _v in e.xattrs):
        return "xattrs"
    if type(e.summary) is not dict or any(type(k) is not str or type(v) is not int for k, v in e.summary.items()):
        return "summary"
    return ""


# attributes only some kinds of node can have (Linux): a restore never sets them on another
_XATTR_TYPES = {
    b"security.capability": TYPE_FILE,
    b"system.posix_acl_access": "".join(t for t in ENTRY_TYPES if t != TYPE_SYMLINK),
    b"system.posix_acl_default": TYPE_DIR,
}


def _xattrs_from_wire(pairs) -> list | None:
    """``[[name, value], ...]`` as a list of (bytes, bytes) tuples; None (malformed) for another shape."""
    if type(pairs) is not list or len(pairs) > MAX_XATTRS:
        return None
    out = []
    for p in pairs:
        if type(p) not in (list, tuple) or len(p) != 2:
            return None
        out.append((p[0], p[1]))
    return out


def _malformed_xattrs(xattrs) -> bool:
    if type(xattrs) is not list:
        return True
    last = b""
    for pair in xattrs:
        if type(pair) is not tuple or len(pair) != 2:
            return True
        name, value = pair
        if type(name) is not bytes or type(value) is not bytes:
            return True
        # sorted and unique, no NUL (the kernel's names are C strings), within Linux's limits
        if not last < name or b"\x00" in name or len(name) > MAX_XATTR_NAME or len(value) > MAX_XATTR_VALUE:
            return True
        last = name
    return False


_collections_lock = threading.Lock()
_collections_users = 0
_collections_saved: tuple = ()


@contextlib.contextmanager
def fewer_collections(gen0: int = 100_000):
    """Run the cyclic garbage collector less often while a tree is backed up or restored: each
    file leaves long-lived objects (entries, index entries) that, at the default threshold of
    700 allocations, the collector re-scans over and over: 12% of a 100,000-file backup here.
    The process's thresholds come back when the last of overlapping users is done."""
    global _collections_users, _collections_saved
    with _collections_lock:
        if _collections_users == 0:
            _collections_saved = gc.get_threshold()
            gc.set_threshold(max(_collections_saved[0], gen0), *_collections_saved[1:])
        _collections_users += 1
    try:
        yield
    finally:
        with _collections_lock:
            _collections_users -= 1
            if _collections_users == 0:
                gc.set_threshold(*_collections_saved)


ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_entry_values = operator.attrgetter(*ENTRY_FIELDS)
_ALWAYS_ON_WIRE = ("name", "type")


def _needed_version(e: Entry) -> int:
    if e.xattrs or e.dev:
        return DIR_VERSION_LINKS
    return DIR_VERSION_SPECIAL if e.type in SPECIAL_TYPES else DIR_VERSION


@dataclass
class Listing:
    """A directory object decoded. ``complete``: its writer recorded extended attributes and
    hard-link devices (kdist before them did not: its entries cannot be taken as a file's whole
    metadata). ``top``: a snapshot's root directory's own metadata (mode, owner, times,
    attributes), which no parent entry carries; None in every other directory object."""

    entries: list[Entry]
    complete: bool = True
    top: Entry | None = None


_TOP_LEFT_OUT = ("name", "oid", "summary")  # what a directory's own metadata does not repeat


def encode_directory(entries: list[Entry], top: Entry | None = None, complete: bool = True) -> bytes:
    """A directory object. ``top``: the directory's own metadata, for a snapshot's root.
    ``complete`` False: its entries came from an object whose writer did not record attributes
    and links (a copy of it, ``kdist repo copy``), and it says so too."""
    entries = sorted(entries, key=lambda e: e.name)
    version = max([_needed_version(e) for e in entries] + [DIR_VERSION_LINKS if top is not None and top.xattrs
                                                           else DIR_VERSION])
    doc = {"v": version, "entries": [e.to_wire() for e in entries]}
    if complete:
        doc["x"] = True
    if top is not None:
        doc["self"] = {k: v for k, v in top.to_wire().items() if k not in _TOP_LEFT_OUT}
    return msgpack.packb(doc, use_bin_type=True)


def decode_listing(data: bytes) -> Listing:
    """Decode and validate a directory object (SPEC.md section 7)."""
    try:
        doc = msgpack.unpackb(data, raw=False)
        version = doc.get("v")
        if version not in DIR_VERSIONS:
            raise CorruptionError(f"directory object has unknown version {version!r}")
        entries = [Entry.from_wire(d) for d in doc["entries"]]
        complete, top = doc.get("x", False), doc.get("self")
        if complete is not True and complete is not False:
            raise CorruptionError("directory object is malformed (x)")
        if top is not None:
            if type(top) is not dict or any(k in top for k in _TOP_LEFT_OUT):
                raise CorruptionError("directory object is malformed (self)")
            top = Entry.from_wire({**top, "name": "self"})
            top.name = ""
            if top.type != TYPE_DIR:
                raise CorruptionError("directory object's own metadata is not a directory's")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptionError("directory object is malformed") from exc
    for e in entries + ([top] if top is not None else []):
        if _needed_version(e) > version:
            what = "special entries" if _needed_version(e) == DIR_VERSION_SPECIAL else "extended attributes or links"
            raise CorruptionError(f"directory object of version {version} holds {what}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise CorruptionError("directory object has duplicate entry names")
    return Listing(entries, complete, top)


def decode_directory(data: bytes) -> list[Entry]:
    return decode_listing(data).entries


def read_directory(objects: ObjectStore, oid: str) -> list[Entry]:
    return decode_directory(objects.read_all(oid, holes=False))


def read_listing(objects: ObjectStore, oid: str) -> Listing:
    return decode_listing(objects.read_all(oid, holes=False))


@dataclass
class Source:
    host: str
    user: str
    path: str

    @classmethod
    def local(cls, path: str, host: str = "") -> "Source":
        """``path`` on this machine, as this user; ``host`` overrides the machine's name (a host
        key's host, ``--host``)."""
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry (containers)
            user = "unknown"
        return cls(host or socket.gethostname(), user, path)

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
    stored: float = 0.0  # when its manifest was first stored, on the storage's clock (0: unknown)
    signer: str = ""  # the key id that signed its manifest ("" in a version-1 repository)
    partial: bool = False  # of only the paths a list named (its record's PARTIAL_LABEL; not in the payload)

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
        d.pop("stored")
        d.pop("signer")
        d.pop("partial")
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def from_record(cls, rec: ManifestRecord) -> "Snapshot":
        try:
            d = msgpack.unpackb(rec.payload, raw=False)
            d["source"] = Source(**d["source"])
            snap = cls(**d)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"snapshot manifest {rec.id} is malformed") from exc
        bad = _malformed_snapshot_field(snap)
        if bad:
            raise CorruptionError(f"snapshot manifest {rec.id} is malformed ({bad})")
        snap.id, snap.ts, snap.stored, snap.signer = rec.id, rec.ts, rec.stored, rec.signer
        # the labels are what readers verified (a host key's host label is its own host): where
        # a payload says otherwise, each label there wins, so retention groups the snapshot with
        # its writer's. One by one: a record of a host key that left out its user and path
        # labels must not get its host from its payload (another host's, to push it out of
        # that host's retention)
        lab = rec.labels
        src = snap.source
        snap.source = Source(*(lab[k] if type(lab.get(k)) is str else getattr(src, k) for k in ("host", "user", "path")))
        if type(lab.get("checkpoint")) is str:
            snap.checkpoint = lab["checkpoint"] == "1"
        snap.partial = lab.get(PARTIAL_LABEL) == "1"
        return snap

    @property
    def short_id(self) -> str:
        return self.id[:8]


_JSON_SCALARS = (str, int, float, bool, type(None))
MAX_SNAPSHOT_TIME = 2**37  # seconds: about the year 6300, inside what datetime can show


def _is_time(t) -> bool:
    return type(t) in (int, float) and 0 <= t <= MAX_SNAPSHOT_TIME  # NaN fails the comparison


def _malformed_snapshot_field(snap: Snapshot) -> str:
    """The first field of a decoded snapshot payload of the wrong type, else ``""``: everything
    that lists, restores or collects garbage uses these fields without checking them again."""
    src = snap.source
    if not all(type(x) is str for x in (src.host, src.user, src.path)):
        return "source"
    if type(snap.root) is not str:
        return "root"
    try:
        parse_object_id(snap.root)
    except CorruptionError:
        return "root"
    if not (_is_time(snap.start) and _is_time(snap.end)):
        return "time"
    if type(snap.totals) is not dict or not all(
            type(k) is str and type(v) in (int, float) and math.isfinite(v) for k, v in snap.totals.items()):
        return "totals"
    if type(snap.tags) is not list or not all(type(t) is str for t in snap.tags):
        return "tags"
    if type(snap.errors) is not list or not all(
            type(x) is dict and all(type(k) is str and type(v) in _JSON_SCALARS for k, v in x.items())
            for x in snap.errors):
        return "errors"  # ``snapshot list --json`` prints them as they are
    if type(snap.description) is not str or type(snap.run) is not str or type(snap.checkpoint) is not bool:
        return "description, run or checkpoint"
    return ""


def backup_host(identity, asked: str = "") -> str:
    """The host name a backup is published under: a host key's own host (a host key may not
    publish under another name: readers would refuse it), else ``asked`` ("" = this machine)."""
    if identity.role == HOST:
        if asked and asked != identity.host:
            raise PermissionRefused(f"this host key belongs to host {identity.host!r}; it cannot back up as {asked!r}")
        return identity.host
    return asked


def visible_labels(identity) -> dict:
    """The labels of the snapshots a key lists and restores: a host key sees its own host's."""
    return {"host": identity.host} if identity.role == HOST else {}


@dataclass(frozen=True)
class SnapshotFilter:
    """Which snapshots a command means (``--host``, ``--path``, ``--tag``, restic's semantics):
    any of the hosts, any of the paths, and any of the tag groups, a group being tags that must
    all be there (``--tag a,b``). Empty parts match everything."""

    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    tags: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, hosts=(), paths=(), tags=()) -> "SnapshotFilter":
        groups = tuple(tuple(t for t in group.split(",") if t) for group in tags)
        return cls(tuple(hosts), tuple(p.rstrip("/") or "/" for p in paths), tuple(g for g in groups if g))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.paths or self.tags)

    def matches(self, snap: "Snapshot") -> bool:
        return ((not self.hosts or snap.source.host in self.hosts)
                and (not self.paths or snap.source.path in self.paths)
                and (not self.tags or any(all(t in snap.tags for t in group) for group in self.tags)))

    def select(self, snaps: list["Snapshot"]) -> list["Snapshot"]:
        return [s for s in snaps if self.matches(s)]

    def describe(self) -> str:
        parts = []
        if self.hosts:
            parts.append("host " + " or ".join(self.hosts))
        if self.paths:
            parts.append("path " + " or ".join(self.paths))
        if self.tags:
            parts.append("tags " + " or ".join(",".join(g) for g in self.tags))
        return ", ".join(parts)


def list_snapshots(manifests, include_checkpoints: bool = False, **labels) -> list[Snapshot]:
    """Snapshots, oldest first, with their tags as last edited; checkpoints only when asked."""
    if not include_checkpoints:
        labels["checkpoint"] = "0"
    labels["type"] = SNAPSHOT_LABEL
    records = manifests.find()  # one listing for the snapshots and their tag edits
    return with_tag_edits(records, [Snapshot.from_record(r) for r in records
                                    if all(r.labels.get(k) == v for k, v in labels.items())])


# A tag edit (``snapshot tag``) is a record of its own: labels type=tags, snapshot=<id> and the
# snapshot's host (since format 3 seals edits as it seals snapshots; older edits lack it), payload
# msgpack {"tags": [str, ...]}: that snapshot's tags from then on (the newest edit wins). The
# snapshot's record, its id and its storage time stay as they were (retention and fleet status
# judge it by them). Only admin and maintenance keys write edits: readers leave out a host key's
# record of any type but snapshot and failure (SPEC.md section 8), so a host cannot retag.
TAGS_LABEL = "tags"


def tag_edits(records) -> dict[str, tuple[list[str], list[str]]]:
    """Per snapshot id: its tags as last edited, and the ids of every edit of them, from
    ``records`` (live records oldest first, ``ManifestStore.find``)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:  # oldest first: the last one read wins
        if r.labels.get("type") != TAGS_LABEL:
            continue
        target = r.labels.get("snapshot")
        try:
            tags = msgpack.unpackb(r.payload, raw=False)["tags"]
        except (ValueError, KeyError, TypeError):
            continue
        if type(target) is not str or type(tags) is not list or not all(type(t) is str for t in tags):
            continue  # an edit of another shape says nothing
        ids = out.get(target, ([], []))[1] + [r.id]
        out[target] = (tags, ids)
    return out


def with_tag_edits(records, snaps: list[Snapshot]) -> list[Snapshot]:
    edits = tag_edits(records)
    for s in snaps:
        if s.id in edits:
            s.tags = list(edits[s.id][0])
    return snaps


def edit_tags(manifests, snaps: list[Snapshot], add=(), remove=(), set_: list[str] | None = None) -> list[Snapshot]:
    """Give each snapshot its tags with ``add`` added and ``remove`` removed, or ``set_`` as
    they are; returns those whose tags changed (and writes only for them: one record each, and
    tombstones for its older edits)."""
    edits = tag_edits(manifests.find(type=TAGS_LABEL))
    changed = []
    for s in snaps:
        old = list(s.tags)
        new = list(dict.fromkeys(set_)) if set_ is not None else \
            [t for t in dict.fromkeys(old + list(add)) if t not in remove]
        if new == old:
            continue
        # (the host label: format 3 seals the edit to that host and the readers, as its snapshot)
        manifests.put({"type": TAGS_LABEL, "snapshot": s.id, "host": s.source.host},
                      msgpack.packb({"tags": new}, use_bin_type=True))
        manifests.delete(edits.get(s.id, ([], []))[1])
        s.tags = new
        changed.append(s)
    return changed


GROUP_FIELDS = ("host", "user", "path", "tags")
DEFAULT_GROUP_BY = ("host", "user", "path")


def group_key(snap: Snapshot, group_by: tuple[str, ...]) -> tuple:
    """The group a snapshot's retention is decided in: its values of ``group_by``, and whether
    it is partial. A snapshot of only the paths a list named (``--files-from``) is kept apart
    from its source's whole snapshots, as restic's are (their paths differ): counted with them,
    a few partial ones would push the last whole snapshot out of keep-last, and with it every
    file the lists did not name."""
    values = {"host": snap.source.host, "user": snap.source.user, "path": snap.source.path,
              "tags": ",".join(sorted(snap.tags))}
    return tuple(values[f] for f in group_by) + (("partial",) if snap.partial else ())


@dataclass
class ForgetPlan:
    """What ``forget`` would do: ``keep`` (with ``reasons`` by id) and ``forget`` among the
    snapshots the filter selected, and ``checkpoints`` of dead backups to forget too."""

    keep: list = field(default_factory=list)
    forget: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)


def plan_forget(manifests, policy, where: SnapshotFilter = SnapshotFilter(),
                group_by: tuple[str, ...] = DEFAULT_GROUP_BY) -> ForgetPlan:
    """Apply a retention policy to the snapshots ``where`` selects, per group (``group_by``: by
    default host, user and path; a source's snapshots), on storage-bounded times
    (``kdist.retention.storage_bounded_time``). Snapshots outside the filter are not touched."""
    from kdist.retention import apply_policy, group_by_source, storage_bounded_time

    bad = [f for f in group_by if f not in GROUP_FIELDS]
    if bad or not group_by:
        raise ValueError(f"--group-by takes a comma-separated list of {', '.join(GROUP_FIELDS)}, not {bad or '(none)'}")

    def time_of(s: Snapshot) -> float:
        return storage_bounded_time(s, manifests.signer_role(s.signer) in (ADMIN, MAINTENANCE))

    plan = ForgetPlan()
    snaps = where.select(list_snapshots(manifests))
    for _group, members in group_by_source(snaps, key=lambda s: group_key(s, tuple(group_by))).items():
        decision = apply_policy(members, policy, time_of=time_of)
        plan.keep += decision.keep
        plan.forget += decision.forget
        plan.reasons.update(decision.reasons)
    return plan


def dead_checkpoints(repo, where: SnapshotFilter = SnapshotFilter(), dry_run: bool = False,
                     forgotten: frozenset = frozenset()) -> list[Snapshot]:
    """The checkpoints, among those ``where`` selects, of backups that died and that a later
    snapshot of their source supersedes: exactly what maintenance forgets (``gc/checkpoints.py``,
    on the storage's clock), for ``forget`` to remove now. A dry run writes nothing, not even the
    probe that reads the storage's clock: it takes the newest blob's time instead, which is no
    later than now (so it may show fewer, never more). ``forgotten``: snapshots forgotten with
    them, which supersede nothing (the checkpoint may then be its source's newest copy)."""
    from kdist.gc.checkpoints import plan_checkpoints
    from repo_format import constants as C
    from repo_format.safety import safety_of
    from repo_format.session import storage_now

    if dry_run:
        now = max((m.timestamp for prefix in (C.MANIFEST_PREFIX, C.SESSION_PREFIX)
                   for m in repo.storage.list(prefix)), default=0.0)
    else:
        now = storage_now(repo.storage, repo.session)
    plan = plan_checkpoints(repo.manifests, repo.storage, now, safety_of(repo.parameters), gone=forgotten)
    return [s for s in map(Snapshot.from_record, plan.forget) if where.matches(s)]


PARTIAL_LABEL = "partial"  # "1" on a snapshot of only some paths of its source (--files-from)


def previous_root(manifests, source: Source, partial: bool = False) -> str | None:
    """The root of the newest complete snapshot of ``source`` (host, user and path): what a new
    backup of it compares its files with, to reuse the unchanged ones. A backup of the whole
    source (``partial`` False) compares with the newest snapshot of the whole source if there
    is one: a --files-from snapshot holds only some of its files."""
    records = manifests.find(type=SNAPSHOT_LABEL, checkpoint="0", host=source.host, user=source.user,
                             path=source.path)
    if not records:
        return None
    whole = [r for r in records if r.labels.get(PARTIAL_LABEL) != "1"]
    return Snapshot.from_record(records[-1] if partial or not whole else whole[-1]).root


class SnapshotNotFound(KdistError):
    """No snapshot matches, or a prefix matches more than one."""


def resolve_snapshot(manifests, ref: str, source_path: str | None = None, *,
                     where: SnapshotFilter = SnapshotFilter(), **labels) -> Snapshot:
    """Find a snapshot by unique id prefix or ``latest``: the newest complete snapshot among
    those ``where`` selects (restic: with ``--host`` and ``--path`` it is that host's and path's
    latest, not the fleet's). Only snapshots whose labels include ``labels`` are looked at (a host
    key sees its own host's). An id prefix must name a snapshot ``where`` selects too: a command
    given an id and a filter it does not match refuses rather than act on another snapshot than
    meant (``restore ID --path sub`` restored the whole snapshot once ``--path`` became a filter)."""
    if source_path is not None:
        where = replace(where, paths=where.paths + (source_path,))
    snaps = list_snapshots(manifests, include_checkpoints=True, **labels)
    if ref == "latest":
        finals = [s for s in where.select(snaps) if not s.checkpoint]
        if not finals:
            raise SnapshotNotFound("the repository has no snapshots" + (f" of {where.describe()}" if where else ""))
        return max(finals, key=lambda s: (s.end, s.ts))
    matches = [s for s in snaps if s.id.startswith(ref.lower())] if ref else []
    if not matches:
        raise SnapshotNotFound(f"no snapshot with id {ref!r}")
    if len(matches) > 1:
        raise SnapshotNotFound(f"snapshot id {ref!r} is ambiguous ({len(matches)} snapshots match); give more characters")
    if where and not where.matches(matches[0]):
        snap = matches[0]
        raise SnapshotNotFound(f"snapshot {snap.short_id} is of {snap.source.host}:{snap.source.path}, not of "
                               f"{where.describe()} (a path inside a snapshot is --include for restore, an argument "
                               "for ls and cat)")
    return matches[0]
