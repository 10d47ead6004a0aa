"""``kdist repo repair``: put back what snapshots need and the repository lacks; delete no data.

Steps, each decided from a fresh check (``kdist.check``) of the repository's structure:
1. Index entries, from the packs' own local indexes (``repo_format.index_rebuild``, as ``kdist
   index rebuild``), when a snapshot reaches a content it cannot read: one entry for each content
   the index lacks, and one for each content whose winning entry points into a missing or too
   short pack while another pack holds it (timestamped after that winner, so it wins).
2. Contents a snapshot reaches that are marked deleted are undeleted, as content GC would.
   Then each raw index blob the check could not open, and that still fails authentication or
   decoding when fetched again, is deleted: it stops maintenance, and what it may have held
   the packs hold (step 1 runs whenever there is one), or is a mark or an undelete (step 2).
3. With a source tree (the original files): each file is chunked and hashed with the
   repository's own chunker and keyed hash, so unchanged bytes give the ids the backup gave;
   a first pass finds which files hold still-missing contents (chunks or chunk lists), a second
   writes those contents again, into new packs, then one index blob (packs first). A lost
   content's live entry is first superseded by a deleted one, so the writer does not
   deduplicate against the lost copy and its new entry wins.
Directory objects cannot be rebuilt from a source tree; they stay reported. Nothing else is
deleted and no pack is rewritten. A dry run reads only.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace

from repo_format import clock
from repo_format import constants as C
from repo_format.errors import BlobNotFound, CorruptionError, UnsupportedVersion
from repo_format.format_blob import FormatBlob
from repo_format.index import open_index, stamp_after
from repo_format.index_rebuild import entries_from_packs, entries_to_write
from repo_format.objects import ObjectStore
from repo_format.repository import Repository, new_session_id
from repo_format.storage.base import BlobStorage, delete_unless_locked

from kdist.check import Checker, CheckReport


@dataclass
class RepairReport:
    dry_run: bool
    before: CheckReport
    after: CheckReport | None = None  # the check after repairing (None in a dry run)
    packs_read: int = 0
    damaged_packs: dict[str, str] = field(default_factory=dict)
    entries_rebuilt: int = 0  # entries written for contents the index lacked
    entries_repointed: int = 0  # entries written for contents whose pack is gone, found in another
    undeleted: int = 0
    source_files: int = 0
    source_errors: list[str] = field(default_factory=list)
    reuploaded: int = 0
    reuploaded_bytes: int = 0
    still_missing: int = 0  # contents snapshots reach that are still unreadable
    # raw index blobs that do not open (a host's junk, or damage), deleted once their entries
    # were rebuilt from the packs: until then they stop maintenance
    unreadable_index_blobs_deleted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what this repair could not try, and why

    @property
    def healthy(self) -> bool:
        return (self.after or self.before).healthy

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("before", "after")}
        d.update(healthy=self.healthy, before=self.before.as_dict(), after=self.after and self.after.as_dict())
        return d


class _SourceSink:
    """Stands in for the content store under ``ObjectStore`` while a source file is chunked: it
    identifies every content (chunks and chunk lists: ``repo_format.records``) and writes only
    wanted ones to ``store``, or, without a store, only notes that the file holds them.
    ``identify``: data -> its reference, whose first bytes are the content id."""

    def __init__(self, identify, wanted: set[bytes], store: ContentStore | None, trees=(), level: int = 0):
        self._identify = identify
        self._level = level  # (zstd: the record, hence a tree codec's id, depends on it)
        self._wanted = wanted
        self._store = store
        self._trees = trees  # format 3: each host's tree codec (chunk lists converge per host)
        self.found: set[bytes] = set()
        self.bytes = 0

    def write(self, data, metadata: bool = False, known=None, records=None) -> bytes:
        ref, records = self._identify(data), None
        for codec in self._trees if metadata else ():  # the host whose chunk list is wanted, if any
            tree_ref = codec.identify(data, self._level)[0]
            if tree_ref[:C.CONTENT_ID_SIZE] in self._wanted:
                ref, records = tree_ref, codec
                break
        cid = ref[:C.CONTENT_ID_SIZE]
        if cid in self._wanted and cid not in self.found:
            self.found.add(cid)
            if self._store is not None:
                self._store.write(data, metadata=metadata, records=records)
                self.bytes += len(data)
        return ref


def _source_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path
            except OSError:
                continue


def _chunk(path: str, objects: ObjectStore, report: RepairReport) -> bool:
    try:
        with open(path, "rb", buffering=0) as f:
            objects.write_file(f)  # as the backup stored it: a sparse file's holes as holes
        return True
    except OSError as exc:
        report.source_errors.append(f"{path}: {exc.strerror}")
        return False


def _unreadable_raw_blobs(report: CheckReport) -> list[str]:
    """The raw index blobs the check could not open."""
    return [name for p in report.problems if p.kind == "index-blob"
            and (name := p.where.get("blob", "")).startswith(C.INDEX_PREFIX)]


class Repairer:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, dry_run: bool = False):
        self.storage = storage
        self.fmt = fmt
        self.dry_run = dry_run
        self.session = new_session_id()
        self.epochs = Repository(storage, fmt, self.session, heartbeat_thread=False).contents.epochs

    def run(self, source: str | None = None) -> RepairReport:
        checker = Checker(self.storage, self.fmt)
        report = RepairReport(self.dry_run, checker.run())
        # a winner whose pack is missing is repointed too when readers find another place; and
        # before a raw blob that does not open is deleted, whatever it may have indexed is
        # indexed again from the packs (a snapshot published after the check may need it)
        unreadable = _unreadable_raw_blobs(report.before)
        rebuild = report.before.missing or report.before.unplaced or unreadable
        overlay = self._rebuild(checker, report) if rebuild else []
        if overlay:  # what the rebuilt directories hold is only known after a new walk
            checker = Checker(self.storage, self.fmt, overlay)
            checker.run()
        self._undelete(checker, report)
        self._delete_unreadable_raw_blobs(report, unreadable)
        wanted = set(checker.report.missing)
        if source is not None and wanted:
            self._reupload(checker, source, wanted, report)
        report.still_missing = len(wanted)
        if not self.dry_run:
            report.after = Checker(self.storage, self.fmt).run()
            report.still_missing = len(report.after.missing)
        return report

    def _write_index(self, entries) -> None:
        if entries and not self.dry_run:
            self.epochs.write_index(entries)

    def _rebuild(self, checker: Checker, report: RepairReport) -> list:
        result = entries_from_packs(self.storage, self.fmt)
        report.packs_read, report.damaged_packs = result.packs_read, result.damaged_packs
        entries = entries_to_write(result.entries, checker.index, int(clock.now() * 1e6),
                                   unusable=lambda e: checker.unusable(e) is not None)
        report.entries_repointed = sum(checker.index.lookup(e.content_id) is not None for e in entries)
        report.entries_rebuilt = len(entries) - report.entries_repointed
        self._write_index(entries)
        return entries

    def _undelete(self, checker: Checker, report: RepairReport) -> None:
        """Undelete what snapshots reach, re-validated against a fresh index (only entries that
        are still the winners), as content GC does."""
        marked = checker.report.deleted_referenced
        if not marked:
            return
        fresh = Checker(self.storage, self.fmt).load_index() if not self.dry_run else checker.index
        revive = [replace(self._usable_place(checker, fresh, e), deleted=False, timestamp_us=stamp_after(e.timestamp_us))
                  for e in marked.values() if fresh.lookup(e.content_id) == e]
        self._write_index(revive)
        report.undeleted = len(revive)

    def _delete_unreadable_raw_blobs(self, report: RepairReport, names: list[str]) -> None:
        """Delete each raw index blob the check could not open, fetched again now and still
        failing authentication or decoding (not a transient read error). A version this kdist
        does not know counts as junk too: a new index encoding comes with a new format version
        (SPEC section 6), which this kdist would have refused as a whole. What such a
        blob held is what the packs hold (rebuilt above), marks (garbage
        kept longer) or undeletes (a content a snapshot reaches is undeleted above, and one a
        running backup refers to by that backup's next reload)."""
        aead = self.fmt.keys.index_aead()
        for name in names:
            try:
                open_index(aead, name, self.storage.get(name))
                continue  # it opens now: the check's read failed on the way
            except BlobNotFound:
                continue
            except (CorruptionError, UnsupportedVersion):
                pass
            if self.dry_run or delete_unless_locked(self.storage, name):
                report.unreadable_index_blobs_deleted.append(name)

    @staticmethod
    def _usable_place(checker: Checker, fresh, e):
        """Where an undelete of ``e`` should point: its own place, or when that cannot be there (a
        forged mark into a missing pack) the best other place of the fresh index whose record is
        there (read and authenticated), as readers would read."""
        if checker.unusable(e) is None:
            return e
        return next((o for o in fresh.locations(e.content_id)
                     if checker.unusable(o) is None and checker.contents.reader.authentic_one(o)), e)

    def _reupload(self, checker: Checker, source: str, wanted: set[bytes], report: RepairReport) -> None:
        records, level, splitter = checker.contents.records, self.fmt.parameters.zstd_level, checker.objects.splitter

        def identify(data) -> bytes:
            return records.identify(data, level)[0]

        keys = self.fmt.payload_keys  # format 3: chunk lists converge under their host's tree key
        # (every generation: chunk lists written before a host's key was replaced too)
        tree_keys = [keys.tree_key(h, g) for h in checker.hosts if "\x00" not in h  # (format 3 has no keys for one)
                     for g in range(checker.repo.manifests.host_generation(h) + 1)] if keys is not None else []
        trees = [records.for_trees(k) for k in tree_keys if k is not None]
        if len(trees) < len(tree_keys):
            report.notes.append("this key holds no tree key of the snapshots' hosts: a lost chunk list of a large "
                                "file cannot be rebuilt from the source (repair with an admin key)")
        finder = _SourceSink(identify, wanted, None, trees, level)
        holders = []
        for path in _source_files(source):
            report.source_files += 1
            seen = len(finder.found)
            if _chunk(path, ObjectStore(finder, splitter), report) and len(finder.found) > seen:
                holders.append(path)
        if self.dry_run or not finder.found:
            report.reuploaded = len(finder.found)
            wanted -= finder.found
            return
        # a lost copy's live entry would make the writer deduplicate against it: supersede it
        lost = [checker.index.lookup(c) for c in finder.found]
        marks = [replace(e, deleted=True, timestamp_us=stamp_after(e.timestamp_us)) for e in lost if e and not e.deleted]
        self._write_index(marks)
        checker.index.add_entries(marks)
        store = Repository(self.storage, self.fmt, self.session, committed=checker.index).contents
        writer = _SourceSink(identify, finder.found, store, trees, level)
        try:
            for path in holders:
                _chunk(path, ObjectStore(writer, splitter), report)
        finally:
            store.close()  # packs, then the index blob naming them; retires the session
        report.reuploaded, report.reuploaded_bytes = len(writer.found), writer.bytes
        wanted -= writer.found


def repair_repository(storage: BlobStorage, fmt: FormatBlob, source: str | None = None,
                      dry_run: bool = False) -> RepairReport:
    return Repairer(storage, fmt, dry_run).run(source)
