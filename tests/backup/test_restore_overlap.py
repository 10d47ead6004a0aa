"""Restore with the small files restored by the walking thread, or by a pool while creating files
is slow: the tree and its metadata stay exact, the directory file descriptors stay bounded, and a
failure stops the restore (or is reported) as before, in either lane."""

from __future__ import annotations

import errno
import itertools
import os
import random
import resource
import stat
import threading
import time

import pytest

from kdist import restore as restore_module
from kdist.restore import MAX_OPEN_DIRS, SMALL_FILE_SIZE, Restorer, TargetFull
from kdist.uploader import BackupOptions, Uploader
from repo_format.errors import StorageUnreachable

from kdist_trees import build_tree, tree_state

CHAINS, CHAIN_DEPTH = 12, 30
WIDE, WIDE_SUB = 16, 12
CROWDED = "0-crowded"  # walked first: its first batch is what the walker measures itself by
CROWDED_FILES = 130  # several batches
T0 = 1_500_000_000_000_000_000


def _write(path, data: bytes, mode: int, mtime_ns: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _overlap_tree(root, seed: int = 7) -> int:
    """Deep chains with files at the bottom, wide directories of a few files, one crowded
    directory, large files, symlinks and build_tree's odd entries; every mode and mtime set,
    the directories' last (deepest first), to old values that creating a child would change.
    Returns the number of directories."""
    rng = random.Random(seed)
    modes = [0o644, 0o600, 0o640, 0o755, 0o444]
    leaves = []
    for c in range(CHAINS):
        leaf = os.path.join(root, f"chain{c:02d}", *[f"d{i}" for i in range(CHAIN_DEPTH - 1)])
        os.makedirs(leaf)
        leaves.append(leaf)
    for w in range(WIDE):
        for s in range(WIDE_SUB):
            leaf = os.path.join(root, f"wide{w:02d}", f"s{s:02d}")
            os.makedirs(leaf)
            leaves.append(leaf)
    for i, leaf in enumerate(leaves):
        for j in range(rng.randint(1, 4)):
            _write(os.path.join(leaf, f"f{j}"), rng.randbytes(rng.randint(0, 3000)), rng.choice(modes),
                   T0 + rng.randrange(10**18))
        if i % 9 == 0:
            os.symlink(f"../f{i}", os.path.join(leaf, "link"))
            os.utime(os.path.join(leaf, "link"), ns=(T0 + i, T0 + i), follow_symlinks=False)
        if i % 50 == 0:
            _write(os.path.join(leaf, "large"), rng.randbytes(SMALL_FILE_SIZE * 3), 0o640, T0 + i)
    crowded = os.path.join(root, CROWDED)
    os.mkdir(crowded)
    for j in range(CROWDED_FILES):
        _write(os.path.join(crowded, f"c{j:03d}"), rng.randbytes(rng.randint(1, 1500)), 0o644, T0 + j)
    os.mkdir(os.path.join(root, "mixed"))
    build_tree(os.path.join(root, "mixed"), big_size=100 * 1024)
    dirs = 0
    for dirpath, _dirnames, _files in os.walk(root, topdown=False):
        if dirpath != str(root):
            dirs += 1
            os.chmod(dirpath, rng.choice([0o755, 0o750, 0o700, 0o711]))
            os.utime(dirpath, ns=(T0 + dirs * 1_000_000_007, T0 + dirs * 1_000_000_007))
    return dirs


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    dirs = _overlap_tree(str(src))
    return src, dirs


def _backup(repo, src):
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    assert snap.totals["errors"] == 0
    return snap


def _use_lane(monkeypatch, lane: str) -> None:
    """Who restores the small files: the walker (as where creating files is fast), or the pool
    (slow) after the walker's first measured batch, for the whole restore."""
    monkeypatch.setattr(restore_module, "SLOW_FILE_SECONDS", float("inf") if lane == "walker" else 0.0)
    monkeypatch.setattr(restore_module, "POOL_SECONDS", (3600.0, 3600.0))


@pytest.fixture(params=["walker", "pool"])
def lane(request, monkeypatch):
    _use_lane(monkeypatch, request.param)
    return request.param


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _restore_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kdist-restore")]


def test_tree_with_more_directories_than_the_fd_limit_restores_exactly(repo, source, tmp_path, monkeypatch,
                                                                      lane):
    """The chains' files are slow to write, so that in the pool their directories stay pending
    while the walker goes on: the restore holds no more directories open than it may (the soft
    fd limit is far below the number of directories), and each directory's mode and mtime are
    set after its last child (the source's old mtimes would be lost to any later create)."""
    src, dirs = source
    snap = _backup(repo, src)
    real_write = os.write

    def slow_in_chains(fd, data):
        if "/chain" in os.readlink(f"/proc/self/fd/{fd}"):
            time.sleep(0.05)
        return real_write(fd, data)

    monkeypatch.setattr(restore_module.os, "write", slow_in_chains)
    restorer = Restorer(repo)
    limit = _open_fds() + MAX_OPEN_DIRS + CHAIN_DEPTH + 2 * restorer.workers + 16
    assert dirs > 2 * limit  # holding every directory (or every chain) open would run out of fds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        stats = restorer.restore(snap, str(tmp_path / "dst"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert stats.errors == 0, stats.error_list[:3]
    expected = tree_state(str(src))
    assert tree_state(str(tmp_path / "dst")) == expected
    assert stats.dirs == dirs
    assert stats.files == sum(1 for v in expected.values() if v["type"] == stat.S_IFREG)
    assert stats.symlinks == sum(1 for v in expected.values() if v["type"] == stat.S_IFLNK)
    assert stats.bytes == sum(os.lstat(src / p).st_size for p, v in expected.items() if v["type"] == stat.S_IFREG)
    assert not _restore_threads()


class _WriteClock:
    """The restore's clock, advanced by the writes alone (3 ms each for the first ``slow``, 100 us
    after): what the walker measures is the test's, not the machine's load."""

    def __init__(self, slow: int):
        self.now, self.slow, self.writers = 0.0, slow, []
        self._lock = threading.Lock()

    def write(self, fd, data, real_write=os.write):
        with self._lock:
            self.writers.append(threading.current_thread().name)
            self.now += 0.003 if len(self.writers) <= self.slow else 0.0001
        return real_write(fd, data)

    def perf_counter(self) -> float:
        with self._lock:
            return self.now

    monotonic = perf_counter


def test_the_pool_takes_the_files_while_creating_them_is_slow_and_hands_them_back(repo, tmp_path, monkeypatch):
    """Writes take 3 ms for a while, then 0.1 ms: the walker measures itself slow and the pool
    restores files, then, measuring again once a pool period is over, the walker restores the
    rest itself."""
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d:02d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02d}" / f"f{f:03d}").write_bytes(os.urandom(100))
    snap = _backup(repo, src)
    monkeypatch.setattr(restore_module, "SLOW_FILE_SECONDS", 0.001)
    monkeypatch.setattr(restore_module, "POOL_SECONDS", (0.05, 0.05))
    # how far the walker may queue ahead of the pool, bounded (1 batch of 48 per worker, 2
    # workers): else, as fast as the threads happen to run, it could queue 32 batches (1536
    # files) before the pool's 500 writes end its period, and keep fewer than 2000 itself
    monkeypatch.setattr(restore_module, "TASKS_PER_WORKER", 1)
    clock = _WriteClock(slow=200)
    monkeypatch.setattr(restore_module, "time", clock)
    monkeypatch.setattr(restore_module.os, "write", clock.write)
    stats = Restorer(repo, workers=2).restore(snap, str(tmp_path / "dst"))
    assert stats.errors == 0 and stats.files == 3000
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))
    writers = clock.writers
    assert any(w.startswith("kdist-restore") for w in writers[:200])
    # a pool period at fast writes ends within 500 of them (plus what is queued and running, at
    # most 4 batches); the walker then keeps the rest
    assert writers[200:].count(threading.current_thread().name) >= 2000


def test_second_restore_into_the_same_target_keeps_what_matches(repo, source, tmp_path):
    src, _dirs = source
    snap = _backup(repo, src)
    dst = tmp_path / "dst"
    first = Restorer(repo).restore(snap, str(dst))
    again = Restorer(repo, overwrite="never").restore(snap, str(dst))
    assert again.errors == 0 and again.files == again.symlinks == 0
    assert again.skipped_existing == first.files + first.symlinks
    changed = Restorer(repo, overwrite="if-changed").restore(snap, str(dst))  # symlinks that match stay too
    assert changed.unchanged == changed.skipped_existing == first.files + first.symlinks and changed.files == 0
    assert tree_state(str(dst)) == tree_state(str(src))


def test_subpath_and_single_file(repo, source, tmp_path):
    src, _dirs = source
    snap = _backup(repo, src)
    sub = "chain03/" + "/".join(f"d{i}" for i in range(5))
    stats = Restorer(repo).restore(snap, str(tmp_path / "sub"), sub)
    assert stats.errors == 0 and stats.dirs == CHAIN_DEPTH - 1 - 5
    assert tree_state(str(tmp_path / "sub")) == tree_state(str(src / sub))
    stats = Restorer(repo).restore(snap, str(tmp_path / "one"), f"{CROWDED}/c007")
    assert (stats.files, stats.dirs) == (1, 0)
    assert tree_state(str(tmp_path / "one")) == {"c007": tree_state(str(src / CROWDED))["c007"]}


def test_full_disk_midway_stops_with_target_full_and_no_thread_writes_after(repo, source, tmp_path, monkeypatch,
                                                                             lane):
    src, _dirs = source
    snap = _backup(repo, src)
    calls = itertools.count()
    real_write = os.write
    allowed = 200

    def filling(fd, data):
        time.sleep(0.0005)
        if next(calls) >= allowed:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(restore_module.os, "write", filling)
    fds = _open_fds()
    restorer = Restorer(repo)
    with pytest.raises(TargetFull, match="full"):
        restorer.restore(snap, str(tmp_path / "dst"))
    made = next(calls)
    time.sleep(0.3)
    assert next(calls) == made + 1  # nothing wrote after restore() raised
    assert not _restore_threads() and _open_fds() == fds
    # each thread (the walker too) stops at its first refused write: at most one more each
    assert allowed < made <= allowed + restorer.workers + 1
    # what exists is complete: the file that met the full disk was removed
    restored = tree_state(str(tmp_path / "dst"))
    expected = tree_state(str(src))
    files = [p for p, v in restored.items() if v["type"] == stat.S_IFREG]
    assert 0 < len(files) < sum(1 for v in expected.values() if v["type"] == stat.S_IFREG)
    assert all(restored[p]["sha256"] == expected[p]["sha256"] for p in files)


def test_storage_outage_midway_stops_with_its_error(repo, source, tmp_path, monkeypatch, lane):
    src, _dirs = source
    snap = _backup(repo, src)
    reads = itertools.count()
    real_read = repo.contents.read

    def failing(cid):
        if next(reads) >= 300:
            raise StorageUnreachable("the storage went away")
        return real_read(cid)

    monkeypatch.setattr(repo.contents, "read", failing)
    fds = _open_fds()
    with pytest.raises(StorageUnreachable, match="went away"):
        Restorer(repo).restore(snap, str(tmp_path / "dst"))
    assert not _restore_threads() and _open_fds() == fds


def test_files_that_fail_are_reported_and_the_rest_restores_with_directory_metadata(repo, source, tmp_path,
                                                                                  monkeypatch, lane):
    """Refused creates in many directories (each a batch with other files): reported one by one,
    and their directories still get their metadata once their other files are done."""
    src, _dirs = source
    snap = _backup(repo, src)
    real_open = os.open

    def refusing(path, flags, *a, **k):
        if flags & os.O_CREAT and path == "f1":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(restore_module.os, "open", refusing)
    stats = Restorer(repo).restore(snap, str(tmp_path / "dst"))
    expected = tree_state(str(src))
    refused = {p for p in expected if os.path.basename(p) == "f1"}
    assert len(refused) > 20 and stats.errors == len(refused)
    assert {os.path.relpath(e["path"], tmp_path / "dst") for e in stats.error_list} == refused
    assert all("Permission denied" in e["error"] for e in stats.error_list)
    assert tree_state(str(tmp_path / "dst")) == {p: v for p, v in expected.items() if p not in refused}


def test_an_unexpected_error_is_raised(repo, source, tmp_path, monkeypatch, lane):
    src, _dirs = source
    snap = _backup(repo, src)

    def broken(node, entry, owner):
        raise ValueError("a bug")

    monkeypatch.setattr(restore_module, "set_metadata", broken)
    with pytest.raises(ValueError, match="a bug"):
        Restorer(repo).restore(snap, str(tmp_path / "dst"))
    assert not _restore_threads()
