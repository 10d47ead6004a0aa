"""Checkpoints of dead backups are forgotten by maintenance; a live backup's never are.

The repository's margins are the full preset scaled from hours to seconds, over the in-memory
storage on a virtual clock, so a test lets sessions expire by moving that clock.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import clock  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402

from kdist.gc.run import MaintenanceOptions, run_maintenance  # noqa: E402
from kdist.snapshot import Source, list_snapshots  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402

SAFETY = SAFETY_FULL.scaled(1 / 3600)
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})


class Killed(Exception):
    pass


@pytest.fixture
def world(tmp_path, virtual_time, memory_repository):
    ticks = [0.0]

    def monotonic():  # moves on by itself too, so a backup's checkpoint interval passes
        ticks[0] += 1e-4
        return virtual_time[0] + ticks[0]

    clock.set_monotonic(monotonic)  # (virtual_time puts the real one back)
    storage = memory_repository(PARAMS)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(9000))
    return storage, virtual_time, src


def _open(storage) -> Repository:
    return Repository.open(storage, "pw", heartbeat_thread=False)


def _killed_backup(storage, src, keep_open: bool = False):
    """A backup that publishes checkpoints and dies before its snapshot (the final put fails).
    Returns its repository (still open, its session live, if ``keep_open``) and its session."""
    repo = _open(storage)
    real_put = repo.manifests.put

    def put(labels, payload, **kw):
        if labels["checkpoint"] == "0":
            raise Killed()
        return real_put(labels, payload, **kw)

    repo.manifests.put = put
    with pytest.raises(Killed):
        Uploader(repo, BackupOptions(checkpoint_interval=1e-9)).backup(str(src))
    if not keep_open:
        repo.contents._session.retire()  # killed: its marker stays until it expires; here it is gone
    return repo, repo.session


def _backup(storage, src, host: str | None = None):
    repo = _open(storage)
    source = Source(host, "u", str(src)) if host else None
    snap = Uploader(repo, BackupOptions()).backup(str(src), source=source) if source else \
        Uploader(repo, BackupOptions()).backup(str(src))
    repo.close()
    return snap


def _checkpoints(storage):
    return [s for s in list_snapshots(_open(storage).manifests, include_checkpoints=True) if s.checkpoint]


def test_a_dead_backups_checkpoints_are_forgotten_once_a_later_snapshot_supersedes_them(world):
    storage, t, src = world
    _repo, session = _killed_backup(storage, src)
    cps = _checkpoints(storage)
    assert cps and all(r.labels["session"] == session for r in _open(storage).manifests.find(checkpoint="1"))
    t[0] += SAFETY.session_expiry + SAFETY.listing_settle + 1
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
    assert report.steps["checkpoints_forgotten"] == 0  # no complete snapshot of the source yet: the newest copy
    assert len(_checkpoints(storage)) == len(cps)
    t[0] += 1
    snap = _backup(storage, src)
    t[0] += 1
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
    assert report.steps["checkpoints_forgotten"] == len(cps)
    assert _checkpoints(storage) == []
    assert [s.id for s in list_snapshots(_open(storage).manifests)] == [snap.id]


def test_a_live_backups_checkpoints_are_kept(world):
    storage, t, src = world
    repo, session = _killed_backup(storage, src, keep_open=True)  # still running: its marker is fresh
    cps = _checkpoints(storage)
    t[0] += 1
    _backup(storage, src)  # supersedes them: only the session being live keeps them
    for _ in range(4):  # hours of (scaled) time, its heartbeat keeping the session live
        t[0] += SAFETY.session_expiry / 2
        repo.contents._session.marker.refresh()
        report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
        assert report.steps["checkpoints_forgotten"] == 0
    assert [c.id for c in _checkpoints(storage)] == [c.id for c in cps]
    t[0] += SAFETY.session_expiry + SAFETY.listing_settle + 1  # then it dies
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
    assert report.steps["checkpoints_forgotten"] == len(cps)


def test_another_sources_snapshot_does_not_supersede_and_parts_are_left_to_their_driver(world):
    storage, t, src = world
    _killed_backup(storage, src)
    cps = _checkpoints(storage)
    t[0] += 1
    _backup(storage, src, host="another-host")  # a different source
    repo = _open(storage)
    part = cps[0]
    labels = {**part.labels(), "run": "abc", "session": "00" * 16}  # a sharded backup's part
    repo.manifests.put(labels, part.payload())
    t[0] += SAFETY.session_expiry + SAFETY.listing_settle + 1
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
    assert report.steps["checkpoints_forgotten"] == 0
    assert "not superseded" in report.plans[-1] and len(_checkpoints(storage)) == len(cps) + 1


@pytest.mark.parametrize("variant", ["format-2", "format-3", "format-3-mutation-labels-not-opened"])
def test_a_part_lives_as_long_as_its_driver(world, memory_repository, monkeypatch, variant):
    """A sharded backup's parts retire their sessions when they finish; the driver that will
    publish them runs on. Its parts' checkpoints (label ``driver``) are kept while its session is
    live, even once a later snapshot of the tree supersedes them, and forgotten once it is dead;
    a part without the label (older kdist) is kept. In format 3 the ``run``, ``session`` and
    ``driver`` labels are sealed (SPEC.md section 8a): maintenance reads them in the records it
    opens (gc/README.md, "Format 3"); were they not merged back, the live driver's part would
    be forgotten."""
    storage, t, src = world
    if variant != "format-2":
        storage = memory_repository(PARAMS, version=3)
    if variant.endswith("mutation-labels-not-opened"):
        from repo_format import manifest

        real = manifest._sealed_part
        monkeypatch.setattr(manifest, "_sealed_part", lambda plain: ({}, real(plain)[1]))
    mutated = variant.endswith("mutation-labels-not-opened")
    _killed_backup(storage, src)
    cp = _checkpoints(storage)[-1]
    driver = _open(storage)
    driver.contents.hold_session()
    writer = _open(storage)
    part = writer.manifests.put({**cp.labels(), "run": "r1", "session": "00" * 8, "driver": driver.session},
                                cp.payload())
    old = writer.manifests.put({**cp.labels(), "run": "r0", "session": "00" * 8}, cp.payload())
    t[0] += 1
    _backup(storage, src)  # a later snapshot of the same tree
    for _ in range(4):
        t[0] += SAFETY.session_expiry / 2
        driver.contents.marker.refresh()
        run_maintenance(_open(storage), MaintenanceOptions(full=False))
        left = {r.id for r in _open(storage).manifests.find(type="snapshot", checkpoint="1")}
        if mutated and part.id not in left:
            return  # (the mutation: maintenance forgot the live driver's part)
        assert {part.id, old.id} <= left  # the driver is live: its part stays
    assert not mutated, "without the sealed labels, maintenance kept the live driver's part"
    t[0] += SAFETY.session_expiry + SAFETY.listing_settle + 1  # the driver died
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False))
    left = {r.id for r in _open(storage).manifests.find(type="snapshot", checkpoint="1")}
    assert part.id not in left and old.id in left
    assert "1 parts of sharded backups by older kdist" in report.plans[-1]


def test_forget_finds_the_same_dead_checkpoints_as_maintenance(world):
    """``snapshot forget`` removes at once what maintenance would (``dead_checkpoints``): none
    while the dead backup's checkpoint is the newest copy or its session may be live, all once a
    later snapshot supersedes them; a filter for another host leaves them."""
    from kdist.snapshot import SnapshotFilter, dead_checkpoints

    storage, t, src = world
    _repo, _session = _killed_backup(storage, src)
    cps = _checkpoints(storage)
    assert cps and dead_checkpoints(_open(storage)) == []  # its session may still be live
    t[0] += SAFETY.session_expiry + SAFETY.listing_settle + 1
    assert dead_checkpoints(_open(storage)) == []  # the newest copy of its source
    t[0] += 1
    _backup(storage, src)
    t[0] += 1
    assert sorted(s.id for s in dead_checkpoints(_open(storage))) == sorted(s.id for s in cps)
    assert dead_checkpoints(_open(storage), SnapshotFilter.of(hosts=["another-host"])) == []
    assert len(dead_checkpoints(_open(storage), SnapshotFilter.of(hosts=[cps[0].source.host]))) == len(cps)
    # a forget that also forgets the superseding snapshot keeps them: the newest copy again
    later = [s.id for s in list_snapshots(_open(storage).manifests)]
    assert dead_checkpoints(_open(storage), forgotten=frozenset(later)) == []
