"""Helpers shared by the snapshot-layer tests (a module of its own so tests can import it)."""

from __future__ import annotations

import hashlib
import os
import stat

from repo_format.repository import Repository

PASSWORD = "test-password"


def reopen(storage) -> Repository:
    return Repository.open(storage, PASSWORD)


def build_tree(root, big_size: int = 300 * 1024) -> None:
    """A tree with files, empty files and dirs, symlinks, odd names, modes and a sparse file."""
    os.makedirs(os.path.join(root, "docs", "deep", "er"))
    os.makedirs(os.path.join(root, "empty-dir"))
    with open(os.path.join(root, "docs", "readme.txt"), "w") as f:
        f.write("hello kdist\n" * 100)
    with open(os.path.join(root, "docs", "deep", "er", "random.bin"), "wb") as f:
        f.write(os.urandom(big_size))
    open(os.path.join(root, "empty-file"), "wb").close()
    for name in ("ünïcödé ✓.txt", "with space", "new\nline", "-dash", "a'quote\"", "tab\tname"):
        with open(os.path.join(root, name), "w") as f:
            f.write(name * 3)
    raw_name = os.fsdecode(b"latin1-\xe9t\xe9")  # not valid UTF-8
    with open(os.path.join(root, raw_name), "w") as f:
        f.write("bytes name")
    os.symlink("docs/readme.txt", os.path.join(root, "link-to-readme"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.seek(2 * 1024 * 1024)
        f.write(b"end")
    script = os.path.join(root, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o750)
    os.chmod(os.path.join(root, "docs", "readme.txt"), 0o640)
    os.utime(os.path.join(root, "docs", "readme.txt"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def tree_state(root) -> dict:
    """Everything a restore must reproduce: type, mode, mtime, size, content hash, link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            item = {"mode": stat.S_IMODE(st.st_mode), "type": stat.S_IFMT(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
                item["mtime_ns"] = st.st_mtime_ns
            elif stat.S_ISREG(st.st_mode):
                item["mtime_ns"] = st.st_mtime_ns
                with open(p, "rb") as f:
                    item["sha256"] = hashlib.sha256(f.read()).hexdigest()
            else:
                item["mtime_ns"] = st.st_mtime_ns
            state[rel] = item
    return state


def cli_env(monkeypatch) -> None:
    """The environment of a CLI test: the test password, the weak test KDF, no repository,
    endpoint, time limit, transfer limit or metrics target inherited from the shell (an exported
    KDIST_TIMEOUT would stop the test run itself)."""
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    monkeypatch.setenv("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
    for var in ("KDIST_REPO", "KDIST_ENDPOINT_URL", "KDIST_PASSWORD_FILE", "KDIST_TIMEOUT", "KDIST_REQUEST_TIMEOUT",
                "KDIST_LIMIT_UPLOAD", "KDIST_LIMIT_DOWNLOAD", "KDIST_METRICS_FILE", "KDIST_PUSHGATEWAY"):
        monkeypatch.delenv(var, raising=False)


def run_cli(*args, code=0, **kw):
    """Run ``kdist ARGS`` in-process; assert its exit code."""
    from click.testing import CliRunner

    from kdist.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr if hasattr(result, "stderr") else "")
    return result
