"""Prometheus metrics (``--metrics-file``, ``--pushgateway``): what a backup, maintenance and the
fleet's status write, and that the time of the last success survives failed runs."""

from __future__ import annotations

import http.server
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kdist.cli import exit_codes
from kdist_trees import build_tree, cli_env, run_cli


def samples(path) -> dict:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def repo(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    r = tmp_path / "repo"
    run_cli("repo", "create", "--repo", r)
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    return ["--repo", str(r)], src


def test_backup_metrics_and_the_last_success_surviving_a_failure(repo, tmp_path, monkeypatch):
    args, src = repo
    prom = tmp_path / "kdist.prom"
    run_cli("snapshot", "create", *args, src, "--host", "web1", "--metrics-file", prom)
    first = samples(prom)
    host = (("host", "web1"),)
    assert first[("kdist_backup_success", host)] == 1.0
    assert first[("kdist_backup_snapshots", host)] == 1.0 and first[("kdist_backup_files", host)] > 5
    assert first[("kdist_backup_new_bytes", host)] > 0 and first[("kdist_backup_errors", host)] == 0
    ok_at = first[("kdist_backup_last_success_timestamp_seconds", host)]
    assert ok_at == first[("kdist_backup_last_run_timestamp_seconds", host)]

    monkeypatch.setenv("KDIST_PASSWORD", "wrong")  # fails before the repository opens
    monkeypatch.setenv("KDIST_METRICS_FILE", str(prom))
    run_cli("snapshot", "create", *args, src, "--host", "web1", code=exit_codes.WRONG_PASSWORD)
    failed = samples(prom)
    assert failed[("kdist_backup_success", host)] == 0.0
    assert failed[("kdist_backup_last_success_timestamp_seconds", host)] == ok_at  # carried over
    assert failed[("kdist_backup_last_run_timestamp_seconds", host)] >= ok_at


def test_maintenance_and_fleet_status_metrics(repo, tmp_path):
    args, src = repo
    run_cli("snapshot", "create", *args, src, "--host", "web1")
    prom = tmp_path / "maintenance.prom"
    run_cli("maintenance", "run", *args, "--metrics-file", prom)
    m = samples(prom)
    assert m[("kdist_maintenance_success", (("mode", "full"),))] == 1.0
    assert m[("kdist_maintenance_requests_list", (("mode", "full"),))] > 0

    prom = tmp_path / "status.prom"
    run_cli("fleet", "status", *args, "--metrics-file", prom)
    s = samples(prom)
    where = (("host", "web1"), ("path", str(src)))
    assert s[("kdist_fleet_status_stale", where)] == 0.0 and s[("kdist_fleet_status_stale_sources", ())] == 0
    assert s[("kdist_fleet_status_last_snapshot_files", where)] > 5
    assert s[("kdist_fleet_status_last_snapshot_timestamp_seconds", where)] > 1.7e9


class _Gateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (the protocol's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Gateway.received.append((self.command, self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, *args):
        pass


def test_metrics_pushed_to_a_pushgateway_replace_only_what_they_send(repo):
    """A Pushgateway's protocol (POST: replace the metrics sent, keep the others of the group),
    received by a local HTTP server: no Pushgateway binary is available here."""
    args, src = repo
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Gateway.received = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        run_cli("snapshot", "create", *args, src, "--host", "web1", "--pushgateway", url)
        run_cli("snapshot", "create", "--repo", "/nonexistent", src, "--host", "web1", "--pushgateway", url,
                code=exit_codes.REPO_NOT_FOUND)
    finally:
        server.shutdown()
    (m1, path1, ok), (m2, path2, failed) = _Gateway.received
    assert m1 == m2 == "POST" and path1 == path2 == "/metrics/job/kdist_backup/host/web1"
    assert 'kdist_backup_success{host="web1"} 1.0' in ok and "kdist_backup_last_success_timestamp_seconds" in ok
    assert 'kdist_backup_success{host="web1"} 0.0' in failed
    assert "last_success" not in failed  # the gateway keeps the last success it was sent


def test_a_metrics_target_that_cannot_be_written_warns_and_the_backup_succeeds(repo, tmp_path):
    args, src = repo
    r = run_cli("snapshot", "create", *args, src, "--metrics-file", tmp_path / "no-such-dir" / "x.prom")
    assert "could not write metrics" in r.stderr


def test_a_directory_holds_one_file_per_kind_of_run(repo, tmp_path, monkeypatch):
    """One KDIST_METRICS_FILE for every cron line: a directory, where each kind of run and label
    set keeps its own file (one shared file would hold only the last run's series)."""
    args, src = repo
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    monkeypatch.setenv("KDIST_METRICS_FILE", str(textfiles))
    run_cli("snapshot", "create", *args, src, "--host", "web1")
    run_cli("maintenance", "run", *args, "--quick")
    run_cli("maintenance", "run", *args)
    monkeypatch.setenv("KDIST_PASSWORD", "wrong")
    run_cli("snapshot", "create", *args, src, "--host", "db1", code=exit_codes.WRONG_PASSWORD)
    assert sorted(p.name for p in textfiles.iterdir()) == ["kdist_backup_db1.prom", "kdist_backup_web1.prom",
                                                           "kdist_maintenance_full.prom",
                                                           "kdist_maintenance_quick.prom"]
    # db1's failure rewrote db1's file only: web1's last success is still there to alert on
    web1 = samples(textfiles / "kdist_backup_web1.prom")
    assert web1[("kdist_backup_success", (("host", "web1"),))] == 1.0
    assert ("kdist_backup_last_success_timestamp_seconds", (("host", "web1"),)) in web1
    assert samples(textfiles / "kdist_backup_db1.prom")[("kdist_backup_success", (("host", "db1"),))] == 0.0
    assert samples(textfiles / "kdist_maintenance_quick.prom")[("kdist_maintenance_success", (("mode", "quick"),))] \
        == 1.0
