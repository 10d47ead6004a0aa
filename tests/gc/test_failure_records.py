"""Failure records (``kdist.failures``) are forgotten by maintenance 30 days after they were
stored, and nothing else is: the step chooses only records of type ``failure``.

In-memory repositories on the virtual clock (tests/gc/conftest.py), the full preset scaled from
hours to seconds, so 31 days pass by moving the clock.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402

from kdist import failures  # noqa: E402
from kdist.gc.run import MaintenanceOptions, Rules, run_maintenance  # noqa: E402
from kdist.restore import Restorer  # noqa: E402
from kdist.snapshot import Source, list_snapshots  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402

SAFETY = SAFETY_FULL.scaled(1 / 3600)
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})
DAY = 86400.0


def _open(storage) -> Repository:
    return Repository.open(storage, "pw", heartbeat_thread=False)


@pytest.fixture
def aged(tmp_path, virtual_time, memory_repository):
    """A snapshot and a failure record stored on day 0, a failure record stored on day 31; the
    clock on day 31. Returns (storage, the clock, the snapshot, the source tree)."""
    storage = memory_repository(PARAMS)
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(20_000))
    repo = _open(storage)
    snap = Uploader(repo, BackupOptions()).backup(str(src), Source("web1", "root", "/srv"))
    failures.record_failure(repo.manifests, "web1", "root", "/home", "cannot back up /home: gone", 17)
    repo.close()
    virtual_time[0] += 31 * DAY
    repo = _open(storage)
    failures.record_failure(repo.manifests, "web1", "root", "/home", "cannot back up /home: still gone", 17)
    repo.close()
    return storage, virtual_time, snap, src


def _restores(storage, snap, target) -> bool:
    repo = _open(storage)
    if snap.id not in {s.id for s in list_snapshots(repo.manifests)}:
        return False
    Restorer(repo).restore(snap, str(target))
    return (target / "data").exists()


def test_maintenance_forgets_old_failure_records_and_nothing_else(aged, tmp_path):
    storage, t, snap, src = aged
    before = [f.error for f in failures.read_failures(_open(storage).manifests)]
    assert before == ["cannot back up /home: gone", "cannot back up /home: still gone"]
    report = run_maintenance(_open(storage), MaintenanceOptions(full=True))
    assert report.steps["failures_forgotten"] == 1
    assert [f.error for f in failures.read_failures(_open(storage).manifests)] == ["cannot back up /home: still gone"]
    # the snapshot is as old as the forgotten record, and is no failure record: it stays whole
    assert _restores(storage, snap, tmp_path / "out")
    assert (tmp_path / "out" / "data").read_bytes() == (src / "data").read_bytes()
    t[0] += 30 * DAY  # the second record's turn; cycles of maintenance on the way
    for _ in range(3):
        t[0] += DAY
        run_maintenance(_open(storage), MaintenanceOptions(full=True))
    assert failures.read_failures(_open(storage).manifests) == []
    assert _restores(storage, snap, tmp_path / "again")


def test_a_dry_run_forgets_nothing(aged):
    storage, _t, _snap, _src = aged
    report = run_maintenance(_open(storage), MaintenanceOptions(full=False, dry_run=True))
    assert "failure records: forget 1 stored more than 30 days ago" in report.plans
    assert len(failures.read_failures(_open(storage).manifests)) == 2


def test_the_type_is_what_keeps_snapshots_from_the_step(aged, tmp_path):
    """The mutation (the simulator's ``failure_type``): a step that chooses every record stored
    30 days ago, not only failure records, forgets the snapshot, and the first test fails."""
    storage, _t, snap, _src = aged
    run_maintenance(_open(storage), MaintenanceOptions(full=True, rules=Rules(failure_type=False)))
    assert not _restores(storage, snap, tmp_path / "out")


def test_a_malformed_failure_record_is_left_out(virtual_time, memory_repository):
    storage = memory_repository(PARAMS)
    repo = _open(storage)
    labels = {"type": failures.FAILURE_LABEL, "host": "h", "user": "u", "path": "/p"}
    repo.manifests.put(labels, b"\xc1 not msgpack")
    import msgpack
    repo.manifests.put(labels, msgpack.packb({"time": 1.0, "error": "e", "exit_code": "17", "run": ""}))
    repo.manifests.put(labels, msgpack.packb({"time": 1.0, "error": "e", "exit_code": 17, "run": "", "x": 1}))
    repo.manifests.put({**labels, "path": 5}, msgpack.packb({"time": 1.0, "error": "e", "exit_code": 17, "run": ""}))
    failures.record_failure(repo.manifests, "h", "u", "/p", "x" * 5000, 14, run="r1")
    [f] = failures.read_failures(repo.manifests)
    assert (f.host, f.path, f.exit_code, f.run, len(f.error)) == ("h", "/p", 14, "r1", failures.MAX_ERROR)


def test_text_that_is_not_valid_unicode_is_recorded_escaped(virtual_time, memory_repository):
    repo = _open(memory_repository(PARAMS))
    failures.record_failure(repo.manifests, "h\ud800", "u", "/srv/caf\udce9", "cannot read /srv/caf\udce9", 17)
    [f] = failures.read_failures(repo.manifests)
    assert (f.host, f.path, f.error) == ("h\\ud800", "/srv/caf\\xe9", "cannot read /srv/caf\\xe9")
