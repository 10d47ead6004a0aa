"""``kdist mount``: the file system's operations tested directly (a machine without FUSE runs
them), following a content that maintenance moves while a file is open; and a real FUSE mount of
the filesystem and S3 backends through the CLI (CI installs fuse3 and sets KDIST_REQUIRE_FUSE)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from repo_format import clock
from repo_format.crypto import KdfParams
from repo_format.format_blob import RepositoryParameters
from repo_format.repository import Repository
from repo_format.safety import SAFETY_FULL
from repo_format.storage.memory import MemoryStorage

from kdist.gc.run import MaintenanceOptions, run_maintenance
from kdist.mount import REFRESH_SECONDS, FSError, SnapshotFS, snapshot_name
from kdist.snapshot import Source
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import PASSWORD, cli_env, rich_tree, run_cli


@pytest.fixture
def two_hosts(repo, tmp_path):
    src = tmp_path / "src"
    rich_tree(src)
    web = Uploader(repo, BackupOptions(tags=["nightly"])).backup(str(src), Source("web1", "root", "/srv"))
    (src / "plain").write_bytes(b"changed\n")
    web2 = Uploader(repo, BackupOptions()).backup(str(src), Source("web1", "root", "/srv"))
    db = Uploader(repo, BackupOptions()).backup(str(src), Source("db1", "root", "/var"))
    return repo, src, (web, web2, db)


def test_the_layout_metadata_and_bytes(two_hosts):
    repo, src, (web, web2, db) = two_hosts
    fs = SnapshotFS(repo)
    assert fs.readdir("/") == [".", "..", "hosts", "ids"]
    assert fs.readdir("/hosts") == [".", "..", "db1", "web1"]
    assert fs.readdir("/hosts/web1") == [".", ".."] + sorted([snapshot_name(web), snapshot_name(web2)]) + ["latest"]
    assert fs.readlink("/hosts/web1/latest") == snapshot_name(web2)
    assert fs.readlink(f"/ids/{db.id[:8]}") == f"../hosts/db1/{snapshot_name(db)}"
    top = f"/hosts/web1/{snapshot_name(web2)}"
    assert set(fs.readdir(top)) >= {"a", "b", "sub", "plain", "to-plain", "queue", "control.sock"}
    st = os.lstat(src)
    got = fs.getattr(top)
    assert (got["st_mode"], got["st_mtime"], got["st_uid"]) == (st.st_mode, st.st_mtime_ns, st.st_uid)
    for name in ("plain", "a", "sub/c", "acl"):
        st, got = os.lstat(src / name), fs.getattr(f"{top}/{name}")
        assert (got["st_mode"], got["st_size"], got["st_mtime"], got["st_uid"], got["st_gid"]) == (
            st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid), name
        fh = fs.open(f"{top}/{name}", os.O_RDONLY)
        try:
            assert fs.read(f"{top}/{name}", 1 << 20, 0, fh) == (src / name).read_bytes()
            assert fs.read(f"{top}/{name}", 4, 2, fh) == (src / name).read_bytes()[2:6]
        finally:
            fs.release(f"{top}/{name}", fh)
    assert stat.S_ISFIFO(fs.getattr(f"{top}/queue")["st_mode"])
    assert fs.readlink(f"{top}/to-plain") == "plain"
    assert sorted(fs.listxattr(f"{top}/plain")) == sorted(os.listxattr(src / "plain"))
    assert fs.getxattr(f"{top}/plain", "user.note") == os.getxattr(src / "plain", "user.note")
    old = f"/hosts/web1/{snapshot_name(web)}/plain"
    fh = fs.open(old, os.O_RDONLY)
    assert fs.read(old, 100, 0, fh) == b"plain\n"  # the first snapshot's own bytes
    fs.release(old, fh)


@pytest.mark.parametrize("call, code", [
    (lambda fs, top: fs.getattr("/hosts/nobody"), errno.ENOENT),
    (lambda fs, top: fs.getattr(f"{top}/missing"), errno.ENOENT),
    (lambda fs, top: fs.getattr(f"{top}/plain/below"), errno.ENOTDIR),
    (lambda fs, top: fs.open(f"{top}/plain", os.O_WRONLY), errno.EROFS),
    (lambda fs, top: fs.open(f"{top}/sub", os.O_RDONLY), errno.EISDIR),
    (lambda fs, top: fs.readdir(f"{top}/plain"), errno.ENOTDIR),
    (lambda fs, top: fs.getxattr(f"{top}/plain", "user.none"), errno.ENODATA),
    (lambda fs, top: fs.read(f"{top}/plain", 1, 0, 999), errno.EBADF),
])
def test_errors_are_errnos(two_hosts, call, code):
    repo, _src, (_web, web2, _db) = two_hosts
    with pytest.raises(FSError) as got:
        call(SnapshotFS(repo), f"/hosts/web1/{snapshot_name(web2)}")
    assert got.value.errno == code


def test_a_snapshot_published_while_mounted_appears_after_the_refresh(two_hosts, tmp_path):
    repo, src, _snaps = two_hosts
    now = [0.0]
    fs = SnapshotFS(repo, clock=lambda: now[0])
    before = fs.readdir("/hosts/db1")
    new = Uploader(repo, BackupOptions()).backup(str(src), Source("db1", "root", "/var"))
    assert fs.readdir("/hosts/db1") == before  # listed a moment ago
    now[0] += REFRESH_SECONDS + 1
    assert snapshot_name(new) in fs.readdir("/hosts/db1")
    assert fs.readlink("/hosts/db1/latest") == snapshot_name(new)


SAFETY = SAFETY_FULL.scaled(1 / 3600)
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})


def test_an_open_file_is_read_after_maintenance_moved_its_content(tmp_path):
    """Mounted before maintenance rewrites the mostly dead pack holding a file's data and
    deletes that pack: the file, opened before, still reads whole."""
    t = [1_800_000_000.0]
    storage = MemoryStorage(clock=lambda: t[0])
    clock.set_clock(lambda: t[0])
    clock.set_monotonic(lambda: t[0])
    try:
        Repository.create(storage, PASSWORD, PARAMS, KdfParams.weak_for_tests()).close()
        keep, junk = random.Random(1).randbytes(3000), random.Random(2).randbytes(40_000)
        src = tmp_path / "src"
        src.mkdir()
        (src / "keep").write_bytes(keep)
        (src / "junk").write_bytes(junk)
        writer = Repository.open(storage, PASSWORD, heartbeat_thread=False)
        first = Uploader(writer, BackupOptions()).backup(str(src))
        (src / "junk").unlink()
        t[0] += 1
        second = Uploader(writer, BackupOptions()).backup(str(src))
        writer.manifests.delete([first.id])
        writer.close()
        reader = Repository.open(storage, PASSWORD, heartbeat_thread=False)
        fs = SnapshotFS(reader)
        path = f"/hosts/{second.source.host}/{snapshot_name(second)}/keep"
        fh = fs.open(path, os.O_RDONLY)
        old_packs = {reader.contents.lookup(c).pack for c, _n in reader.objects.chunks(fs._entry_at(path).oid)}
        for _ in range(200):  # maintenance runs until a pack the reader knew the file in is gone
            t[0] += 0.5
            repo = Repository.open(storage, PASSWORD, heartbeat_thread=False)
            run_maintenance(repo, MaintenanceOptions())
            repo.close()
            if not all(any(m.name == p for m in storage.list(p)) for p in old_packs):
                break
        else:
            pytest.fail("maintenance never rewrote the pack")
        assert fs.read(path, 1 << 20, 0, fh) == keep
    finally:
        clock.set_clock(None)
        clock.set_monotonic(None)


def _fuse_ready() -> str:
    """Why a real mount cannot run here ("" if it can)."""
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "no /dev/fuse or fusermount3 (Debian: apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401  (loads libfuse)
    except (ImportError, OSError) as exc:
        return f"the FUSE binding cannot load libfuse: {exc}"
    return ""


@pytest.fixture
def fuse_ready():
    why = _fuse_ready()
    if why:
        if os.environ.get("KDIST_REQUIRE_FUSE") == "1":  # CI: a mount must run
            pytest.fail(why)
        pytest.skip(why)


@pytest.mark.parametrize("backend", ["fs", "s3"])
def test_a_real_mount_through_the_cli(fuse_ready, monkeypatch, tmp_path, request, backend):
    cli_env(monkeypatch)
    if backend == "fs":
        args = ["--repo", str(tmp_path / "repo")]
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        args = ["--repo", f"s3://{bucket}/mounted", "--endpoint-url", endpoint]
    run_cli("repo", "create", *args)
    src = tmp_path / "src"
    rich_tree(src)
    snap = json.loads(run_cli("snapshot", "create", *args, src, "--host", "web1", "--json").stdout)[0]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "kdist.cli.main", "mount", *map(str, args), str(mnt)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):  # a condition polled, with a deadline
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the mount did not appear within 60 s"
            time.sleep(0.05)
        top = mnt / "hosts" / "web1" / "latest"
        assert os.readlink(top).endswith(snap["id"][:8])
        assert sorted(os.listdir(mnt / "ids")) == [snap["id"][:8]]
        for name in ("plain", "a", "sub/c", "acl"):
            assert (top / name).read_bytes() == (src / name).read_bytes()
            st, got = os.lstat(src / name), os.lstat(top / name)
            assert (got.st_mode, got.st_size, got.st_mtime_ns, got.st_uid) == (
                st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid), name
        assert os.getxattr(top / "plain", "user.note") == os.getxattr(src / "plain", "user.note")
        assert os.readlink(top / "to-plain") == "plain"
        with pytest.raises(OSError) as refused:
            (top / "new").write_text("x")
        assert refused.value.errno == errno.EROFS
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, proc.stderr.read()[-2000:]
    assert not os.path.ismount(mnt)
