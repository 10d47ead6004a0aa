"""Real processes, real kills: backups, maintenance and forgets at once, with kill -9.

Several `kdist snapshot create` and `kdist gc run` processes run concurrently against one
repository (filesystem, and S3 on a moto server); random ones are killed with SIGKILL. Afterwards
every snapshot that was published and not forgotten restores byte-for-byte, and once the
margins (shortened through the format blob with `repo create --gc-margin-scale`) have passed,
maintenance has shrunk the repository.
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

from kdist_trees import tree_state

SCALE = 1 / 3600  # every margin in hours becomes seconds: content and pack age 24 s, drop margin 4 s
KDIST = [sys.executable, "-m", "kdist.cli.main"]


class Cluster:
    def __init__(self, repo_args: list[str], tmp_path, seed: int):
        self.repo_args = repo_args
        self.tmp = tmp_path
        self.rng = random.Random(seed)
        self.env = dict(os.environ, KDIST_PASSWORD="processes", KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1")
        self.expected: dict[str, dict] = {}
        self.started: dict[str, list] = {}  # source path -> tree states of every backup started
        self.killed = 0

    def run(self, *args, check=True, timeout=120):
        p = subprocess.run(KDIST + list(args) + self.repo_args, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kdist {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def start(self, *args):
        return subprocess.Popen(KDIST + list(args) + self.repo_args, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def make_sources(self, n: int) -> list:
        shared = os.urandom(200_000)
        sources = []
        for i in range(n):
            src = self.tmp / f"src{i}"
            src.mkdir()
            (src / "shared.bin").write_bytes(shared)
            for j in range(5):
                (src / f"file{j}.bin").write_bytes(os.urandom(self.rng.randint(20_000, 300_000)))
            sources.append(src)
        return sources

    def chaos(self, sources, seconds: float) -> None:
        backups: dict = {}  # source index -> (process, state, kill deadline)
        gcs: list = []
        end = time.monotonic() + seconds
        while time.monotonic() < end or backups or gcs:
            now = time.monotonic()
            for i, src in enumerate(sources):
                if i not in backups and now < end and self.rng.random() < 0.3:
                    victim = src / f"file{self.rng.randrange(5)}.bin"
                    victim.write_bytes(os.urandom(self.rng.randint(20_000, 300_000)))
                    kill_at = now + self.rng.uniform(0.2, 2.0) if self.rng.random() < 0.35 else None
                    if not self.started:  # the very first backup is killed at once: kills never depend on timing
                        kill_at = now
                    state = tree_state(str(src))
                    self.started.setdefault(str(src), []).append(state)
                    backups[i] = (self.start("snapshot", "create", str(src), "--json"), state, kill_at)
            if now < end and len(gcs) < 2 and self.rng.random() < 0.2:
                kill_at = now + self.rng.uniform(0.1, 1.5) if self.rng.random() < 0.3 else None
                gcs.append((self.start("gc", "run", "--json"), kill_at))
            if now < end and self.rng.random() < 0.03:
                self.run("snapshot", "forget", "--keep-last", "2")
            for i, (proc, state, kill_at) in list(backups.items()):
                if kill_at is not None and now >= kill_at and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    self.killed += 1
                if proc.poll() is not None:
                    out, _err = proc.communicate()
                    if proc.returncode == 0:
                        for snap in json.loads(out):
                            self.expected[snap["id"]] = state
                    del backups[i]
            for entry in list(gcs):
                proc, kill_at = entry
                if kill_at is not None and now >= kill_at and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    self.killed += 1
                if proc.poll() is not None:
                    proc.communicate()
                    gcs.remove(entry)
            time.sleep(0.1)  # polling the processes; no assertion depends on this timing

    def listed(self) -> list[dict]:
        return json.loads(self.run("snapshot", "list", "--json").stdout)

    def check_restores(self) -> int:
        snaps = self.listed()
        for s in snaps:
            dst = self.tmp / f"restore-{s['id'][:8]}"
            self.run("snapshot", "restore", s["id"], str(dst))
            got = tree_state(str(dst))
            if s["id"] in self.expected:
                assert got == self.expected[s["id"]], f"snapshot {s['id'][:8]} differs"
            else:  # killed after publishing, before it could report: it is one of the backups started
                assert got in self.started[s["source"]["path"]], f"snapshot {s['id'][:8]} matches no backup"
        return len(snaps)


def pack_bytes(listing) -> int:
    return sum(m.length for m in listing if m.name[0] in "pq")


def exercise(cluster: Cluster, storage_listing) -> None:
    cluster.run("repo", "create", "--gc-margin-scale", str(SCALE))
    sources = cluster.make_sources(3)
    cluster.chaos(sources, seconds=20)
    assert cluster.killed > 0 and cluster.expected, "the chaos phase must kill processes and publish snapshots"
    assert cluster.check_restores() > 0
    cluster.run("snapshot", "forget", "--keep-last", "1")
    before = pack_bytes(storage_listing())
    deadline = time.monotonic() + 90
    while pack_bytes(storage_listing()) >= before and time.monotonic() < deadline:
        cluster.run("gc", "run")  # margins are seconds here: each run moves the protocol along
        time.sleep(1)
    after = pack_bytes(storage_listing())
    assert after < before, f"maintenance did not reclaim space after forgets ({before} -> {after} bytes)"
    assert cluster.check_restores() == 3  # one per source survives the forget, and restores
    cluster.run("snapshot", "verify", "latest")


@pytest.mark.slow
def test_processes_and_kills_on_the_filesystem(tmp_path):
    from repo_format.storage.filesystem import FilesystemStorage

    repo = tmp_path / "repo"
    cluster = Cluster(["--repo", str(repo)], tmp_path, seed=1)
    exercise(cluster, lambda: list(FilesystemStorage(str(repo)).list()))


@pytest.mark.slow
def test_processes_and_kills_on_s3(tmp_path, s3_bucket):
    from repo_format.storage.s3 import S3Storage

    endpoint, bucket = s3_bucket
    cluster = Cluster(["--repo", f"s3://{bucket}/fleet", "--endpoint-url", endpoint], tmp_path, seed=2)
    exercise(cluster, lambda: list(S3Storage(bucket, "fleet", endpoint_url=endpoint).list()))
