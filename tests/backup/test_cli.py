"""The kdist CLI end to end: click's runner, a real subprocess, the filesystem and S3 (moto)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys

import pytest

from kdist.cli import exit_codes
from kdist_trees import PASSWORD, build_tree, cli_env, run_cli, tree_state


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


def run(*args, code=0, **kw):
    return run_cli(*args, code=code, **kw)


@pytest.fixture
def fs_repo(env, tmp_path):
    repo = tmp_path / "repo"
    run("repo", "create", "--repo", repo)
    return ["--repo", str(repo)]


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    return src


def check_roundtrip(repo_args, src, dst):
    out = run("snapshot", "create", *repo_args, src, "--json")
    created = json.loads(out.stdout)
    assert created[0]["totals"]["errors"] == 0
    made = created[0]["requests"]  # storage requests by kind: packs, index blob, manifest, session markers
    assert made["PUT"]["calls"] >= 4 and made["PUT"]["bytes"] > 0
    assert made["DELETE"]["calls"] == 0  # a backup only adds blobs (its session ends with an end marker)
    listed = json.loads(run("snapshot", "list", *repo_args, "--json").stdout)
    assert [s["id"] for s in listed] == [created[0]["id"]]
    assert listed[0]["source"]["path"] == str(src)
    restored = json.loads(run("snapshot", "restore", *repo_args, created[0]["id"][:8], dst, "--json").stdout)
    assert restored["requests"]["GET"]["calls"] >= 1 and restored["requests"]["PUT"]["calls"] == 0
    assert tree_state(str(dst)) == tree_state(str(src))
    run("snapshot", "verify", *repo_args, "latest")
    return created[0]


def test_filesystem_roundtrip_and_inspection(fs_repo, tree, tmp_path):
    snap = check_roundtrip(fs_repo, tree, tmp_path / "dst")
    out = run("snapshot", "ls", *fs_repo, "latest", "docs", "--json").stdout
    assert {e["path"] for e in json.loads(out)} == {"docs/deep", "docs/readme.txt"}
    assert run("snapshot", "cat", *fs_repo, "latest", "docs/readme.txt").stdout_bytes == (tree / "docs" / "readme.txt").read_bytes()
    (tree / "docs" / "readme.txt").write_text("changed")
    second = json.loads(run("snapshot", "create", *fs_repo, tree, "--json").stdout)[0]
    assert second["totals"]["files_read"] == 1
    out = run("snapshot", "diff", *fs_repo, snap["id"][:8], "latest", "--json").stdout
    assert json.loads(out) == [{"change": "M", "path": "docs/readme.txt"}]
    status = json.loads(run("repo", "status", *fs_repo, "--json").stdout)
    assert status["encryption"] == "aes-256-gcm" and status["blobs"]["p"]["count"] >= 1


def test_s3_roundtrip(env, s3_bucket, tree, tmp_path):
    endpoint, bucket = s3_bucket
    repo_args = ["--repo", f"s3://{bucket}/team/backups", "--endpoint-url", endpoint]
    run("repo", "create", *repo_args)
    check_roundtrip(repo_args, tree, tmp_path / "dst")


def test_large_file_over_100_mib(fs_repo, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    half = os.urandom(55 << 20)
    digest = hashlib.sha256()
    with open(src / "large.bin", "wb") as f:
        for _ in range(2):  # 110 MiB: the second half repeats the first, so it deduplicates
            f.write(half)
            digest.update(half)
    snap = json.loads(run("snapshot", "create", *fs_repo, src, "--json").stdout)[0]
    assert snap["totals"]["bytes"] == 110 << 20
    # the repeated half is stored once; around the seam, up to two chunks (4 MiB max each) are new
    assert snap["totals"]["new_bytes"] <= (55 << 20) + 2 * (4 << 20)
    run("snapshot", "restore", *fs_repo, "latest", tmp_path / "out")
    with open(tmp_path / "out" / "large.bin", "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest.hexdigest()


def test_wrong_password(fs_repo, monkeypatch):
    monkeypatch.setenv("KDIST_PASSWORD", "not-the-password")
    r = run("snapshot", "list", *fs_repo, code=exit_codes.WRONG_PASSWORD)
    assert "wrong password" in r.stderr and "not-the-password" not in r.output


def test_password_file(fs_repo, monkeypatch, tmp_path):
    monkeypatch.delenv("KDIST_PASSWORD")
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    run("snapshot", "list", *fs_repo, "--password-file", pw)
    pw.write_text("wrong\n")
    run("snapshot", "list", *fs_repo, "--password-file", pw, code=exit_codes.WRONG_PASSWORD)


def test_missing_repository(env, tmp_path):
    r = run("snapshot", "list", "--repo", tmp_path / "nothing-here", code=exit_codes.REPO_NOT_FOUND)
    assert "no kdist repository" in r.stderr


def test_repository_exists(fs_repo):
    run("repo", "create", *fs_repo, code=exit_codes.REPO_EXISTS)


def test_missing_source(fs_repo, tmp_path):
    r = run("snapshot", "create", *fs_repo, tmp_path / "missing", code=exit_codes.SOURCE_OR_TARGET)
    assert "No such file" in r.stderr


def test_unknown_and_ambiguous_snapshot(fs_repo, tree):
    run("snapshot", "create", *fs_repo, tree)
    r = run("snapshot", "restore", *fs_repo, "0123456789abcdef", "/tmp/x", code=exit_codes.NOT_FOUND)
    assert "no snapshot" in r.stderr
    run("snapshot", "ls", *fs_repo, "latest", "no/such/path", code=exit_codes.NOT_FOUND)


def test_usage_error(fs_repo):
    run("snapshot", "restore", *fs_repo, code=exit_codes.USAGE)
    run("snapshot", "forget", *fs_repo, code=exit_codes.USAGE)  # no policy: refuse to forget everything


def test_partial_backup_exit_code(fs_repo, tree, monkeypatch):
    from kdist import uploader

    real = uploader.os.open
    monkeypatch.setattr(uploader.os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(p).endswith("run.sh") else real(p, *a, **k))
    r = run("snapshot", "create", *fs_repo, tree, code=exit_codes.PARTIAL)
    assert "run.sh" in r.stderr and "Permission denied" in r.stderr


def test_corrupted_pack_during_restore_is_partial(fs_repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    run("snapshot", "create", *fs_repo, src)
    repo_dir = tmp_path / "repo"
    packs = sorted(p for p in repo_dir.rglob("p*") if p.is_file())
    data = bytearray(packs[0].read_bytes())
    data[100] ^= 1
    packs[0].write_bytes(bytes(data))
    r = run("snapshot", "restore", *fs_repo, "latest", tmp_path / "dst", code=exit_codes.PARTIAL)
    assert "failed authentication" in r.stderr
    r = run("snapshot", "verify", *fs_repo, "latest", code=exit_codes.CORRUPTION)
    assert "damaged" in r.stderr


def test_full_target_disk(fs_repo, tree, tmp_path, monkeypatch):
    run("snapshot", "create", *fs_repo, tree)
    from kdist import restore

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(restore.os, "write", full)
    r = run("snapshot", "restore", *fs_repo, "latest", tmp_path / "dst", code=exit_codes.SOURCE_OR_TARGET)
    assert "full" in r.stderr


def test_forget_with_policy_and_dry_run(fs_repo, tree):
    for _ in range(3):
        run("snapshot", "create", *fs_repo, tree)
    plan = json.loads(run("snapshot", "forget", *fs_repo, "--keep-last", "1", "--dry-run", "--json").stdout)
    assert len(plan["forget"]) == 2 and len(plan["keep"]) == 1
    assert len(json.loads(run("snapshot", "list", *fs_repo, "--json").stdout)) == 3
    run("snapshot", "forget", *fs_repo, "--keep-last", "1")
    remaining = json.loads(run("snapshot", "list", *fs_repo, "--json").stdout)
    assert [s["id"] for s in remaining] == plan["keep"]
    assert plan["reasons"] == {plan["keep"][0]: ["last"]}


def test_change_password(fs_repo, monkeypatch):
    monkeypatch.setenv("KDIST_NEW_PASSWORD", "second-password")
    run("repo", "change-password", *fs_repo)
    run("repo", "connect", *fs_repo, code=exit_codes.WRONG_PASSWORD)
    monkeypatch.setenv("KDIST_PASSWORD", "second-password")
    run("repo", "connect", *fs_repo)


def test_real_subprocess(env, tree, tmp_path):
    repo = tmp_path / "repo"
    kdist = [sys.executable, "-m", "kdist.cli.main"]
    environ = dict(os.environ)

    def sh(*args, code=0):
        p = subprocess.run(kdist + [str(a) for a in args], env=environ, capture_output=True, text=True, timeout=120)
        assert p.returncode == code, p.stderr
        return p

    sh("repo", "create", "--repo", repo)
    sh("snapshot", "create", "--repo", repo, tree)
    listing = sh("snapshot", "list", "--repo", repo).stdout
    assert "1 snapshot(s)" in listing and str(tree) in listing
    sh("snapshot", "restore", "--repo", repo, "latest", tmp_path / "dst")
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(tree))
    environ["KDIST_PASSWORD"] = "wrong"
    assert "wrong password" in sh("snapshot", "list", "--repo", repo, code=exit_codes.WRONG_PASSWORD).stderr


def test_unusable_restore_target(fs_repo, tree, tmp_path):
    run("snapshot", "create", *fs_repo, tree)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run("snapshot", "restore", *fs_repo, "latest", blocker / "sub", code=exit_codes.SOURCE_OR_TARGET)
    assert "cannot use" in r.stderr
