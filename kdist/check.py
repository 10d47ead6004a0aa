"""``kdist repo check``: find everything wrong with a repository, without stopping or writing.

Structure: the index is assembled from its epochs blob by blob (a damaged blob is reported, the
others are used) and every set that assembly would need is checked complete; every winning live
entry must point into a listed pack, inside it; every manifest blob must open and every snapshot
and checkpoint it holds must parse and its tree resolve: every directory object readable, every
content a file refers to in the index, live, in an existing pack. With ``read_data`` every
content of a seeded sample of the packs is fetched and authenticated, and those packs' own local
indexes compared with the index. Manifests are listed before the index and packs after it, so a
backup publishing meanwhile is never reported as damaged.

Memory grows with the index (its winners, pack names, ids already checked), never with data
size. This module only reads; the CLI gives it a read-only storage.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import blake3

from repo_format import constants as C
from repo_format import changing, clock
from repo_format.epoch import EpochView
from repo_format.errors import BlobNotFound, ContentNotFound, CorruptionError, KdistError, is_outage
from repo_format.format_blob import FormatBlob
from repo_format.index import IndexEntry, MergedIndex, open_index, place_of
from repo_format.index_rebuild import entries_from_packs
from repo_format.io_pool import parallel_map
from repo_format.manifest import newer
from repo_format.objects import ObjectStore, Splitter
from repo_format.repository import Repository
from repo_format.safety import safety_of
from repo_format.storage.base import BlobStorage

from kdist.snapshot import SNAPSHOT_LABEL, TYPE_FILE, Entry, Snapshot, decode_directory
from kdist.tree import Directory, TreeWalker, object_contents

NO_SESSION = "0" * 2 * C.SESSION_ID_BYTES  # a reader: it never writes anything in a session
READ_THREADS = 4


@dataclass
class Problem:
    kind: str  # index-blob, index-set, index-entry, epoch-marker, pack, manifest, snapshot, directory, file,
    # content, pack-index, forgery
    message: str
    where: dict = field(default_factory=dict)  # snapshot, path, content, pack, offset, blob

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, **self.where}


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational: not damage
    unreferenced_packs: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("index_blobs", "index_entries", "packs", "manifest_blobs", "snapshots", "checkpoints", "directories",
         "files", "packs_read", "contents_read", "bytes_read"), 0))
    read_data: dict | None = None  # {"percent", "seed"} when contents were read
    # for repair: contents snapshots reach that cannot be read, and reached ones marked deleted
    missing: set[bytes] = field(default_factory=set)
    deleted_referenced: dict[bytes, IndexEntry] = field(default_factory=dict)
    # reached contents whose winning entry points where the record is not (readers use another
    # place); ``unplaced``: those of them whose winner cannot even be there (a missing pack, past
    # its end), which a rebuild from the packs repoints
    misplaced: set[bytes] = field(default_factory=set)
    unplaced: set[bytes] = field(default_factory=set)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        c = self.counts
        text = (f"checked {c['index_entries']} index entries in {c['index_blobs']} index blobs, {c['packs']} packs "
                f"({len(self.unreferenced_packs)} unreferenced), {c['manifest_blobs']} manifest blobs, "
                f"{c['snapshots']} snapshots and {c['checkpoints']} checkpoints ({c['directories']} directories, "
                f"{c['files']} files)")
        if self.read_data is not None:
            text += f"; read {c['contents_read']} contents ({c['bytes_read']} bytes) from {c['packs_read']} packs"
        return text + f": {len(self.problems)} problem(s)"

    def as_dict(self) -> dict:
        return {"healthy": self.healthy, "problems": [p.as_dict() for p in self.problems], "counts": self.counts,
                "unreferenced_packs": self.unreferenced_packs, "notes": self.notes, "read_data": self.read_data}


def shown(path: str) -> str:
    """A path as it can be printed: undecodable bytes and control characters escaped."""
    return path if path.isprintable() else repr(path)[1:-1]


def _naming(what: str, error) -> str:
    """An error's message, prefixed with what could not be read unless it says so already."""
    text = str(error)
    return text if what.rsplit(" ", 1)[-1] in text else f"{what} cannot be read: {text}"


class _IndexedReader:
    """The reading half of a content store over one fixed index, for ``ObjectStore``: it never
    reloads the index and never writes; a content it cannot reach raises with the reason."""

    def __init__(self, checker: "Checker"):
        self._checker = checker
        self.records = checker.contents.records

    def lookup(self, content_id: bytes) -> IndexEntry | None:
        return self._checker.index.lookup(content_id[:C.CONTENT_ID_SIZE])

    def matches(self, ref: bytes, data) -> bool:
        return self.records.matches(ref, data)

    def read(self, ref: bytes) -> bytes:
        """As readers read: the winner's record, else the content's other places in the index
        (``ContentReader.read``); a winner whose record is elsewhere is named as a forgery."""
        checker = self._checker
        content_id = ref[:C.CONTENT_ID_SIZE]
        entry, reason = checker.locate(content_id)
        if entry is None:
            raise ContentNotFound(f"content {content_id.hex()} {reason}")
        try:
            if reason is not None:
                raise ContentNotFound(f"content {content_id.hex()} {reason}")
            return checker.contents.read_entry(entry, ref)
        except (ContentNotFound, CorruptionError, BlobNotFound) as first:
            for other in checker.index.locations(content_id):
                if place_of(other) == place_of(entry) or checker.unusable(other) is not None:
                    continue
                try:
                    data = checker.contents.read_entry(other, ref)
                except (CorruptionError, BlobNotFound):
                    continue
                checker.misplaced(entry, other)
                return data
            raise first


class Checker:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, overlay: list[IndexEntry] = ()):
        self.storage = storage
        self.fmt = fmt
        self.overlay = list(overlay)  # entries just written (or, in a dry run, that would be)
        self.report = CheckReport()
        self.index = MergedIndex()
        self.packs: dict[str, int] = {}  # name -> size, from the listing
        # the repository's own stores, over the index this check assembles (``load_index``)
        self.repo = Repository(storage, fmt, NO_SESSION, heartbeat_thread=False, committed=self.index)
        self.epochs = self.repo.contents.epochs
        self.contents = self.repo.contents
        p = fmt.parameters
        self.objects = ObjectStore(_IndexedReader(self), Splitter(p.chunk_avg, p.chunk_min, p.chunk_max,
                                                                  fmt.keys.chunker_seed()))
        self._walker = TreeWalker(self._read_directory, max_depth=None, errors="report")
        self._walking: tuple = ()  # (label, snapshot) of the tree being walked, for the reader's reports
        self._dir_oids: list[str] = []
        self._damaged_dirs: dict[str, str] = {}  # directory oid -> where its subtree's problems were reported
        self._files: dict[str, tuple[int, list[tuple[bytes, str]]]] = {}  # oid -> (contents, unreadable ones)
        # format 3: the references the walk met, by content id, so that reading data opens each
        # record with them (certifying a record does not show that a reference's seed opens it)
        self._refs: dict[bytes, set[bytes]] | None = {} if self.contents.records.ref_size != C.CONTENT_ID_SIZE else None
        self.hosts: list[str] = []  # the hosts of the snapshots ``run`` read

    def run(self, read_data: float | None = None, seed: int | None = None) -> CheckReport:
        snapshots = self.read_snapshots()
        self.hosts = sorted({s.source.host for s in snapshots})  # (repair: format 3's tree keys)
        self.load_index()
        self.packs = {m.name: m.length for prefix in C.PACK_PREFIXES for m in self.storage.list(prefix)}
        self.report.counts["packs"] = len(self.packs)
        live_packs = self._check_entries()
        for snap in snapshots:
            self._check_tree(snap)
        if self.report.missing and self.report.unreferenced_packs:
            self.report.notes.append(f"{len(self.report.unreferenced_packs)} pack(s) have no index entry; "
                                     "`kdist repo repair` rebuilds entries from the packs' own indexes")
        if read_data is not None:
            self._read_data(live_packs, read_data, seed)
        return self.report

    def _problem(self, kind: str, message: str, **where) -> None:
        self.report.problems.append(Problem(kind, message, {k: v for k, v in where.items() if v is not None}))

    # ---- index -----------------------------------------------------------------------------
    def load_index(self) -> MergedIndex:
        """Assemble the index as readers do, but keep going past a damaged blob (reported)."""
        for _ in changing.attempts("the index blobs"):
            view = self.epochs.refresh()
            names = view.assembly()
            digests = view.digests()
            results = parallel_map(lambda n: self._open_index_blob(n, digests.get(n)), names)
            if not any(isinstance(r, BlobNotFound) for r in results):
                break  # else superseded and cleaned up after our listing: list again
        blobs = []
        for name, r in zip(names, results):
            if isinstance(r, KdistError):
                self._problem("index-blob", _naming(f"index blob {name}", r), blob=name)
            else:
                blobs.append(r)
        self.index = MergedIndex(blobs)
        self.index.add_entries(self.overlay)
        self.report.counts["index_blobs"] = len(names)
        self._check_sets(view)
        return self.index

    def _open_index_blob(self, name: str, digest: bytes | None):
        try:
            sealed = self.storage.get(name)
            if digest is not None and blake3.blake3(sealed).digest() != digest:
                raise CorruptionError("is not the blob its set's signature names (written by someone other "
                                      "than maintenance)")
            return open_index(self.fmt.keys.index_aead(), name, sealed)
        except KdistError as exc:
            return exc

    def _check_sets(self, view: EpochView) -> None:
        """An incomplete set is a problem only when nothing else holds its epochs' entries (an
        interrupted compaction leaves one beside its sources: ignored, cleaned up later)."""
        best = view.best_range()
        first = best.epoch + 1 if best else 0

        def unheld(epoch: int) -> bool:
            return view.complete_set(C.COMPACTED_PREFIX, epoch) is None and not view.raw.get(epoch)

        for (kind, epoch), sets in sorted(view.sets.items()):
            for s in sets:
                if s.complete:
                    continue
                name = f"{kind}{epoch}_{s.set_id}"
                covers = [epoch] if kind == C.COMPACTED_PREFIX else list(range(first, epoch + 1))
                if epoch >= first and covers and all(unheld(e) for e in covers):
                    self._problem("index-set", f"index set {name} has {len(s.members)} of its {s.count} members and "
                                  f"nothing else holds epoch(s) {covers[0]}..{covers[-1]}: their entries are lost",
                                  blob=name)
                else:
                    self.report.notes.append(f"incomplete index set {name} ({len(s.members)} of {s.count}) left by "
                                             "an interrupted compaction; readers ignore it")
        now, margin = clock.now(), safety_of(self.fmt.parameters).cleanup_margin
        for st in view.ignored_sets:
            name = f"{st.kind}{st.epoch}_{st.set_id}"
            if now - st.newest < margin:  # maintenance may still be signing it (this clock: a note only)
                self.report.notes.append(f"index set {name} is not signed yet; readers ignore it until it is")
                continue
            self._problem("forgery", f"index set {name} ({st.count} member(s)) is not signed by the root or a "
                          "maintenance key (forged, or left by a maintenance run that stopped before signing it; "
                          "readers ignore it and maintenance deletes it)", blob=name)
        every_set = [st for sets in view.sets.values() for st in sets] + view.ignored_sets
        for m in view.stray_signatures + [g for st in every_set for g in st.signatures if g is not st.signature]:
            if self.epochs.signed_digests(m) is None:
                self._problem("forgery", f"index set signature {m.name} is not signed by the root or a "
                              "maintenance key (forged; readers ignore it)", blob=m.name)
        signed_since = min((m.timestamp for m in view.markers.values()), default=0.0) if view.signed else 0.0
        for m in view.ignored:
            name, number = m.name, m.name[len(C.EPOCH_MARKER_PREFIX):]
            if name.startswith(C.SIGNED_SETS_PREFIX):
                self._problem("forgery", f"signed-sets blob {name} is not signed by the root or a maintenance key "
                              "(forged; readers ignore it)", blob=name)
            elif "_" in number:
                self._problem("forgery", f"epoch marker {name} is not signed by the root or a maintenance key "
                              "(forged or damaged; readers ignore it)", blob=name)
            elif not view.signed:
                self._problem("epoch-marker", f"epoch marker {name} failed authentication (damaged or forged; "
                              "readers ignore it)", blob=name)
            elif int(number) in view.markers:
                pass  # the older kind's twin of a signed marker, for kdist that predates them
            elif m.timestamp > signed_since:  # maintenance writes the older kind only beside a signed one
                self._problem("forgery", f"epoch marker {name} is unsigned, of no signed epoch, and was written "
                              "after the signed ones (forged; readers ignore it)", blob=name)
            else:
                self.report.notes.append(f"epoch marker {name} is from before markers were signed; readers "
                                         "ignore it")
        for epoch, blobs in sorted(view.raw.items()):
            if view.ahead(epoch):
                for m in blobs:
                    self._problem("forgery", f"index blob {m.name} is in epoch {epoch}, ahead of every epoch a "
                                  f"marker names (the current one is {view.current}): no writer wrote it there "
                                  "(forged; readers ignore it and maintenance deletes it)", blob=m.name)

    def misplaced(self, entry: IndexEntry, other: IndexEntry, unusable: bool = False) -> None:
        """The winning entry of a content points where its record is not, while another entry
        may hold it: a host's forged entry (or damage). Readers and maintenance's merges try the
        other places. ``unusable``: the winner cannot even be there (its pack is missing, or too
        short), and ``other`` was not read."""
        if unusable:
            self.report.unplaced.add(entry.content_id)
        if entry.content_id in self.report.misplaced:
            return
        self.report.misplaced.add(entry.content_id)
        self._problem("index-entry", f"index entry of content {entry.content_id.hex()} points into pack {entry.pack} "
                      f"(offset {entry.offset}), where its record is not; readers try its other places (one in "
                      f"pack {other.pack}), and maintenance's next merges keep one whose record is there "
                      "(forged or damaged)", content=entry.content_id.hex(), pack=entry.pack)

    def unusable(self, e: IndexEntry) -> str | None:
        """Why the record an entry points to cannot be where it says, or None."""
        size = self.packs.get(e.pack)
        if size is None:
            return f"is in pack {e.pack}, which is missing"
        if e.offset + e.packed_length + C.PACK_POSTAMBLE.size > size:
            return (f"lies beyond the end of pack {e.pack} (offset {e.offset}, {e.packed_length} bytes; "
                    f"the pack has {size} bytes)")
        return None

    def locate(self, content_id: bytes) -> tuple[IndexEntry | None, str | None]:
        """The entry readers would read the content from, and why it cannot be read (None if it
        can): the winner, or when the winner cannot be where it says (a missing pack, past the
        end) another place of the content that can, as readers fall back to it (the winner is
        then named as misplaced). Judging by the winner alone took a host's forged entry into a
        missing pack for a lost directory, and stopped the walk there."""
        e = self.index.lookup(content_id)
        if e is None:
            return None, "is not in the index"
        reason = self.unusable(e)
        if reason is not None:
            others = [o for o in self.index.locations(content_id)
                      if place_of(o) != place_of(e) and self.unusable(o) is None]
            if others:
                best = next((o for o in others if not o.deleted), others[0])  # whether it is marked: the winner says
                self.misplaced(e, best, unusable=True)
                return best, None
        return e, reason

    def _check_entries(self) -> list[str]:
        """Every winning live entry points inside a listed pack. Returns the packs they use."""
        broken: dict[str, list[IndexEntry]] = {}
        live: set[str] = set()
        for e in self.index:
            self.report.counts["index_entries"] += 1
            if e.deleted:
                continue
            live.add(e.pack)
            if self.unusable(e) is not None:
                broken.setdefault(e.pack, []).append(e)
        for pack, entries in sorted(broken.items()):
            first = min(entries, key=lambda e: e.offset)
            if pack not in self.packs:
                msg = f"pack {pack} is missing: {len(entries)} index entries point into it"
            else:
                msg = (f"pack {pack} is truncated or damaged: it has {self.packs[pack]} bytes, but "
                       f"{len(entries)} index entries point beyond its records")
            self._problem("pack", f"{msg} (first: content {first.content_id.hex()} at offset {first.offset}, "
                          f"{first.packed_length} bytes)", pack=pack, content=first.content_id.hex(),
                          offset=first.offset, entries=len(entries))
        referenced = self.index.referenced_packs()
        self.report.unreferenced_packs = sorted(set(self.packs) - referenced)
        return sorted(live & set(self.packs))

    # ---- manifests and trees -----------------------------------------------------------------
    def read_snapshots(self) -> list[Snapshot]:
        """Every live snapshot and checkpoint; a blob or record that does not parse is reported,
        and so is every record a signed repository does not honour (a forgery, a removed key's)."""
        store = self.repo.manifests
        every, compacted = [], []
        for m in self.storage.list(C.MANIFEST_PREFIX):
            self.report.counts["manifest_blobs"] += 1
            try:
                records, extra = store._read_blob(m.name)
            except BlobNotFound:
                self.report.notes.append(f"manifest blob {m.name} vanished while checked (a concurrent compaction)")
                continue
            except KdistError as exc:
                self._problem("manifest", _naming(f"manifest blob {m.name}", exc), blob=m.name)
                continue
            every += [replace(r, stored=m.timestamp) for r in records]
            if extra:
                compacted.append((m.name, extra))
        if store.trust is not None:
            keys = store.trust.registry(every)
            every, refused = store.trust.judge(every)
            signed = {(r.id, r.ts, r.deleted) for r in every}
            resigned = 0
            for r, why in refused:
                if not r.signer and (r.id, r.ts, r.deleted) in signed:
                    resigned += 1  # from before `repo upgrade`, which signed a copy
                    continue
                self._problem("forgery", f"manifest record {r.id} in blob {r.blob} does not count: {why}",
                              record=r.id, blob=r.blob, reason=why)
            if resigned:
                self.report.notes.append(f"{resigned} unsigned manifest record(s) from before the upgrade to key "
                                         "slots have signed copies (maintenance's manifest compaction drops them)")
            for name, extra in compacted:
                if not store._trusted_compaction(name, extra, keys):
                    self._problem("forgery", f"compacted manifest blob {name} is not signed by the root or a "
                                  f"maintenance key (signer {extra['signer']}): maintenance ignores it", blob=name)
        best = {}
        for r in every:
            if r.id not in best or newer(r, best[r.id]):
                best[r.id] = r
        snapshots = []
        for r in sorted(best.values(), key=lambda r: (r.ts, r.id)):
            if r.deleted or r.labels.get("type") != SNAPSHOT_LABEL:
                continue
            opened = store.opened(r)
            if opened is None:  # format 3: another host's, sealed to it and the readers
                if not store.payload_keys.host:  # a reader (admin, maintenance) is a recipient of all
                    self._problem("snapshot", f"snapshot manifest {r.id} (in blob {r.blob}) is sealed to none of "
                                  "the readers: maintenance does not see it, and collects what only it reaches",
                                  snapshot=r.id, blob=r.blob)
                continue
            r = opened
            try:
                snap = Snapshot.from_record(r)
                self.objects.parse(snap.root if isinstance(snap.root, str) else "")
            except KdistError as exc:
                self._problem("snapshot", f"snapshot manifest {r.id} (in blob {r.blob}) is malformed: {exc}",
                              snapshot=r.id, blob=r.blob)
                continue
            snapshots.append(snap)
            self.report.counts["checkpoints" if snap.checkpoint else "snapshots"] += 1
        return snapshots

    def _check_tree(self, snap: Snapshot) -> None:
        label = f"{'checkpoint' if snap.checkpoint else 'snapshot'} {snap.short_id} of {shown(snap.source.path)}"
        self._walking = (label, snap)
        for d in self._walker.walk(snap.root, "/"):
            if d.repeat:
                if d.oid in self._damaged_dirs:
                    self._report_at(label, snap, d.parent, "directory", f"directory {shown(d.path)} is a subtree "
                                    f"already found damaged (see {self._damaged_dirs[d.oid]})", path=d.path)
                continue
            if d.entries is None:  # reported by the reader
                continue
            self.report.counts["directories"] += 1
            self._dir_oids.append(d.oid)
            for e in d.entries:
                if e.type == TYPE_FILE:
                    self.report.counts["files"] += 1
                    if e.oid:
                        self._check_file(label, snap, d, d.child_path(e.name), e.oid)

    def _report_at(self, label: str, snap: Snapshot, d: Directory, kind: str, message: str, path: str | None = None,
                   **where) -> None:
        """Report a problem found in or under directory ``d`` (at ``path``, default the directory's)
        and mark the directories above it damaged, so a snapshot that shares one of them is told so
        without walking it again."""
        path = path if path is not None else d.path
        self._problem(kind, f"{label}: {message}", snapshot=snap.id, path=path, **where)
        for above in d.ancestors() if d is not None else ():
            if above.oid in self._damaged_dirs:
                break
            self._damaged_dirs[above.oid] = f"{label} at {shown(path)}"

    def _object_problems(self, oid: str) -> tuple[int, list[tuple[bytes, str]]]:
        """How many contents the object has, and those that cannot be read (with why). Contents
        marked deleted are noted for repair and reported, but are readable."""
        indirect, ref = self.objects.parse(oid)
        refs = [ref]
        if indirect and self.locate(ref[:C.CONTENT_ID_SIZE])[1] is None:  # (a hole is no content)
            refs += [c for c, _n in self.objects.chunks(oid) if c is not None]
        ids = [r[:C.CONTENT_ID_SIZE] for r in refs]
        if self._refs is not None:
            for r in refs:
                self._refs.setdefault(r[:C.CONTENT_ID_SIZE], set()).add(r)
        bad = []
        for c in ids:
            entry, reason = self.locate(c)
            winner = self.index.lookup(c)  # marked deleted or not is the winner's to say, wherever it points
            if reason is not None:
                self.report.missing.add(c)
                bad.append((c, reason))
            elif winner.deleted:
                self.report.deleted_referenced[c] = winner
                bad.append((c, "is marked deleted in the index (garbage collection may drop it)"))
        return len(ids), bad

    def _read_directory(self, d: Directory) -> list[Entry] | None:
        """The walker's reader: the entries, or ``None`` for a directory reported damaged."""
        label, snap = self._walking
        try:
            _n, bad = self._object_problems(d.oid)
            for cid, reason in bad:
                what = f"object {d.oid}" if cid.hex() in d.oid else f"content {cid.hex()} of object {d.oid}"
                self._report_at(label, snap, d, "directory", f"directory {shown(d.path)}: {what} {reason}",
                                content=cid.hex())
            if any(cid in self.report.missing for cid, _ in bad):
                return None
            return decode_directory(self.objects.read_all(d.oid))
        except KdistError as exc:
            if is_outage(exc):
                raise
            self._report_at(label, snap, d, "directory", f"directory {shown(d.path)}: object {d.oid} is damaged: "
                            f"{exc}")
            return None

    def _check_file(self, label, snap, d: Directory, path: str, oid: str) -> None:
        found = self._files.get(oid)
        if found is None:
            try:
                found = self._object_problems(oid)
            except KdistError as exc:
                found = (1, [(b"", f"cannot be resolved: {exc}")])
            self._files[oid] = found
        total, bad = found
        if bad:
            cid, reason = bad[0]
            more = f" (and {len(bad) - 1} more of its {total} contents)" if len(bad) > 1 else ""
            what = f"content {cid.hex()} {reason}" if cid else f"object {oid} {reason}"
            self._report_at(label, snap, d, "file", f"file {shown(path)}: {what}{more}", path=path,
                            content=cid.hex() or None, contents=[c.hex() for c, _ in bad if c])

    def reached(self) -> set[bytes]:
        """Every content the snapshots checked reach, as check sees them (``kdist.tree``'s rule):
        the directories walked and the files they name, with their chunks where readable."""
        out: set[bytes] = set()
        for oid in list(self._dir_oids) + list(self._files):
            indirect, ref = self.objects.parse(oid)
            cid = ref[:C.CONTENT_ID_SIZE]
            out.add(cid)
            if indirect and self.locate(cid)[1] is None:
                out.update(object_contents(self.objects, oid))
        return out

    # ---- reading data ------------------------------------------------------------------------
    def _read_data(self, live_packs: list[str], percent: float, seed: int | None) -> None:
        seed = random.SystemRandom().randrange(2**32) if seed is None else seed
        self.report.read_data = {"percent": percent, "seed": seed}
        k = len(live_packs) if percent >= 100 else min(len(live_packs), math.ceil(len(live_packs) * percent / 100))
        sample = sorted(random.Random(seed).sample(live_packs, k))
        chosen = set(sample)
        by_pack: dict[str, list[IndexEntry]] = {}
        for e in self.index:
            if not e.deleted and e.pack in chosen and self.unusable(e) is None:
                by_pack.setdefault(e.pack, []).append(e)
        local = entries_from_packs(self.storage, self.fmt, names=sample)
        for name, why in sorted(local.damaged_packs.items()):
            self._problem("pack-index", _naming(f"the local index of pack {name}", why), pack=name)
        own = {(e.pack, e.content_id): e for e in local.entries}
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="kdist-check") as pool:
            for pack in sample:
                self._read_pack(pool, pack, sorted(by_pack.get(pack, []), key=lambda e: e.offset), own,
                                pack in local.damaged_packs)

    def _read_pack(self, pool: ThreadPoolExecutor, pack: str, entries: list[IndexEntry], own: dict,
                   own_damaged: bool) -> None:
        """Authenticate every content of one pack, and compare each entry with the pack's own."""
        self.report.counts["packs_read"] += 1
        for e, (n, err) in zip(entries, pool.map(self._read_one, entries)):
            self.report.counts["contents_read"] += 1
            self.report.counts["bytes_read"] += n
            where = {"pack": pack, "content": e.content_id.hex(), "offset": e.offset}
            if err is not None:
                self._problem("content", f"content {e.content_id.hex()} in pack {pack} at offset {e.offset} "
                              f"({e.packed_length} bytes): {err}", **where)
            mine = own.get((pack, e.content_id))
            if not own_damaged and (mine is None or (mine.offset, mine.packed_length) != (e.offset, e.packed_length)):
                self._problem("pack-index", f"index entry for content {e.content_id.hex()} (pack {pack}, offset "
                              f"{e.offset}) disagrees with the pack's own index", **where)

    def _read_one(self, e: IndexEntry) -> tuple[int, str | None]:
        """Authenticate one record: opened (format 3: with every reference to it the snapshots
        hold), or for a format 3 record no snapshot checked refers to, certified by its hash."""
        try:
            refs = self._refs.get(e.content_id) if self._refs is not None else {e.content_id}
            if not refs:
                self.contents.certify_entry(e)
            for ref in sorted(refs or ()):
                self.contents.read_entry(e, ref)
            return e.original_length, None
        except KdistError as exc:
            return 0, str(exc)


def check_repository(storage: BlobStorage, fmt: FormatBlob, read_data: float | None = None,
                     seed: int | None = None) -> CheckReport:
    """Check the repository; ``read_data`` is the share of packs (percent) whose contents are read."""
    return Checker(storage, fmt).run(read_data, seed)
