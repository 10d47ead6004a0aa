"""`kdist gc run`, `maintenance run|status` and `index compact|rebuild` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from kdist.cli import exit_codes
from kdist.cli.main import cli


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("KDIST_PASSWORD", "gc-cli")
    monkeypatch.setenv("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
    path = tmp_path / "repo"
    run("repo", "create", "--repo", path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
    run("snapshot", "create", "--repo", path, src)
    return path


def run(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def blobs(path) -> dict:
    return {p.name: p.stat().st_size for p in path.rglob("*") if p.is_file()}


def test_dry_run_changes_nothing_and_prints_the_plan(repo):
    before = blobs(repo)
    out = json.loads(run("gc", "run", "--repo", repo, "--dry-run", "--json").stdout)
    assert out["dry_run"] is True
    assert any(p.startswith("content GC:") for p in out["plans"]) and any(p.startswith("blob GC:") for p in out["plans"])
    assert blobs(repo) == before


def test_run_records_history_and_reports_requests(repo):
    out = json.loads(run("gc", "run", "--repo", repo, "--json").stdout)
    assert out["steps"]["content_gc"]["live"] > 0
    assert out["requests"]["LIST"]["calls"] > 0 and out["requests"]["GET"]["calls"] > 0
    status = json.loads(run("maintenance", "status", "--repo", repo, "--json").stdout)
    assert len(status) == 1 and status[0]["content_gc_completed"] is True
    run("maintenance", "run", "--repo", repo, "--quick")
    status = json.loads(run("maintenance", "status", "--repo", repo, "--json").stdout)
    assert [r["mode"] for r in status] == ["full", "quick"]
    table = run("maintenance", "status", "--repo", repo).stdout.splitlines()
    assert table[0].split()[:3] == ["started", "mode", "took"] and "manifests" in table[0]
    assert [line.split()[2] for line in table[1:]] == ["full", "quick"] and all(
        line.endswith("  ok") for line in table[1:])
    marked = status[0]["steps"]["content_gc"]["marked"]
    assert table[1].split()[5] == str(marked)  # the marked column holds the run's figure


def test_text_output_says_what_was_deleted_and_freed(repo):
    out = run("gc", "run", "--repo", repo).stdout
    assert "content GC:" in out and "pack rewrite:" in out
    assert "deleted 0 packs; 0 more found unreferenced" in out  # everything is young and referenced
    assert "freed 0" in out and "storage requests:" in out


def test_safety_none_is_refused_after_recent_writes(repo):
    r = run("gc", "run", "--repo", repo, "--safety", "none", code=exit_codes.FAILURE)
    assert "refusing --safety none" in r.stderr


def test_index_rebuild_recovers_lost_index_blobs(repo, tmp_path):
    for p in repo.rglob("x*"):
        if p.is_file():
            p.unlink()
    r = run("snapshot", "restore", "--repo", repo, "latest", tmp_path / "broken", code=exit_codes.PARTIAL)
    assert "not in the index" in r.stderr
    out = run("index", "rebuild", "--repo", repo).stdout
    assert "not in the index" in out and "wrote" in out
    run("snapshot", "restore", "--repo", repo, "latest", tmp_path / "fixed")
    assert (tmp_path / "fixed" / "f0").read_bytes() == (tmp_path / "src" / "f0").read_bytes()


def _du(path) -> tuple[int, int]:
    """What ``du`` counts: blocks of every file and directory, and the number of directories."""
    blocks = dirs = 0
    for p in [path, *path.rglob("*")]:
        blocks += p.lstat().st_blocks
        dirs += p.is_dir()
    return blocks, dirs


def _age(path, days: float = 2) -> None:
    old = time.time() - days * 86400
    for p in [*path.rglob("*"), path]:
        os.utime(p, (old, old), follow_symlinks=False)


def test_du_falls_when_maintenance_reclaims_space(repo, tmp_path):
    (repo / "abc" / "def").mkdir(parents=True)  # left by deleted blobs
    stale = repo / "xt1" / "234"
    stale.mkdir(parents=True)
    (stale / ".tmp-0123456789abcdef").write_bytes(os.urandom(300_000))  # a put cut by a kill
    snaps = json.loads(run("snapshot", "list", "--repo", repo, "--json").stdout)
    run("snapshot", "forget", "--repo", repo, *[a for s in snaps for a in ("--id", s["id"])])
    before = _du(repo)
    reclaimed = []
    while not reclaimed or not reclaimed[-1]["blob_gc"]["deleted_packs"]:  # mark, settle, drop, two phases
        assert len(reclaimed) < 8, json.dumps(reclaimed)
        _age(repo)  # --safety none refuses a repository written to in the last minutes
        reclaimed.append(json.loads(run("gc", "run", "--repo", repo, "--safety", "none", "--json").stdout)["steps"])
    after = _du(repo)
    assert not (stale / ".tmp-0123456789abcdef").exists() and not (repo / "abc").exists()
    assert reclaimed[0]["leftovers"]["temp_bytes"] == 300_000
    assert reclaimed[-1]["leftovers"]["directories"]  # the deleted packs' shard directories
    assert after[0] < before[0] - 300_000 // 512
    empty = [d for d in repo.rglob("*") if d.is_dir() and not any(d.iterdir())]
    assert all(d.stat().st_mtime > time.time() - 3600 for d in empty)  # only the last run's own probes'
    run("repo", "check", "--repo", repo)


def test_gc_without_ray_never_imports_ray(repo):
    code = ("import runpy, sys\n"
            f"sys.argv = ['kdist', 'gc', 'run', '--repo', {str(repo)!r}, '--json']\n"
            "try:\n    runpy.run_module('kdist.cli.main', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('ray' in sys.modules, 'kdist.gc.ray_pool' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"
