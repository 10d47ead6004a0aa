"""`kdist gc run`, `maintenance run|status` and `index compact|rebuild` through the CLI."""

from __future__ import annotations

import json
import os

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
