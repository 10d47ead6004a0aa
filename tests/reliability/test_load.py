"""Load: many backup processes writing into one repository at once, with `kdist gc run` beside them.

KDIST_LOAD_WRITERS processes (16 by default) each back up their own small tree; every tree also
holds the same shared files. Writers deduplicate against published index blobs only, so writers
that start together race and each store the shared contents (harmless duplicates, measured and
reported); a host backed up afterwards must store none of them again. `kdist gc run` runs over
and over while the writers write. Afterwards every snapshot verifies (every content
authenticated) and restores byte-for-byte, and `kdist repo check --read-data` finds nothing
wrong. The same on the filesystem and on S3 (a moto server). The margins are the full ones
scaled by KDIST_LOAD_MARGIN_SCALE (1/720: session expiry 10 s, heartbeat 0.8 s, epochs 5 s, pack
age 2 min), so GC walks the snapshots and advances epochs under the writers; the writers' packs
are too young for it to delete.

A longer soak: ``KDIST_LOAD_WRITERS=32 KDIST_LOAD_ROUNDS=5 KDIST_LOAD_FILES=40
pytest tests/reliability/test_load.py``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from kdist_trees import tree_state  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.storage.wrappers import ReadOnlyStorage  # noqa: E402

WRITERS = int(os.environ.get("KDIST_LOAD_WRITERS", "16"))
ROUNDS = int(os.environ.get("KDIST_LOAD_ROUNDS", "1"))  # backups per writer
FILES = int(os.environ.get("KDIST_LOAD_FILES", "10"))  # own files per tree, besides the shared ones
SCALE = float(os.environ.get("KDIST_LOAD_MARGIN_SCALE", str(1 / 720)))
SEED = int(os.environ.get("KDIST_LOAD_SEED", "5"))
PASSWORD = "load"
KDIST = [sys.executable, "-m", "kdist.cli.main"]
SMALL = dict(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_min=16 * 1024,
             chunk_avg=64 * 1024, chunk_max=256 * 1024)


def make_trees(root, rng: random.Random, count: int) -> list:
    shared = [rng.randbytes(rng.randint(50_000, 200_000)) for _ in range(3)]
    trees = []
    for w in range(count):
        src = root / f"host{w:02d}"
        (src / "shared").mkdir(parents=True)
        for i, data in enumerate(shared):
            (src / "shared" / f"common{i}.bin").write_bytes(data)
        change_tree(src, rng, 0)
        trees.append(src)
    return trees


def change_tree(src, rng: random.Random, round_: int) -> None:
    (src / "own").mkdir(exist_ok=True)
    for i in range(FILES if round_ == 0 else max(1, FILES // 3)):
        (src / "own" / f"f{rng.randrange(FILES)}.bin").write_bytes(rng.randbytes(rng.randint(10_000, 120_000)))
    (src / f"note{round_}.txt").write_text(f"{src.name} round {round_}\n")


class Load:
    def __init__(self, repo_args: list[str], tmp):
        self.repo_args, self.tmp = repo_args, tmp
        self.env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1")

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen(KDIST + list(args) + self.repo_args, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, *args, expect: int | None = 0) -> subprocess.CompletedProcess:
        p = subprocess.run(KDIST + list(args) + self.repo_args, env=self.env, capture_output=True, text=True,
                           timeout=300)
        assert expect is None or p.returncode == expect, \
            f"kdist {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}"
        return p

    def backups_with_gc(self, trees) -> tuple[dict[str, dict], list[dict]]:
        """Every tree backed up by its own process at once, `gc run` looping meanwhile; returns
        the published snapshots (id -> tree state) and what each gc run did."""
        states = {str(t): tree_state(str(t)) for t in trees}
        writers = [self.start("snapshot", "create", str(t), "--json") for t in trees]
        gc_steps = []
        while any(w.poll() is None for w in writers):
            gc = self.start("gc", "run", "--json")
            out, err = gc.communicate(timeout=300)
            assert gc.returncode == 0, f"gc run failed beside the writers ({gc.returncode}):\n{err[-3000:]}"
            gc_steps.append(json.loads(out)["steps"])
        published = {}
        for t, w in zip(trees, writers):
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, f"the backup of {t.name} failed ({w.returncode}):\n{err[-3000:]}"
            published[json.loads(out)[0]["id"]] = states[str(t)]
        return published, gc_steps


def exercise(load: Load, storage, tmp_path) -> str:
    safety = SAFETY_FULL.scaled(SCALE)
    format_blob.create(storage, PASSWORD, RepositoryParameters(**SMALL, extra={"safety": safety.to_dict()}),
                       KdfParams.weak_for_tests())
    rng = random.Random(SEED)
    *trees, late = make_trees(tmp_path / "trees", rng, WRITERS + 1)
    expected: dict[str, dict] = {}
    gc_steps: list[dict] = []
    started = time.monotonic()
    for r in range(ROUNDS):
        if r:
            for t in trees:
                change_tree(t, rng, r)
        published, steps = load.backups_with_gc(trees)
        expected.update(published)
        gc_steps += steps
    wrote = time.monotonic() - started
    assert gc_steps, "no gc run overlapped the writers"

    # writers that start together each store the shared files (dedup is against published index
    # blobs); a host backed up afterwards stores none of them again
    snap = json.loads(load.run("snapshot", "create", str(late), "--json").stdout)[0]
    shared_bytes = sum(p.stat().st_size for p in (late / "shared").iterdir())
    own_bytes = snap["totals"]["bytes"] - shared_bytes
    assert snap["totals"]["new_bytes"] <= own_bytes + 16 * 1024, snap["totals"]  # + its directory objects
    expected[snap["id"]] = tree_state(str(late))

    # every snapshot verifies and restores byte-for-byte (in this process: one open, not 2 x N)
    from kdist.browse import verify
    from kdist.restore import Restorer
    from kdist.snapshot import list_snapshots

    repo = Repository.open(ReadOnlyStorage(storage), PASSWORD, heartbeat_thread=False)
    snaps = list_snapshots(repo.manifests)
    assert {s.id for s in snaps} == set(expected), "the listed snapshots are not the published ones"
    for s in snaps:
        report = verify(repo, s.root)
        assert not report.problems and report.files > 0, f"snapshot {s.short_id}: {report.problems}"
        dst = tmp_path / f"restore-{s.short_id}"
        Restorer(repo).restore(s, str(dst))
        assert tree_state(str(dst)) == expected[s.id], f"snapshot {s.short_id} does not restore byte-for-byte"
    load.run("repo", "check", "--read-data")
    copies = shared_copies(repo, snaps[0])
    advanced = sum(1 for s in gc_steps if s.get("index", {}).get("advanced"))
    walked = max((s.get("content_gc", {}).get("live", 0) for s in gc_steps), default=0)
    return (f"{WRITERS} writers x {ROUNDS} round(s) in {wrote:.1f} s beside {len(gc_steps)} gc runs "
            f"({advanced} advanced the epoch, up to {walked} live contents walked); {len(snaps)} snapshots verified and restored; the shared files' contents are stored "
            f"{copies:.1f} times on average, and the late host stored {snap['totals']['new_bytes']} new bytes of "
            f"{snap['totals']['bytes']}")


def shared_copies(repo: Repository, snap) -> float:
    """How many times, on average, the contents of the files every tree shares are stored: 1 is
    perfect dedup; writers that start together race, and several may store the same content."""
    from kdist.snapshot import read_directory

    shared = next(e for e in read_directory(repo.objects, snap.root) if e.name == "shared")
    ids = {cid for e in read_directory(repo.objects, shared.oid) for cid, _n in repo.objects.chunks(e.oid)}
    stored = {(e.pack, e.offset) for e in repo.contents.committed.physical_entries() if e.content_id in ids}
    return len(stored) / len(ids)


@pytest.mark.slow
def test_concurrent_writers_and_gc_on_the_filesystem(tmp_path):
    from repo_format.storage.filesystem import FilesystemStorage

    repo = tmp_path / "repo"
    summary = exercise(Load(["--repo", str(repo)], tmp_path), FilesystemStorage(repo, create=True), tmp_path)
    print(f"\nfilesystem load: {summary}")


@pytest.mark.slow
def test_concurrent_writers_and_gc_on_s3(tmp_path, s3_bucket):
    from repo_format.storage.s3 import S3Storage

    endpoint, bucket = s3_bucket
    load = Load(["--repo", f"s3://{bucket}/load", "--endpoint-url", endpoint], tmp_path)
    summary = exercise(load, S3Storage(bucket, "load", endpoint_url=endpoint), tmp_path)
    print(f"\nS3 load: {summary}")


def test_gc_beside_a_backup_that_publishes(tmp_path):
    """`kdist gc run` opens the repository, a backup publishes, then content GC walks the snapshots:
    the run must complete (walking the new snapshot too), not report corruption. Deterministic,
    library level: what the load test above hits by chance."""
    from kdist.gc.run import MaintenanceOptions, run_maintenance
    from kdist.uploader import BackupOptions, Uploader
    from repo_format.storage.memory import MemoryStorage

    storage = MemoryStorage()
    format_blob.create(storage, PASSWORD, RepositoryParameters(**SMALL), KdfParams.weak_for_tests())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(random.Random(SEED).randbytes(300_000))
    gc_repo = Repository.open(storage, PASSWORD, heartbeat_thread=False)  # `gc run` has opened it
    writer = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    Uploader(writer, BackupOptions(workers=2)).backup(str(tmp_path / "src"))  # meanwhile a backup publishes
    writer.close()
    report = run_maintenance(gc_repo, MaintenanceOptions(full=True))
    assert report.steps["content_gc"]["live"] > 0
