"""``snapshot create --stdin`` (a stream backed up as one file, in a source of its own) and
``--files-from``/``--files-from0`` (only the listed paths under one directory), through the CLI
on the filesystem and S3 (moto)."""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import replace

import pytest

from kdist.cli import exit_codes
from kdist.snapshot import Source, list_snapshots, read_directory
from kdist.uploader import BackupOptions, SourceError, Uploader
from kdist_trees import run_cli

MIB = 1024 * 1024


@pytest.fixture
def repo_args(cli_repo_args):
    return cli_repo_args


def created(result) -> dict:
    return json.loads(result.stdout)[0]


def test_stdin_is_one_file_in_a_source_of_its_own_and_deduplicates(repo_args, tmp_path):
    dump = os.urandom(3 * MIB) + b"the end\n"
    first = created(run_cli("snapshot", "create", *repo_args, "--stdin", "--stdin-filename", "db.sql", "--json",
                            input=dump))
    assert first["source"]["path"] == "stdin:db.sql" and first["totals"]["bytes"] == len(dump)
    assert first["totals"]["files"] == 1 and first["totals"]["errors"] == 0
    rows = json.loads(run_cli("snapshot", "ls", *repo_args, "latest", "--json").stdout)
    assert [(r["path"], r["type"], r["size"]) for r in rows] == [("db.sql", "f", len(dump))]
    assert run_cli("snapshot", "cat", *repo_args, "latest", "db.sql").stdout_bytes == dump
    run_cli("snapshot", "restore", *repo_args, "latest", tmp_path / "r")
    assert (tmp_path / "r" / "db.sql").read_bytes() == dump
    again = created(run_cli("snapshot", "create", *repo_args, "--stdin", "--stdin-filename", "db.sql", "--json",
                            input=dump))
    assert again["totals"]["new_bytes"] < 10_000  # the stream's chunks were all there: a directory at most
    listed = json.loads(run_cli("snapshot", "list", *repo_args, "--path", "stdin:db.sql", "--json").stdout)
    assert [s["id"] for s in listed] == [first["id"], again["id"]]


@pytest.mark.parametrize("args, message", [
    (["--stdin", "--stdin-filename", "a/b"], "a file name, without /"),
    (["--stdin", "--stdin-filename", ".."], "a file name, without /"),
    (["--stdin", "SOMEDIR"], "give no PATH"),
    ([], "give a directory to back up"),
])
def test_stdin_misuse_is_a_usage_error(repo_args, args, message):
    got = run_cli("snapshot", "create", *repo_args, *args, code=exit_codes.USAGE, input=b"x")
    assert message in got.output


def test_a_stream_that_fails_publishes_nothing_and_one_that_runs_long_is_checkpointed(repo, virtual_time):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError(5, "Input/output error")

    up = Uploader(repo, BackupOptions())
    with pytest.raises(SourceError, match="error while reading standard input: Input/output error"):
        up.backup_stream(Broken(), "x", Source("h", "u", "stdin:x"))
    assert list_snapshots(repo.manifests, include_checkpoints=True) == []

    up = Uploader(repo, BackupOptions(checkpoint_interval=60))
    seen = threading.Event()

    class Slow(io.RawIOBase):
        """Gives a chunk, lets an hour pass, and gives the rest once a checkpoint is listed."""

        def __init__(self):
            super().__init__()
            self.parts = [os.urandom(100_000), os.urandom(100_000)]

        def readable(self):
            return True

        def readinto(self, b):
            if len(self.parts) == 1:
                virtual_time[0] += 3600
                for _ in range(2000):  # (the uploader's wait wakes within 0.05 s; at most 100 s here)
                    if list_snapshots(repo.manifests, include_checkpoints=True):
                        seen.set()
                        break
                    threading.Event().wait(0.05)
            if not self.parts:
                return 0
            data = self.parts.pop(0)
            b[:len(data)] = data
            return len(data)

    snap = up.backup_stream(Slow(), "long.dump", Source("h", "u", "stdin:long.dump"))
    assert seen.is_set() and up.stats.checkpoints >= 1
    assert [s.id for s in list_snapshots(repo.manifests, include_checkpoints=True)] == [snap.id]  # superseded
    assert snap.totals["bytes"] == 200_000


def tree(src) -> None:
    for d in ("etc/ssh", "home/ann/docs", "home/bob", "var/log"):
        (src / d).mkdir(parents=True)
    for f in ("etc/hosts", "etc/ssh/sshd_config", "home/ann/docs/a.txt", "home/ann/docs/b.txt", "home/ann/.bashrc",
              "home/bob/notes", "var/log/syslog"):
        (src / f).write_text(f"{f}\n")


def paths_of(repo_args) -> list[str]:
    return sorted(r["path"] for r in json.loads(run_cli("snapshot", "ls", *repo_args, "latest", "-r", "--json").stdout))


def test_files_from_backs_up_only_the_listed_paths(repo_args, tmp_path, monkeypatch):
    src = tmp_path / "src"
    tree(src)
    monkeypatch.chdir(tmp_path)  # relative lines are relative to the working directory
    (tmp_path / "list").write_text("# changed today\nsrc/etc/hosts\n\nsrc/home/ann/docs\r\n"
                                   f"{src}/var/log/syslog\n")
    out = created(run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list", "--json"))
    assert out["totals"]["errors"] == 0 and out["totals"]["files"] == 4
    assert paths_of(repo_args) == ["etc", "etc/hosts", "home", "home/ann", "home/ann/docs", "home/ann/docs/a.txt",
                                   "home/ann/docs/b.txt", "var", "var/log", "var/log/syslog"]
    (tmp_path / "list0").write_bytes(b"src/home/bob/notes\0" + str(src / "etc").encode() + b"\0")
    run_cli("snapshot", "create", *repo_args, src, "--files-from0", tmp_path / "list0")
    assert paths_of(repo_args) == ["etc", "etc/hosts", "etc/ssh", "etc/ssh/sshd_config", "home", "home/bob",
                                   "home/bob/notes"]


@pytest.mark.parametrize("apart", [True, False], ids=["grouped-apart", "mutation-counted-with-the-whole"])
def test_partial_snapshots_do_not_push_the_whole_one_out_of_retention(repo_args, tmp_path, monkeypatch, apart):
    """Snapshots of only the listed paths are kept apart from their source's whole snapshots:
    after two of them, `forget --keep-last 1` keeps the whole snapshot (its files the lists did
    not name exist nowhere else) and one partial one. Counted together (the mutation), only
    one of the three is kept."""
    from kdist import snapshot

    if not apart:
        real = snapshot.group_key
        monkeypatch.setattr(snapshot, "group_key", lambda s, group_by: real(replace(s, partial=False), group_by))
    src = tmp_path / "src"
    tree(src)
    whole = created(run_cli("snapshot", "create", *repo_args, src, "--json"))
    assert whole["partial"] is False
    (tmp_path / "list").write_text(f"{src}/etc/hosts\n")
    parts = [created(run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list", "--json"))
             for _ in range(2)]
    assert [p["partial"] for p in parts] == [True, True]
    run_cli("snapshot", "forget", *repo_args, "--keep-last", "1")
    kept = [s["id"] for s in json.loads(run_cli("snapshot", "list", *repo_args, "--json").stdout)]
    # (which one of a group keep-last takes when storage times tie, S3's to the second, is not
    # fixed: counted with the whole one, keep-last 1 keeps one of the three)
    assert len(kept) == (2 if apart else 1)
    if apart:
        assert whole["id"] in kept and set(kept) - {whole["id"]} <= {p["id"] for p in parts}


def test_files_from_reports_what_it_could_not_back_up_and_refuses_paths_outside(repo_args, tmp_path):
    src = tmp_path / "src"
    tree(src)
    (tmp_path / "list").write_text(f"{src}/etc/hosts\n{src}/gone\n{src}/etc/hosts/not-a-dir\n"
                                   f"{src}/home/bob/notes/under-a-file\n")
    got = run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list", "--json",
                  code=exit_codes.PARTIAL)
    errors = {e["path"]: e["error"] for e in created(got)["errors"]}
    assert errors == {f"{src}/gone": "listed in --files-from, but it does not exist",
                      f"{src}/etc/hosts/not-a-dir": "listed in --files-from, but it does not exist",
                      f"{src}/home/bob/notes/under-a-file": "listed in --files-from, but it does not exist"}
    # a file on the way to a listed path is not listed itself: left out
    assert paths_of(repo_args) == ["etc", "etc/hosts", "home", "home/bob"]
    (tmp_path / "outside").write_text("/etc/passwd\n")
    got = run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "outside", code=exit_codes.USAGE)
    assert "/etc/passwd is not in" in got.output
    got = run_cli("snapshot", "create", *repo_args, src, src, "--files-from", tmp_path / "list", code=exit_codes.USAGE)
    assert "needs the one directory" in got.output


def test_files_from_excluded_paths_are_reported_and_unchanged_files_reused(repo_args, tmp_path):
    src = tmp_path / "src"
    tree(src)
    (tmp_path / "list").write_text(f"{src}/home/ann\n{src}/var/log/syslog\n")
    run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list")
    again = created(run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list", "--json"))
    assert again["totals"]["files_reused"] == again["totals"]["files"] == 4 and again["totals"]["files_read"] == 0
    got = run_cli("snapshot", "create", *repo_args, src, "--files-from", tmp_path / "list", "--exclude", "var",
                  "--json", code=exit_codes.PARTIAL)
    assert created(got)["errors"] == [{"path": f"{src}/var/log/syslog",
                                       "error": "listed in --files-from, but excluded, or not below a directory"}]


def test_a_listed_symlink_is_backed_up_as_a_symlink_never_followed(repo, tmp_path):
    src = tmp_path / "src"
    tree(src)
    os.symlink("/etc", src / "link")
    up = Uploader(repo, BackupOptions(files=[str(src / "link")]))
    snap = up.backup(str(src))
    (entry,) = read_directory(repo.objects, snap.root)
    assert (entry.name, entry.type, entry.target) == ("link", "l", "/etc") and up.stats.errors == 0


def test_a_list_as_find_prints_it_names_a_directory_and_what_is_in_it(repo, tmp_path):
    """``find src/home/ann > list``: the directory and each path below it, listed; nothing is
    reported missing."""
    src = tmp_path / "src"
    tree(src)
    listed = [str(src / "home" / "ann")] + [os.path.join(d, n) for d, dirs, files in os.walk(src / "home" / "ann")
                                            for n in dirs + files]
    up = Uploader(repo, BackupOptions(files=listed))
    up.backup(str(src))
    assert up.error_list == [] and up.stats.files == 3


def test_a_partial_snapshot_is_labelled_and_the_next_whole_backup_compares_with_a_whole_one(repo, tmp_path):
    from kdist.snapshot import PARTIAL_LABEL

    src = tmp_path / "src"
    tree(src)
    Uploader(repo, BackupOptions()).backup(str(src))
    part = Uploader(repo, BackupOptions(files=[str(src / "etc")]))
    partial = part.backup(str(src))
    assert part.stats.files_read == 0  # the listed files were reused from the whole snapshot
    labels = {r.id: r.labels for r in repo.manifests.find(type="snapshot")}
    assert labels[partial.id].get(PARTIAL_LABEL) == "1"
    whole = Uploader(repo, BackupOptions())
    after = whole.backup(str(src))
    assert PARTIAL_LABEL not in {r.id: r.labels for r in repo.manifests.find(type="snapshot")}[after.id]
    assert whole.stats.files_read == 0 and whole.stats.files_reused == 7  # not re-read outside the list
