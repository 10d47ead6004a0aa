"""Crashes: `kdist snapshot create` killed with SIGKILL at random points, many times, on one repository.

A seeded schedule starts backups of a changing tree and kills most of them after a delay spread
over a backup's whole duration (process start, packs, checkpoints with their index blobs and
manifests, the final manifest, the checkpoints' tombstones); every few rounds one is let finish.
Then a last backup must complete, the repository must check clean (`kdist repo check
--read-data`, or `snapshot verify` of every snapshot where the check command is missing), every
snapshot must restore byte-for-byte, and the packs the killed backups stored without indexing
(orphans) must be deleted by `kdist gc run` once their sessions have expired and they are older
than the pack age. The CLI has no virtual clock, so the test waits the margins out: the format
blob holds the full safety margins scaled by KDIST_CRASH_MARGIN_SCALE (what `kdist repo create
--gc-margin-scale` writes; pack age 24 s at the default 1/3600), with small packs and chunks (the
CLI has no option for those) so that a backup of a few MiB stores dozens of packs between which
a kill can land.

CI runs KDIST_CRASH_KILLS=14 kills in about a minute. A soak:
``KDIST_CRASH_KILLS=300 KDIST_CRASH_SEED=$RANDOM pytest tests/reliability/test_crash_loop.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from kdist_trees import tree_state  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format.content import load_committed_index  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.storage.filesystem import FilesystemStorage  # noqa: E402

KILLS = int(os.environ.get("KDIST_CRASH_KILLS", "14"))
SEED = int(os.environ.get("KDIST_CRASH_SEED", "11"))
SCALE = float(os.environ.get("KDIST_CRASH_MARGIN_SCALE", str(1 / 3600)))
FINISH_EVERY = 5  # every fifth backup of the schedule is let finish
PASSWORD = "crash-loop"
KDIST = [sys.executable, "-m", "kdist.cli.main"]
SMALL = dict(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_min=16 * 1024,
             chunk_avg=64 * 1024, chunk_max=256 * 1024)


class Repo:
    def __init__(self, path):
        self.path = path
        self.env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1")
        self.safety = SAFETY_FULL.scaled(SCALE)  # what `kdist repo create --gc-margin-scale SCALE` writes
        self.storage = FilesystemStorage(path, create=True)
        params = RepositoryParameters(**SMALL, extra={"safety": self.safety.to_dict()})
        format_blob.create(self.storage, PASSWORD, params, KdfParams.weak_for_tests())

    def run(self, *args, expect: int | None = 0, timeout: float = 120, repo_arg: bool = True):
        p = subprocess.run(KDIST + list(args) + (["--repo", str(self.path)] if repo_arg else []), env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if expect is not None and p.returncode != expect:
            raise AssertionError(f"kdist {' '.join(args)} exited {p.returncode}, expected {expect}:\n{p.stderr[-3000:]}")
        return p

    def start_backup(self, src) -> subprocess.Popen:
        # a checkpoint every 0.05 s: kills also land between a checkpoint's packs, index blob and manifest
        return subprocess.Popen(KDIST + ["snapshot", "create", str(src), "--json", "--checkpoint-interval", "0.05",
                                         "--repo", str(self.path)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def snapshots(self) -> list[dict]:
        return json.loads(self.run("snapshot", "list", "--json").stdout)

    def unindexed_packs(self) -> dict[str, float]:
        """Packs no index entry points into: name -> storage timestamp."""
        fmt = format_blob.read(self.storage, PASSWORD)
        referenced = {e.pack for e in load_committed_index(self.storage, fmt).physical_entries()}
        return {m.name: m.timestamp for m in self.storage.list() if m.name[0] in "pq" and m.name not in referenced}

    def check(self) -> str:
        """`kdist repo check --read-data` where it exists, else `snapshot verify` of every snapshot."""
        if self.run("repo", "check", "--help", expect=None).returncode == 0:
            self.run("repo", "check", "--read-data")
            return "repo check --read-data"
        for s in self.snapshots():
            self.run("snapshot", "verify", s["id"])
        return "snapshot verify"


def change_tree(src, rng: random.Random, round_: int) -> None:
    """Rewrite two thirds of the big files, add one, drop one: every backup stores ~18 MiB."""
    big = sorted(src.rglob("*.bin"))
    for p in rng.sample(big, len(big) * 2 // 3):
        p.write_bytes(rng.randbytes(rng.randint(100_000, 1_300_000)))
    if len(big) > 30 and rng.random() < 0.5:
        rng.choice(big).unlink()
    d = src / f"d{rng.randrange(6)}"
    d.mkdir(exist_ok=True)
    (d / f"r{round_}.bin").write_bytes(rng.randbytes(rng.randint(100_000, 1_300_000)))
    (src / "small" / f"s{round_}.txt").write_text(f"round {round_}\n" * rng.randint(1, 300))


def make_tree(src, rng: random.Random) -> None:
    (src / "small").mkdir(parents=True)
    for i in range(40):
        d = src / f"d{i % 6}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(100_000, 1_300_000)))
    for i in range(60):
        (src / "small" / f"n{i}.txt").write_text(f"small file {i}\n" * (i + 1))
    os.symlink("small/n1.txt", src / "link")


class Schedule:
    """Backups of a changing tree, most killed after a seeded delay; records what each started with."""

    def __init__(self, repo: Repo, src, rng: random.Random):
        self.repo, self.src, self.rng = repo, src, rng
        self.started_states: list[dict] = []
        self.expected: dict[str, dict] = {}  # snapshot id -> tree state, for backups that reported success
        self.kills: list[float] = []
        self.landed = {"before any blob": 0, "after packs, before an index blob": 0,
                       "after an index blob": 0, "after a manifest": 0}  # what the killed ones had stored
        self.finished = 0
        self.round = 0

    def backup(self, kill_after: float | None) -> float:
        """One backup of the changed tree; returns how long it ran."""
        self.round += 1
        if self.round > 1:
            change_tree(self.src, self.rng, self.round)
        self.started_states.append(tree_state(str(self.src)))
        before = {m.name for m in self.repo.storage.list()}
        started = time.monotonic()
        p = self.repo.start_backup(self.src)
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            self.kills.append(round(kill_after, 2))
            p.wait()
            self._note_landing(before)
        out, err = p.communicate(timeout=120)
        if p.returncode == 0:
            self.expected[json.loads(out)[0]["id"]] = self.started_states[-1]
            self.finished += 1
        else:
            assert p.returncode == -signal.SIGKILL, f"backup failed without being killed ({p.returncode}): {err}"
        return time.monotonic() - started

    def _note_landing(self, before: set[str]) -> None:
        new = [m.name for m in self.repo.storage.list() if m.name not in before]
        kinds = {n[:2] if n.startswith("x") else n[0] for n in new}
        stage = ("after a manifest" if "m" in kinds else "after an index blob" if "xn" in kinds
                 else "after packs, before an index blob" if kinds & {"p", "q"} else "before any blob")
        self.landed[stage] += 1


@pytest.mark.slow
def test_kill_backups_at_random_points(tmp_path):
    rng = random.Random(SEED)
    repo = Repo(tmp_path / "repo")
    src = tmp_path / "src"
    make_tree(src, rng)
    schedule = Schedule(repo, src, rng)
    schedule.backup(kill_after=None)  # the first, full backup
    startup = min(timed(lambda: repo.run("--version", repo_arg=False)) for _ in range(2))
    typical = schedule.backup(kill_after=None)  # an incremental one: what the killed ones would take
    # kill delays spread from late in the process start to past a typical backup's end (some finish anyway)
    while len(schedule.kills) < KILLS:
        let_finish = schedule.round % FINISH_EVERY == 0
        schedule.backup(kill_after=None if let_finish else rng.uniform(0.8 * startup, 1.1 * typical))
    killed_at = time.monotonic()
    schedule.backup(kill_after=None)  # the last backup completes
    final = schedule.started_states[-1]
    orphans = repo.unindexed_packs()
    assert orphans, "no kill landed between a pack and the index blob naming it"

    # while the orphans age: every snapshot restores byte-for-byte, and the repository checks clean
    snaps = repo.snapshots()
    assert set(schedule.expected) <= {s["id"] for s in snaps}, "a snapshot reported published is gone"
    for s in snaps:
        dst = tmp_path / f"restore-{s['id'][:8]}"
        repo.run("snapshot", "restore", s["id"], str(dst))
        got = tree_state(str(dst))
        if s["id"] in schedule.expected:
            assert got == schedule.expected[s["id"]], f"snapshot {s['id'][:8]} does not restore byte-for-byte"
        else:  # published by a backup killed before it could say so
            assert got in schedule.started_states, f"snapshot {s['id'][:8]} matches no backup that was started"
    how = repo.check()

    # the orphans become deletable once older than the pack age (their sessions expired long
    # before); blob GC deletes a pack the second time it finds it deletable, a confirmation
    # margin after the first
    youngest = max(orphans.values())
    gc_runs = 0
    while time.monotonic() < killed_at + repo.safety.pack_age + 60:
        time.sleep(max(youngest + repo.safety.pack_age - time.time(), 0) + 0.2)
        repo.run("gc", "run")
        gc_runs += 1
        if not set(orphans) & {m.name for m in repo.storage.list()}:
            break
        time.sleep(repo.safety.cleanup_margin)
    remaining = set(orphans) & {m.name for m in repo.storage.list()}
    assert not remaining, f"{len(remaining)} of {len(orphans)} orphan packs were not reclaimed by {gc_runs} gc runs"

    # and after the GC the repository still checks clean and the last snapshot restores
    repo.check()
    latest = max(repo.snapshots(), key=lambda s: s["end"])
    repo.run("snapshot", "restore", latest["id"], str(tmp_path / "restore-final"))
    assert tree_state(str(tmp_path / "restore-final")) == final
    stale = len(json.loads(repo.run("snapshot", "list", "--all", "--json").stdout)) - len(repo.snapshots())
    temps = [os.path.join(d, f) for d, _dirs, files in os.walk(repo.path) for f in files if f.startswith(".tmp-")]
    print(f"\ncrash loop: kills landed {schedule.landed}; {stale} checkpoints of killed backups remain; "
          f"{len(temps)} temp files ({sum(map(os.path.getsize, temps))} bytes) of puts cut by a kill remain")
    print(f"crash loop: {len(schedule.kills)} kills at {sorted(schedule.kills)} s (process start "
          f"{startup:.2f} s, a backup {typical:.2f} s), {schedule.finished} backups finished, {len(snaps)} "
          f"snapshots restored, {len(orphans)} orphan packs reclaimed by {gc_runs} gc runs; checked with {how}")


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started
