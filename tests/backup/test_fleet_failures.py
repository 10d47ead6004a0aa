"""A failed backup leaves a failure record in the repository, and ``kdist fleet status`` shows it
(exit 22) until a later snapshot of the same host and path: the night's outcome, whatever
became of cron's mail or Ray's output. A host key records failures of its own host only."""

from __future__ import annotations

import json

import pytest

from kdist import failures
from kdist.cli import exit_codes
from kdist_trees import PASSWORD, cli_env, run_cli
from repo_format.repository import Repository
from repo_format.storage import open_storage


@pytest.fixture
def repo(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    run_cli("repo", "create", "--repo", tmp_path / "repo")
    return ["--repo", str(tmp_path / "repo")]


def _rows(out) -> dict:
    return {(s["host"], s["path"]): s for s in json.loads(out.stdout)["sources"]}


def test_a_failed_backup_shows_in_fleet_status_until_a_later_snapshot(repo, tmp_path):
    src = tmp_path / "srv"
    r = run_cli("snapshot", "create", *repo, "--host", "web1", src, code=exit_codes.SOURCE_OR_TARGET)
    assert "not recorded" not in r.stderr
    out = run_cli("fleet", "status", *repo, "--max-age", "1000d", code=exit_codes.STALE)
    row = next(line for line in out.stdout.splitlines() if line.startswith("web1"))
    assert str(src) in row and "FAILED" in row and "(exit 17)" in row and "cannot back up" in row
    assert f"1 of 1 failed since their last snapshot: web1:{src} (" in out.stderr
    doc = _rows(run_cli("fleet", "status", *repo, "--json", code=exit_codes.STALE))
    s = doc[("web1", str(src))]
    assert s["failing"] and s["failure_exit_code"] == exit_codes.SOURCE_OR_TARGET and s["snapshot"] == ""
    assert "No such file or directory" in s["failure"]

    src.mkdir()
    (src / "f").write_text("x")
    run_cli("snapshot", "create", *repo, "--host", "web1", src)  # the next night works
    doc = _rows(run_cli("fleet", "status", *repo, "--json"))
    s = doc[("web1", str(src))]
    assert not s["failing"] and s["snapshot"] and s["failed_at"] < s["time"]  # the failure is history

    src.rename(tmp_path / "moved")  # and the night after fails again: after its last snapshot
    run_cli("snapshot", "create", *repo, "--host", "web1", src, code=exit_codes.SOURCE_OR_TARGET)
    s = _rows(run_cli("fleet", "status", *repo, "--json", code=exit_codes.STALE))[("web1", str(src))]
    assert s["failing"] and s["failed_at"] > s["time"] and not s["stale"]


def test_a_failure_of_the_whole_host_is_each_of_its_paths(repo, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_cli("snapshot", "create", *repo, "--host", "web1", tmp_path / name)
    run_cli("snapshot", "create", *repo, "--host", "db1", tmp_path / "a")
    r = Repository.open(open_storage(repo[1]), PASSWORD)
    failures.record_failure(r.manifests, "web1", "", "", "the node or its backup actor died", 18, run="r1")
    failures.record_failure(r.manifests, "web2", "", "", "cannot read /etc/kdist/pw", 18, run="r1")
    r.close()
    doc = _rows(run_cli("fleet", "status", *repo, "--json", code=exit_codes.STALE))
    assert doc[("web1", str(tmp_path / "a"))]["failing"] and doc[("web1", str(tmp_path / "b"))]["failing"]
    assert not doc[("db1", str(tmp_path / "a"))]["failing"]
    assert doc[("web2", "")]["failing"] and doc[("web2", "")]["stale"]  # never backed up at all
    # filters apply: --host db1 shows only db1, which is fine
    assert set(_rows(run_cli("fleet", "status", *repo, "--host", "db1", "--json"))) == {("db1", str(tmp_path / "a"))}


def test_a_host_key_records_its_own_failures_and_no_other_hosts(repo, tmp_path, monkeypatch):
    pw = tmp_path / "web1-pw"
    pw.write_text("web1-password\n")
    run_cli("key", "add", *repo, "--role", "host", "--host", "web1", "--new-password-file", pw)
    monkeypatch.delenv("KDIST_PASSWORD")
    as_web1 = [*repo, "--password-file", pw]
    run_cli("snapshot", "create", *as_web1, tmp_path / "missing", code=exit_codes.SOURCE_OR_TARGET)
    host = Repository.open(open_storage(repo[1]), "web1-password")
    failures.record_failure(host.manifests, "db1", "", "/srv", "forged: db1 is broken", 1)  # not its host
    host.close()
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    doc = _rows(run_cli("fleet", "status", *repo, "--json", code=exit_codes.STALE))
    assert set(doc) == {("web1", str(tmp_path / "missing"))}  # the forged one is no row
    assert doc[("web1", str(tmp_path / "missing"))]["failing"]
    # the host itself sees its own host only
    mine = _rows(run_cli("fleet", "status", *as_web1, "--json", env={"KDIST_PASSWORD": None},
                         code=exit_codes.STALE))
    assert set(mine) == {("web1", str(tmp_path / "missing"))}
    check = run_cli("repo", "check", *repo, code=exit_codes.CORRUPTION)
    assert "wrote a record for host 'db1'" in check.stdout + check.stderr


def test_fleet_status_metrics_name_the_failing(repo, tmp_path):
    run_cli("snapshot", "create", *repo, "--host", "web1", tmp_path / "missing", code=exit_codes.SOURCE_OR_TARGET)
    prom = tmp_path / "status.prom"
    run_cli("fleet", "status", *repo, "--metrics-file", prom, code=exit_codes.STALE)
    text = prom.read_text()
    where = f'host="web1",path="{tmp_path / "missing"}"'
    assert f"kdist_fleet_status_failing{{{where}}} 1.0" in text
    assert f"kdist_fleet_status_last_failure_timestamp_seconds{{{where}}}" in text
    assert "kdist_fleet_status_failing_sources 1.0" in text


def test_a_path_that_is_not_valid_unicode_keeps_its_own_error(repo, tmp_path):
    """A file name's undecodable bytes reach kdist as surrogates, which msgpack cannot pack: the
    record keeps them escaped, and the backup still exits with its own error (17), not 1."""
    import os

    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    r = run_cli("snapshot", "create", *repo, "--host", "web1", odd, code=exit_codes.SOURCE_OR_TARGET)
    assert "not recorded" not in r.stderr
    [f] = failures.read_failures(Repository.open(open_storage(repo[1]), PASSWORD).manifests)
    assert f.path == f"{tmp_path}/caf\\xe9" and f.exit_code == exit_codes.SOURCE_OR_TARGET


def test_fleet_clear_forgets_a_failure_that_will_not_recur(repo, tmp_path, monkeypatch):
    (tmp_path / "srv").mkdir()
    run_cli("snapshot", "create", *repo, "--host", "web1", tmp_path / "srv")
    run_cli("snapshot", "create", *repo, "--host", "web1", tmp_path / "typo", code=exit_codes.SOURCE_OR_TARGET)
    run_cli("fleet", "status", *repo, code=exit_codes.STALE)  # the typo's row: FAILED
    out = run_cli("fleet", "clear", *repo, "--host", "web1", "--path", tmp_path / "typo", "--dry-run")
    assert "would clear: web1:" in out.stdout and len(failures.read_failures(
        Repository.open(open_storage(repo[1]), PASSWORD).manifests)) == 1
    pw = tmp_path / "web1-pw"
    pw.write_text("web1-password\n")
    run_cli("key", "add", *repo, "--role", "host", "--host", "web1", "--new-password-file", pw)
    run_cli("fleet", "clear", *repo, "--host", "web1", "--password-file", pw, code=exit_codes.PERMISSION)
    out = run_cli("fleet", "clear", *repo, "--host", "web1", "--path", tmp_path / "typo")
    assert "cleared: web1:" in out.stdout
    doc = _rows(run_cli("fleet", "status", *repo, "--json"))  # exit 0: the real path is fine
    assert set(doc) == {("web1", str(tmp_path / "srv"))}
    assert "no recorded failures match" in run_cli("fleet", "clear", *repo, "--host", "web1").stdout


def test_a_host_whose_clock_is_behind_recovers_by_the_storage_clock(repo, tmp_path):
    """The failure was recorded by a machine whose clock is right; the rerun that worked ran on a
    host whose clock is two hours behind, so its snapshot claims to be older than the failure.
    Which came first is read from the storage's clock: the host is not FAILED."""
    from repo_format import clock

    src = tmp_path / "srv"
    run_cli("snapshot", "create", *repo, "--host", "web1", src, code=exit_codes.SOURCE_OR_TARGET)
    src.mkdir()
    now = clock.now()
    clock.set_clock(lambda: now - 7200)
    try:
        run_cli("snapshot", "create", *repo, "--host", "web1", src)
    finally:
        clock.set_clock(None)
    s = _rows(run_cli("fleet", "status", *repo, "--json"))[("web1", str(src))]
    assert s["failed_at"] > s["time"] and not s["failing"]
