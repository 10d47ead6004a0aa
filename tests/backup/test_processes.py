"""A tree backed up by several local processes (``kdist.processes``): the same snapshot as one
process writes, keys that never leave memory, and a killed process that loses nothing.

The processes are forked, and a process may only fork before it starts a thread (the pool
refuses otherwise): this test process has threads left by earlier tests, so every backup runs in
a fresh interpreter, as the CLI does, and its results are checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from kdist_trees import PASSWORD, build_tree, full_metadata, rich_tree, tree_state, without_socket

from repo_format import constants as C
from repo_format.session import unended_sessions
from repo_format.repository import Repository
from repo_format.storage import open_storage
from repo_format.storage.wrappers import CountingStorage

from kdist import processes
from kdist.cli import exit_codes
from kdist.cli.exit_codes import exit_code_for
from kdist.check import check_repository
from kdist.processes import ProcessPool, auto_processes
from kdist.restore import Restorer
from kdist.snapshot import list_snapshots
from kdist.uploader import BackupOptions, Uploader

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def many_files(root, dirs: int = 12, per_dir: int = 40) -> None:
    """Enough entries that the plan splits the tree into parts below the root, with loose files
    beside whole directories at the top."""
    build_tree(root, big_size=200 * 1024)
    for d in range(dirs):
        sub = root / f"d{d:02}" / ("inner" if d % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_dir):
            (sub / f"f{i:03}").write_bytes(os.urandom(200 + 37 * i))
    for i in range(30):
        (root / f"top{i:02}").write_bytes(os.urandom(100 + i))


def run_fresh(tmp_path, body: str) -> dict:
    """Run ``body`` in a fresh interpreter with ``repo`` (the test repository, opened) and
    ``src``; it prints one JSON object, which is returned. The repository is closed after."""
    script = tmp_path / "run_body.py"
    script.write_text(textwrap.dedent("""
        import json, os, signal, sys
        from repo_format.repository import Repository
        from repo_format.storage import open_storage
        from repo_format.storage.wrappers import CountingStorage
        from kdist.processes import ProcessPool
        from kdist.uploader import BackupOptions, Uploader
        repo = Repository.open(CountingStorage(open_storage(sys.argv[1])), sys.argv[3])
        src = sys.argv[2]

        def outcome(processes):
            try:
                with ProcessPool.fork(repo, processes) as pool:
                    pool.backup(src, BackupOptions())
                return {"raised": None}
            except Exception as exc:
                return {"raised": type(exc).__name__, "message": str(exc)}
    """) + textwrap.dedent(body) + "\nrepo.close()\n")
    env = dict(os.environ, KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "repo"), str(tmp_path / "src"), PASSWORD],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def reopen(tmp_path) -> Repository:
    return Repository.open(CountingStorage(open_storage(str(tmp_path / "repo"))), PASSWORD)


def test_processes_write_the_single_process_root_and_reuse_on_the_next_run(dir_repo, tmp_path):
    src = tmp_path / "src"
    many_files(src)
    rich_tree(src / "rich")  # links, attributes, ACLs (capabilities as root) in the parts
    os.setxattr(src, "user.top", b"the root's own, written by the parent")
    os.chmod(src, 0o751)
    got = run_fresh(tmp_path, """
        with ProcessPool.fork(repo, 3) as pool:
            first = pool.backup(src, BackupOptions())
            second = pool.backup(src, BackupOptions())  # unchanged: every file reused
        print(json.dumps({"roots": [first.root, second.root], "totals": [first.totals, second.totals],
                          "times": [first.start, first.end]}))
    """)
    repo = reopen(tmp_path)
    assert not unended_sessions(repo.storage)  # every process retired its session (an end marker each)
    single = Uploader(repo, BackupOptions(reuse_previous=False)).backup(str(src))
    first, second = got["totals"]
    assert got["roots"] == [single.root, single.root]
    assert first["files"] == single.totals["files"] > 400 and first["dirs"] == single.totals["dirs"]
    assert first["files_read"] == first["files"]
    assert second["files_reused"] == second["files"] and second["files_read"] == 0
    assert second["new_bytes"] < 20_000  # directory objects of the split directories at most
    assert got["times"][0] < got["times"][1]
    # the parts' checkpoints are gone and the data restores
    snaps = list_snapshots(repo.manifests, include_checkpoints=True)
    assert [s.checkpoint for s in snaps] == [False, False, False]
    out = tmp_path / "out"
    Restorer(repo).restore(snaps[1], str(out))
    assert full_metadata(out) == without_socket(full_metadata(src))  # (tree_state's and more)
    repo.close()


def test_a_killed_process_fails_the_backup_and_loses_nothing(dir_repo, tmp_path):
    src = tmp_path / "src"
    many_files(src, dirs=16)
    got = run_fresh(tmp_path, """
        real_read = Uploader._read_small

        def read_or_die(self, path, entry):  # inherited by the forked processes
            if os.path.basename(path) == "f007" and "d09" in path:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_read(self, path, entry)

        Uploader._read_small = read_or_die
        print(json.dumps({**outcome(2), "driver": repo.session}))
    """)
    assert got["raised"] == "BackupProcessDied" and "a backup process died" in got["message"]

    repo = reopen(tmp_path)
    assert not list_snapshots(repo.manifests)  # nothing was published
    kept = [s for s in list_snapshots(repo.manifests, include_checkpoints=True) if s.checkpoint]
    assert kept and all(s.run for s in kept)  # the finished parts' checkpoints keep their data
    # each names the parent, which publishes, as its driver (maintenance judges the part by that
    # session), and the parent's session marker was written before any part existed
    parts = repo.manifests.find(type="snapshot", checkpoint="1")
    assert {r.labels["driver"] for r in parts} == {got["driver"]}
    assert {r.labels["session"] for r in parts}.isdisjoint({got["driver"]})
    markers = [m for m in repo.storage.list(C.SESSION_PREFIX) if m.name.startswith(f"s{got['driver']}-b")]
    assert markers and min(m.timestamp for m in markers) <= min(r.stored for r in parts)
    report = check_repository(repo.storage, repo.format)
    assert report.healthy, report.problems
    again = Uploader(repo, BackupOptions()).backup(str(src))
    # the finished parts' data is reused: only what the other parts read is new, and the
    # directory objects (at most 150 bytes an entry)
    kept_data = sum(s.totals["bytes_read"] for s in kept)
    directories = 150 * (again.totals["files"] + again.totals["dirs"] + again.totals["symlinks"])
    assert 0 < kept_data and directories < kept_data
    assert again.totals["new_bytes"] <= again.totals["bytes_read"] - kept_data + directories, (again.totals, kept_data)
    out = tmp_path / "out"
    Restorer(repo).restore(again, str(out))
    assert tree_state(out) == tree_state(src)
    repo.close()
    assert check_repository(repo.storage, repo.format).healthy


def test_a_part_that_fails_fails_the_backup_with_its_own_error(dir_repo, tmp_path):
    src = tmp_path / "src"
    many_files(src)
    got = run_fresh(tmp_path, """
        from repo_format.errors import StorageUnreachable
        real_part = Uploader.backup_part

        def part_or_outage(self, part, *args):  # inherited by the forked processes
            if part.names and "d05" in part.names:
                raise StorageUnreachable("the storage went away (injected)")
            return real_part(self, part, *args)

        Uploader.backup_part = part_or_outage
        print(json.dumps(outcome(2)))
    """)
    # its own class, so the CLI exits with the outage's code (14)
    assert got == {"raised": "StorageUnreachable", "message": "the storage went away (injected)"}
    assert not list_snapshots(reopen(tmp_path).manifests)


def test_processes_need_a_storage_they_share_and_a_process_without_threads(repo, dir_repo):
    with pytest.raises(ValueError, match="not shared between processes"):
        ProcessPool.fork(repo, 2)  # in memory
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="before the process starts threads"):
            ProcessPool.fork(dir_repo, 2)
    finally:
        stop.set()
        t.join()


def test_auto_uses_one_process_for_small_trees_and_every_core_for_large_ones():
    assert auto_processes(100, cpus=8) == 1
    assert auto_processes(processes.AUTO_MIN_ENTRIES - 1, cpus=8) == 1
    assert auto_processes(2 * processes.AUTO_MIN_ENTRIES, cpus=8) == 2
    assert auto_processes(10**7, cpus=8) == 8
    assert auto_processes(10**9, cpus=64) == processes.AUTO_MAX_PROCESSES
    assert exit_code_for(processes.BackupProcessDied("gone")) == exit_codes.DISTRIBUTED_FAILED


@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_cli_processes_flag_gives_the_single_process_root(tmp_path, backend, request):
    """Over S3 too: each process makes an S3 client of its own after the fork."""
    src = tmp_path / "src"
    many_files(src, dirs=6, per_dir=20)
    where = {"KDIST_REPO": str(tmp_path / "clirepo")}
    if backend == "s3":  # the fixture puts the moto server's credentials in the environment
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        where = {"KDIST_REPO": f"s3://{bucket}/procs", "KDIST_ENDPOINT_URL": endpoint}
    env = dict(os.environ, KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1", KDIST_PASSWORD=PASSWORD,
               KDIST_CACHE_DIR=str(tmp_path / "cache"), **where)
    kdist = [sys.executable, "-m", "kdist.cli.main"]
    subprocess.run(kdist + ["repo", "create"], env=env, check=True, capture_output=True, timeout=120)
    roots = []
    for n in ("3", "1", "2"):
        p = subprocess.run(kdist + ["snapshot", "create", "--processes", n, "--json", str(src)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        snap = json.loads(p.stdout)[0]
        roots.append(snap["root"])
        assert snap["requests"]["PUT"]["calls"] > 0  # the processes' requests are counted too
    assert len(set(roots)) == 1
    usage = subprocess.run(kdist + ["snapshot", "create", "--help"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert f"{processes.AUTO_MIN_ENTRIES:,} entries per process" in " ".join(usage.stdout.split())
    bad = subprocess.run(kdist + ["snapshot", "create", "--processes", "0", str(src)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "number of processes" in bad.stderr
