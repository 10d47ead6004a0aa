"""``snapshot find``, ``dump`` and ``cat`` through the CLI, on the filesystem and S3 (moto):
which snapshots held a path, a directory as a tar stream, and a reader that goes away."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest

from kdist.cli import exit_codes
from kdist_trees import PASSWORD, cli_env, run_cli


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


@pytest.fixture
def repo_args(cli_repo_args):
    return cli_repo_args


def backup(repo_args, src) -> str:
    return json.loads(run_cli("snapshot", "create", *repo_args, src, "--json").stdout)[0]["id"]


@pytest.fixture
def nights(repo_args, tmp_path):
    """Three nightly snapshots of one tree: etc/foo in the first two (changed in the second),
    gone in the third."""
    src = tmp_path / "src"
    (src / "etc" / "ssh").mkdir(parents=True)
    (src / "home" / "ann" / "deep").mkdir(parents=True)
    (src / "etc" / "foo").write_text("first night\n")
    (src / "etc" / "ssh" / "sshd_config").write_text("PermitRootLogin no\n")
    (src / "home" / "ann" / ".bashrc").write_text("alias ll='ls -l'\n")
    (src / "home" / "ann" / "deep" / "Foo.TXT").write_text("upper case\n")
    os.symlink("../etc/foo", src / "home" / "ann" / "foo-link")
    ids = [backup(repo_args, src)]
    (src / "etc" / "foo").write_text("second night, longer\n")
    ids.append(backup(repo_args, src))
    (src / "etc" / "foo").unlink()
    ids.append(backup(repo_args, src))
    return src, ids


def find(repo_args, *args) -> list[dict]:
    return json.loads(run_cli("snapshot", "find", *repo_args, *args, "--json").stdout)


def test_find_answers_which_night_still_had_a_file(repo_args, nights):
    _src, ids = nights
    rows = find(repo_args, "/etc/foo")
    assert [r["snapshot"] for r in rows] == [ids[1], ids[0]]  # newest first; the third has none
    assert [r["matches"][0]["size"] for r in rows] == [len("second night, longer\n"), len("first night\n")]
    assert all(r["matches"][0]["path"] == "/etc/foo" and r["matches"][0]["mtime_ns"] > 0 for r in rows)
    assert find(repo_args, "/etc/foo", "--newest", "1") == []  # only the newest night is searched
    text = run_cli("snapshot", "find", *repo_args, "/etc/foo").stdout
    assert text.count("/etc/foo") == 2 and ids[1][:8] in text


def test_find_by_name_at_any_depth_and_by_path_patterns(repo_args, nights):
    _src, ids = nights
    newest = find(repo_args, "foo*", "--newest", "1")[0]["matches"]
    assert [m["path"] for m in newest] == ["/home/ann/foo-link"]  # names are case-sensitive
    assert [m["path"] for m in find(repo_args, "FOO*", "-i", "--newest", "1")[0]["matches"]] == [
        "/home/ann/deep/Foo.TXT", "/home/ann/foo-link"]
    assert [m["path"] for m in find(repo_args, "/home/**/.bashrc", "--newest", "1")[0]["matches"]] == [
        "/home/ann/.bashrc"]
    assert [m["path"] for m in find(repo_args, "/etc/*", "--newest", "1")[0]["matches"]] == ["/etc/ssh"]  # * stops at /
    assert [m["path"] for m in find(repo_args, "/etc/**", "--newest", "1")[0]["matches"]] == [
        "/etc/ssh", "/etc/ssh/sshd_config"]
    assert find(repo_args, "nothing-like-it") == []
    run_cli("snapshot", "find", *repo_args, "/", code=exit_codes.USAGE)


def test_dump_writes_a_directory_as_tar_with_its_metadata(repo_args, nights, tmp_path):
    src, _ids = nights
    os.chmod(src / "etc" / "ssh" / "sshd_config", 0o600)
    os.utime(src / "etc" / "ssh" / "sshd_config", ns=(1_600_000_000_123_456_789,) * 2)
    backup(repo_args, src)
    raw = run_cli("snapshot", "dump", *repo_args, "latest", "/etc").stdout_bytes
    assert b"mtime=1600000000.123456789" in raw  # pax times to the nanosecond
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        members = {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar}
    assert sorted(members) == ["etc", "etc/ssh", "etc/ssh/sshd_config"]
    info, data = members["etc/ssh/sshd_config"]
    st = os.stat(src / "etc" / "ssh" / "sshd_config")
    assert data == b"PermitRootLogin no\n" and info.mode == 0o600
    assert (info.uid, info.gid) == (st.st_uid, st.st_gid)
    assert abs(info.mtime - 1_600_000_000.123456789) < 1e-6  # pax keeps sub-second times
    assert members["etc/ssh"][0].isdir()
    # the whole snapshot, through GNU tar, and a symlink in it
    listed = subprocess.run(["tar", "-tv"], input=run_cli("snapshot", "dump", *repo_args, "latest").stdout_bytes,
                            capture_output=True, check=True).stdout.decode()
    assert "home/ann/foo-link -> ../etc/foo" in listed and "etc/ssh/sshd_config" in listed
    # one file: its bytes as they are
    assert run_cli("snapshot", "dump", *repo_args, "latest", "home/ann/.bashrc").stdout == "alias ll='ls -l'\n"
    run_cli("snapshot", "dump", *repo_args, "latest", "no/such/path", code=exit_codes.NOT_FOUND)


@pytest.mark.parametrize("command", [["cat", "big.bin"], ["dump", "/"]])
def test_a_reader_that_goes_away_ends_cat_and_dump_as_it_ends_cat(env, tmp_path, command):
    """``kdist snapshot cat ... | head -c 100``: killed by SIGPIPE, as cat is (exit status 141 in
    a shell), and nothing on standard error."""
    repo = tmp_path / "repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(8 << 20))
    run_cli("repo", "create", "--repo", repo)
    backup(["--repo", str(repo)], src)
    env_vars = {**os.environ, "KDIST_PASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "kdist.cli.main", "snapshot", command[0], "--repo", str(repo), "latest",
                             command[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_vars)
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGPIPE, (proc.returncode, err)
    assert err == b""
