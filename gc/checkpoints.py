"""Checkpoints of dead backups: forgotten by maintenance once no backup can still need them.

A backup publishes a checkpoint at least every ``checkpoint_interval`` and deletes its
checkpoints when its snapshot is published. A backup that was killed leaves them behind; policy
``forget`` skips checkpoints, so they would keep their data forever.

A checkpoint is forgotten (a tombstone, as ``forget`` writes) when all of these hold:
1. its writer's session is not live: no session marker younger than ``session_expiry`` on the
   storage clock names it. A live writer's checkpoint is what protects the unchanged files it
   reused from an earlier snapshot (gc/README.md, writer rule 6); a writer whose session lapsed
   publishes nothing more (rule 3), so its checkpoints protect nothing a later publication needs;
2. its manifest blob has been listed for ``session_expiry + listing_settle``, so the writer's
   session marker, written before its first checkpoint, is in every listing if it is fresh;
3. a later complete snapshot of the same source (host, user, path) exists: until a backup of the
   source finishes, the dead backup's last checkpoint is the newest copy there is (restic keeps
   such partial snapshots too);
A part of a sharded backup (label ``run``: on Ray, or by local processes) is its driver's
backup: a part's own session may end before its driver publishes (Ray actors retire theirs when
they finish), and the driver forgets the parts itself when it publishes. So a part's checkpoint
is judged by its driver's session (label ``driver``), held from before the first part was
handed out, and not by its own: a driver that died leaves them to this rule, a live one keeps
them. A part without the label (older kdist) is kept.
Checkpoints written before kdist labelled them with their session are judged by the session in
their manifest blob's name, if that blob is not a compacted one; otherwise they are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repo_format import constants as C
from repo_format.manifest import ManifestRecord, ManifestStore
from repo_format.safety import SafetyParameters
from repo_format.session import live_sessions, session_of
from repo_format.storage.base import BlobStorage

from kdist.snapshot import DRIVER_LABEL, SNAPSHOT_LABEL

SESSION_LABEL = "session"


@dataclass
class CheckpointPlan:
    forget: list[ManifestRecord] = field(default_factory=list)
    kept_live: int = 0
    kept_latest: int = 0
    kept_young: int = 0
    kept_parts: int = 0
    kept_unknown: int = 0

    def describe(self) -> str:
        return (f"checkpoints: forget {len(self.forget)} of dead backups that a later snapshot supersedes; kept "
                f"{self.kept_live} of live backups, {self.kept_young} too recent to judge, {self.kept_latest} "
                f"not superseded, {self.kept_parts} parts of sharded backups by older kdist, {self.kept_unknown} of "
                "unknown writers")


def writer_session(rec: ManifestRecord) -> str | None:
    if SESSION_LABEL in rec.labels:
        return rec.labels[SESSION_LABEL]
    if rec.blob and not rec.blob.startswith(C.MANIFEST_COMPACTED_PREFIX):
        return session_of(rec.blob)
    return None


def plan_checkpoints(manifests: ManifestStore, storage: BlobStorage, now: float, safety: SafetyParameters,
                     live_rule: bool = True, gone: frozenset = frozenset(),
                     driver_rule: bool = True) -> CheckpointPlan:
    """``gone``: ids of snapshots about to be forgotten with this plan (``snapshot forget``):
    they supersede nothing. ``live_rule`` and ``driver_rule`` off are the simulator's mutations."""
    plan = CheckpointPlan()
    records = [r for r in manifests.find(type=SNAPSHOT_LABEL) if r.id not in gone]
    checkpoints = [r for r in records if r.labels.get("checkpoint") == "1"]
    if not checkpoints:
        return plan
    newest: dict[tuple, int] = {}  # the latest complete snapshot of each source (manifest time)
    for r in records:
        if r.labels.get("checkpoint") != "1":
            key = _source(r)
            newest[key] = max(newest.get(key, r.ts), r.ts)
    listed = {m.name: m.timestamp for m in storage.list(C.MANIFEST_PREFIX)}
    live = live_sessions(list(storage.list(C.SESSION_PREFIX)), now, safety.session_expiry)
    for r in checkpoints:
        session = writer_session(r)
        if r.labels.get("run") and driver_rule:
            session = r.labels.get(DRIVER_LABEL)  # a part lives as long as its driver
            if session is None:
                plan.kept_parts += 1
                continue
        if newest.get(_source(r), -1) <= r.ts:
            plan.kept_latest += 1
        elif not live_rule:
            plan.forget.append(r)  # the simulator's mutation: liveness and age not looked at
        elif session is None:
            plan.kept_unknown += 1
        elif now - listed.get(r.blob, now) < safety.session_expiry + safety.listing_settle:
            plan.kept_young += 1
        elif session in live:
            plan.kept_live += 1
        else:
            plan.forget.append(r)
    return plan


def _source(r: ManifestRecord) -> tuple:
    return r.labels.get("host"), r.labels.get("user"), r.labels.get("path")


def execute_checkpoints(manifests: ManifestStore, plan: CheckpointPlan) -> int:
    manifests.delete([r.id for r in plan.forget])
    return len(plan.forget)
