"""How the fleet's backups stand (``kdist fleet status``): for every host and path, its last
snapshot, how old it is, what it held, whether a backup started since and did not finish, and its
last recorded failure (``kdist.failures``).

Read from the manifests alone: what a host published, and the failures recorded there, are the
truth about it that no driver, cron or Ray can lose. A host that has a key (``kdist key add
--role host``) but no snapshot is listed too ("never"): the host a fleet forgot is the one that
matters at 3 a.m. (restic #1968).
Ages are measured from a snapshot's time bounded by when its manifest was stored (the storage's
clock, ``kdist.retention.storage_bounded_time``), so a host's clock cannot make it look fresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from repo_format.keyslots import ADMIN, HOST, MAINTENANCE

from kdist.failures import FAILURE_LABEL, decode_failures
from kdist.retention import bounded_by_storage, storage_bounded_time
from kdist.snapshot import SNAPSHOT_LABEL, TAGS_LABEL, Snapshot, SnapshotFilter, with_tag_edits

DEFAULT_MAX_AGE = 26 * 3600.0  # a nightly backup, with two hours of slack


@dataclass
class SourceStatus:
    host: str
    path: str
    user: str = ""
    snapshot: str = ""  # the last complete snapshot's id ("" if none)
    time: float = 0.0  # its time (storage-bounded)
    age: float | None = None  # seconds since then; None: never backed up
    files: int = 0
    bytes: int = 0
    errors: int = 0  # files or directories its backup could not read
    unfinished_since: float = 0.0  # a backup started after it left checkpoints and no snapshot (died, or running)
    failed_at: float = 0.0  # the last recorded failure of this path, or of the whole host (storage-bounded)
    failure: str = ""  # its error
    failure_exit_code: int = 0
    failing: bool = False  # that failure came after the last snapshot
    stale: bool = False
    # when the last snapshot's and the last failure's records were stored (storage clock, 0.0:
    # unknown): which came first, whatever the writers' clocks say
    snapshot_stored: float = field(default=0.0, repr=False)
    failure_stored: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["snapshot_stored"], d["failure_stored"]
        return d


def fleet_status(manifests, now: float, max_age: float = DEFAULT_MAX_AGE,
                 where: SnapshotFilter = SnapshotFilter(), **labels) -> list[SourceStatus]:
    """One ``SourceStatus`` per (host, path) with a snapshot or a checkpoint, plus one per host
    key without any; sorted by host and path. ``labels``: what this key may see (a host key: its
    own host)."""
    records = manifests.find(**labels)  # one read for snapshots, checkpoints and failures
    edits = records if not labels else manifests.find(type=TAGS_LABEL)  # (older edits carry no host label)
    snaps = where.select(with_tag_edits(edits, [Snapshot.from_record(r) for r in records
                                               if r.labels.get("type") == SNAPSHOT_LABEL]))

    def when(s: Snapshot) -> float:
        return storage_bounded_time(s, manifests.signer_role(s.signer) in (ADMIN, MAINTENANCE))

    rows: dict[tuple[str, str], SourceStatus] = {}
    for s in sorted(snaps, key=when):
        row = rows.setdefault((s.source.host, s.source.path), SourceStatus(s.source.host, s.source.path))
        t = when(s)
        if s.checkpoint:
            if t > row.time and not row.unfinished_since:
                row.unfinished_since = t
            continue
        row.user, row.snapshot, row.time, row.snapshot_stored = s.source.user, s.id, t, s.stored
        row.files, row.bytes = int(s.totals.get("files", 0)), int(s.totals.get("bytes", 0))
        row.errors = int(s.totals.get("errors", 0))
        row.unfinished_since = 0.0  # checkpoints before this snapshot belong to backups it outlived
    for f in decode_failures(r for r in records if r.labels.get("type") == FAILURE_LABEL):
        if where.hosts and f.host not in where.hosts:
            continue
        t = bounded_by_storage(f.time, f.stored, manifests.signer_role(f.signer) in (ADMIN, MAINTENANCE))
        # a path's failure is that path's; a failure of the whole host (path "") is each of its paths'
        targets = [r for (h, p), r in rows.items() if h == f.host and (p == f.path or not f.path)]
        if not targets and not where.tags and (not where.paths or f.path in where.paths):
            targets = [rows.setdefault((f.host, f.path), SourceStatus(f.host, f.path, f.user))]
        for row in targets:
            if t >= row.failed_at:
                row.failed_at, row.failure, row.failure_exit_code, row.failure_stored = (
                    t, f.error, f.exit_code, f.stored)
    hosts_seen = {host for host, _ in rows}
    for key in manifests.keys.values():  # filled by the listing above
        if key.role == HOST and not key.revoked and key.host not in hosts_seen and \
                labels.get("host", key.host) == key.host and (not where.hosts or key.host in where.hosts):
            rows[(key.host, "")] = SourceStatus(key.host, "")
    out = sorted(rows.values(), key=lambda r: (r.host, r.path))
    for r in out:
        if r.snapshot:
            r.age = max(0.0, now - r.time)
        r.stale = r.age is None or r.age > max_age
        if r.snapshot and r.snapshot_stored and r.failure_stored:
            r.failing = r.failure_stored > r.snapshot_stored
        else:
            r.failing = r.failed_at > r.time
    return out
