"""``kdist repo copy``: snapshots of one repository copied, with their data, into another (a
3-2-1 off-site copy).

Each snapshot is copied as a backup of its own source is written: the files' bytes are read
from the source (every content authenticated there), cut by the destination's chunker and stored
under the destination's keys, so they deduplicate against what the destination holds already
(its own backups of the same files too); directories are written again with the same entries and
metadata; the copy is published with the original's times, totals, tags and description, signed
by the destination's key, and labelled ``original`` (the source repository's id and the
snapshot's). Checkpoints, session markers and revalidation before publishing are the uploader's
(``SnapshotCopier`` is an ``Uploader``), so the destination's maintenance may run meanwhile; the
source is only read, so its maintenance may too (a snapshot forgotten there meanwhile fails to
copy, and is reported). A copy run again skips what was copied (resumable: a run stopped midway
copied whole snapshots, and what it uploaded of the next is found again by deduplication).
Within one run, files and directories unchanged since a snapshot copied before are referred to,
not read again (``memo``: source object id -> destination object id).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from repo_format.errors import CorruptionError, KdistError, is_outage
from repo_format.objects import parse_object_id
from repo_format.repository import Repository

from kdist.snapshot import (
    MAX_TREE_DEPTH, PARTIAL_LABEL, SNAPSHOT_LABEL, TYPE_DIR, TYPE_FILE, Entry, Snapshot, read_listing,
)
from kdist.uploader import BackupOptions, DirNode, Uploader

ORIGINAL_LABEL = "original"


def original_key(source: Repository, snap: Snapshot) -> str:
    """The ``original`` label of a copy of ``snap``: which repository, which snapshot."""
    return f"{source.format.unique_id.hex()}:{snap.id}"


def copied_already(destination: Repository) -> set[tuple]:
    """The finished copies the destination holds: (``original`` label, host, user, path). A
    copy counts for a snapshot only with the snapshot's own source: a host key publishes only as
    its own host, so a compromised host cannot claim another host's snapshots copied (and keep
    them out of the off-site copy)."""
    return {(r.labels[ORIGINAL_LABEL], r.labels.get("host"), r.labels.get("user"), r.labels.get("path"))
            for r in destination.manifests.find(type=SNAPSHOT_LABEL, checkpoint="0")
            if isinstance(r.labels.get(ORIGINAL_LABEL), str)}


def copy_of(source: Repository, snap: Snapshot) -> tuple:
    """What ``copied_already`` holds once ``snap`` is copied."""
    return original_key(source, snap), snap.source.host, snap.source.user, snap.source.path


@dataclass
class CopyReport:
    copied: list = field(default_factory=list)  # [(source id, copy id)]
    skipped: list = field(default_factory=list)  # source ids copied before
    failed: list = field(default_factory=list)  # [(source id, error)]
    bytes_read: int = 0  # file bytes read from the source (unchanged files referred to are not)
    new_bytes: int = 0  # bytes the destination stored (after deduplication)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class CopyMemo:
    """Source object id -> destination object id, for the files and directories of the
    snapshots copied in one run (shared by the copier's threads). Keyed by the host too where
    the destination seals each host's trees under its own key (format 3): another host's
    copy of an object would carry that host's chunk lists and directory objects."""

    def __init__(self):
        self._map: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, host: str, oid: str) -> str | None:
        with self._lock:
            return self._map.get((host, oid))

    def put(self, host: str, oid: str, copy: str) -> None:
        with self._lock:
            self._map[(host, oid)] = copy


class SnapshotCopier(Uploader):
    """Writes one snapshot of another repository into this one (``copy``)."""

    def __init__(self, destination: Repository, source: Repository, memo: CopyMemo, progress=None):
        super().__init__(destination, BackupOptions(), progress)
        self.source = source
        self.memo = memo
        self._source_oid: dict[int, str] = {}  # id(DirNode) -> the source directory object

    def copy(self, snap: Snapshot) -> Snapshot:
        self._begin(snap.source, 0)  # (a host key copies only its own host's snapshots)
        self._memo_host = snap.source.host if self.repo.format.payload_keys is not None else ""
        self._start = snap.start
        listing = read_listing(self.source.objects, snap.root)
        top = listing.top
        self._root = DirNode(replace(top, oid="", summary={}) if top is not None else Entry("", TYPE_DIR, mode=0o755),
                             top=top is not None, complete=listing.complete)
        self._source_oid[id(self._root)] = snap.root
        self._run(lambda: self._copy_tree(self._root, listing.entries))
        root_entry = self._write_tree(self._root, final=True)
        self._remember(self._root)
        labels = {ORIGINAL_LABEL: original_key(self.source, snap), **({PARTIAL_LABEL: "1"} if snap.partial else {})}
        copy = self._publish(root_entry, checkpoint=False, original=snap, extra_labels=labels)
        if self._checkpoint_ids:
            self.repo.manifests.delete(self._checkpoint_ids)  # the copy supersedes them
        return copy

    def _copy_tree(self, root: DirNode, entries: list[Entry]) -> None:
        """Every entry under ``root`` (one stack: a deep tree cannot exhaust the interpreter's):
        directories and files copied before are referred to, the others copied."""
        stack = [(root, entries, 0)]
        while stack:
            node, entries, depth = stack.pop()
            for e in entries:
                if e.type == TYPE_DIR:
                    done = self._reusable(e.oid)
                    if done is not None:
                        node.children.append(replace(e, oid=done))
                        continue
                    if depth + 1 > MAX_TREE_DEPTH:
                        raise CorruptionError(f"directory nesting deeper than {MAX_TREE_DEPTH}: not copied")
                    listing = read_listing(self.source.objects, e.oid)
                    child = DirNode(replace(e, oid="", summary={}), complete=listing.complete)
                    self._source_oid[id(child)] = e.oid
                    node.children.append(child)
                    stack.append((child, listing.entries, depth + 1))
                elif e.type == TYPE_FILE and e.oid:
                    done = self._reusable(e.oid)
                    if done is not None:
                        node.children.append(replace(e, oid=done))
                        with self._lock:
                            self.stats.files_reused += 1
                    else:
                        node.children.append(self._submit(self._copy_file, e))
                else:  # symlinks and special files: nothing to copy but the entry
                    node.children.append(replace(e))
            self._maybe_checkpoint()

    def _reusable(self, oid: str) -> str | None:
        """The destination's copy of source object ``oid``, if this run made one and its content
        is still there. Noted as referenced: revalidated before publishing, as a backup's
        unchanged files are, which is what keeps a copy from naming a content the destination's
        maintenance collected meanwhile; the look-up only spares a copy that would then fail."""
        copy = self.memo.get(self._memo_host, oid)
        if copy is None:
            return None
        cid = parse_object_id(copy)[1]
        if not self.repo.contents.contains(cid):
            return None
        self.repo.contents.note_reference(cid)
        return copy

    def _copy_file(self, e: Entry) -> Entry:
        try:
            oid, length = self._objects.copy_from(self.source.objects, e.oid, on_chunk=self._count_read)
        except KdistError as exc:
            if is_outage(exc):
                raise
            raise CorruptionError(f"cannot copy file {e.name!r}: {exc}") from None
        if length != e.size:
            raise CorruptionError(f"file {e.name!r} has {length} bytes in the source, its entry says {e.size}")
        self.memo.put(self._memo_host, e.oid, oid)
        with self._lock:
            self.stats.files_read += 1
        return replace(e, oid=oid)

    def _remember(self, root: DirNode) -> None:
        """Note each directory written (source object -> its copy) for the snapshots after."""
        stack = [root]
        while stack:
            node = stack.pop()
            if node is not root:
                self.memo.put(self._memo_host, self._source_oid[id(node)], node.entry.oid)
            stack.extend(c for c in node.children if isinstance(c, DirNode))


def copy_snapshots(source: Repository, destination: Repository, snaps: list[Snapshot],
                   progress=None) -> CopyReport:
    """Copy ``snaps`` (oldest first) that the destination does not hold yet. A snapshot that
    cannot be copied (damaged or forgotten in the source) is reported and the others go on; the
    storage failing stops the run."""
    report = CopyReport()
    done = copied_already(destination)
    memo = CopyMemo()
    base = destination.contents.stats.bytes_original
    for snap in sorted(snaps, key=lambda s: (s.end, s.id)):
        if copy_of(source, snap) in done:
            report.skipped.append(snap.id)
            continue
        if snap.checkpoint:  # a part of a backup that never finished: not a snapshot to copy
            report.failed.append((snap.id, "a checkpoint of a backup that did not finish: not copied"))
            continue
        copier = SnapshotCopier(destination, source, memo, progress)
        try:
            copy = copier.copy(snap)
        except KdistError as exc:
            if is_outage(exc):
                raise
            report.failed.append((snap.id, str(exc)))
            continue
        finally:
            report.bytes_read += copier.stats.bytes_read
        report.copied.append((snap.id, copy.id))
        done.add(copy_of(source, snap))
    report.new_bytes = destination.contents.stats.bytes_original - base
    return report
