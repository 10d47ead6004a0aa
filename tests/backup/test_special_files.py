"""Fifos, sockets and device nodes: recorded by a backup (which exits 0), made again by a restore
(fifos; devices as root; sockets never), written to tar by dump, and refused by older readers
through the directory's version."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile

import msgpack
import pytest

from repo_format.errors import CorruptionError

from kdist.restore import Restorer
from kdist.snapshot import DIR_VERSION, decode_directory, encode_directory, read_directory
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import cli_env, run_cli

ROOT = os.geteuid() == 0


def special_tree(root) -> dict:
    """A file, a fifo, a listening socket's node and (as root) a character device; returns what
    each is, by name."""
    root.mkdir()
    (root / "plain").write_text("data\n")
    os.mkfifo(root / "queue", 0o640)
    os.utime(root / "queue", ns=(1_500_000_000_000_000_000,) * 2)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "control.sock"))
    sock.close()
    kinds = {"plain": "f", "queue": "p", "control.sock": "s"}
    if ROOT:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        kinds["null"] = "c"
    return kinds


def test_backup_records_them_and_exits_0(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    src = tmp_path / "src"
    kinds = special_tree(src)
    args = ["--repo", str(tmp_path / "repo")]
    run_cli("repo", "create", *args)
    out = json.loads(run_cli("snapshot", "create", *args, src, "--json").stdout)[0]  # exit 0, not 3
    assert out["totals"]["errors"] == 0 and out["totals"]["special"] == len(kinds) - 1
    rows = json.loads(run_cli("snapshot", "ls", *args, "latest", "--json").stdout)
    assert {r["path"]: r["type"] for r in rows} == kinds


def test_restore_makes_fifos_and_devices_and_says_which_it_did_not(repo, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    kinds = special_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    stats = Restorer(repo).restore(snap, str(dst))
    st = os.lstat(dst / "queue")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1_500_000_000_000_000_000
    assert not os.path.lexists(dst / "control.sock")  # a socket is its program's to make
    if ROOT:
        dev = os.lstat(dst / "null")
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
        assert (stats.special, stats.special_skipped) == (2, 1)
    else:
        assert (stats.special, stats.special_skipped) == (1, 1)
    assert stats.errors == 0 and set(kinds) >= {p.name for p in dst.iterdir()}
    again = Restorer(repo).restore(snap, str(dst))  # what exists and matches is kept
    assert again.special == 0 and again.unchanged == stats.files + stats.special
    alone = Restorer(repo).restore(snap, str(tmp_path / "one"), "queue")  # --include a fifo
    assert alone.special == 1 and stat.S_ISFIFO(os.lstat(tmp_path / "one" / "queue").st_mode)


def test_dump_writes_fifos_and_devices_to_tar(repo, tmp_path):
    from kdist.find import write_tar
    from kdist.snapshot import TYPE_DIR, Entry

    src = tmp_path / "src"
    kinds = special_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    buf = io.BytesIO()
    write_tar(repo, Entry(name="", type=TYPE_DIR, oid=snap.root), "", buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = {m.name: m for m in tar}
    assert "control.sock" not in members and members["queue"].isfifo()
    if "null" in kinds:
        assert members["null"].ischr() and (members["null"].devmajor, members["null"].devminor) == (1, 3)


def test_a_directory_with_special_entries_is_version_2(repo, tmp_path):
    """Older kdist refuses it by its version (it knows 1 only) instead of failing on a type."""
    src = tmp_path / "src"
    special_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    raw = repo.objects.read_all(snap.root)
    assert msgpack.unpackb(raw, raw=False)["v"] == 2
    entries = read_directory(repo.objects, snap.root)
    plain = [e for e in entries if e.type == "f"]
    assert msgpack.unpackb(encode_directory(plain), raw=False)["v"] == DIR_VERSION
    forged = msgpack.packb({"v": 1, "entries": [e.to_wire() for e in entries]}, use_bin_type=True)
    with pytest.raises(CorruptionError, match="version 1 holds special entries"):
        decode_directory(forged)
    fifo = next(e for e in entries if e.type == "p")
    for bad in ({"oid": plain[0].oid}, {"size": 5}, {"rdev": 7}):  # a special entry holds no data
        wire = {**fifo.to_wire(), **bad}
        with pytest.raises(CorruptionError, match="malformed metadata"):
            decode_directory(msgpack.packb({"v": 2, "entries": [wire]}, use_bin_type=True))
