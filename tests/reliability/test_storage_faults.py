"""Storage faults: transient errors are retried, persistent ones fail cleanly and resumably.

Filesystem and memory backends get their faults from ``FaultInjectingStorage`` (for the CLI, a
launcher wraps the storage every ``kdist`` command opens, below its ``RetryingStorage``); S3 gets
real HTTP faults from ``faultproxy.FaultProxy`` between kdist and a moto server: 503 SlowDown,
500 InternalError, connections dropped before a reply and replies cut off at a random byte.

What must hold: under transient faults a backup retries and finishes and restores byte-for-byte;
under a persistent failure it exits 14 with a one-line error and no traceback, every earlier
snapshot still restores, and the next run (faults off) uploads much less than a full backup; a
blob half-written by a crash is never visible, and a truncated pack is refused as corrupt.

Sizes and rates come from the environment, so a soak is one command:
``KDIST_FAULT_RATE=0.2 KDIST_S3_FAULT_RATE=0.3 KDIST_FAULT_ROUNDS=20 KDIST_FAULT_SEED=$RANDOM
pytest tests/reliability/test_storage_faults.py``.
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

from faultproxy import FaultProxy  # noqa: E402
from kdist_trees import tree_state  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import BlobNotFound, CorruptionError, RetryableStorageError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.filesystem import FilesystemStorage  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402
from repo_format.storage.s3 import S3Storage  # noqa: E402
from repo_format.storage.wrappers import FaultInjectingStorage, RetryingStorage  # noqa: E402

FAULT_RATE = float(os.environ.get("KDIST_FAULT_RATE", "0.1"))  # per storage call (filesystem, memory)
S3_FAULT_RATE = float(os.environ.get("KDIST_S3_FAULT_RATE", "0.2"))  # per HTTP request, over 4 kinds
ROUNDS = int(os.environ.get("KDIST_FAULT_ROUNDS", "1"))  # backup + restore rounds under transient faults
SEED = int(os.environ.get("KDIST_FAULT_SEED", "7"))
PASSWORD = "storage-faults"
# small packs and chunks: a few MiB of files make dozens of packs, so faults land between them
SMALL = dict(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_min=16 * 1024,
             chunk_avg=64 * 1024, chunk_max=256 * 1024)
OUTAGE_DEADLINE = 90  # seconds a failing backup may take to give up (retries with backoff)

# Runs `kdist` with its storage wrapped as KDIST_TEST_FAULTS (JSON) says, below the CLI's own
# RetryingStorage: {"rate": p, "seed": n} fails every kind of call with probability p;
# {"outage_after_bytes": n} fails every call once puts have stored n bytes; {"packs": "PUT"|"GET",
# "spare": n} fails that call on pack blobs after n succeeded; "error": "full" makes the failures
# a non-retryable "storage full". With "report": path, the injected faults are written there.
FAULTY_KDIST = r"""
import atexit, json, os, random, sys
import kdist.access as access
from repo_format.errors import RetryableStorageError, StorageError
from repo_format.storage.wrappers import FaultInjectingStorage, StorageWrapper

spec = json.loads(os.environ["KDIST_TEST_FAULTS"])
opened = []

def error(kind, number):
    if spec.get("error") == "full":
        return StorageError(f"storage full: injected failure of {kind} call {number}")
    return RetryableStorageError(f"injected failure of {kind} call {number}")

class Outage(StorageWrapper):
    # counts the bytes stored; past the limit, the FaultInjectingStorage below fails every call
    def __init__(self, inner):
        super().__init__(inner)
        self.stored, self.injected = 0, inner.injected
    def put(self, name, data):
        self.put_if_absent(name, data)
    def put_if_absent(self, name, data):  # the backup path's puts are create-only
        created = self.inner.put_if_absent(name, data)
        self.stored += len(data)
        if self.stored >= spec["outage_after_bytes"]:
            self.inner.fail_probability = 1.0
        return created

class PackFaults(StorageWrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.injected, self.done = [], 0
    def _check(self, kind, name):
        if kind == spec["packs"] and name[0] in "pq":
            if self.done >= spec.get("spare", 0):
                self.injected.append((kind, name))
                raise error(kind, len(self.injected))
            self.done += 1
    def put(self, name, data):
        self._check("PUT", name)
        self.inner.put(name, data)
    def put_if_absent(self, name, data):
        self._check("PUT", name)
        return self.inner.put_if_absent(name, data)
    def get(self, name, offset=0, length=-1):
        self._check("GET", name)
        return self.inner.get(name, offset, length)

real_open = access.open_storage
def faulty_open(location, endpoint_url=None, create=False, request_timeout=None):
    storage = real_open(location, endpoint_url=endpoint_url, create=create, request_timeout=request_timeout)
    if "rate" in spec or "outage_after_bytes" in spec:
        storage = FaultInjectingStorage(storage, fail_probability=spec.get("rate", 0.0),
                                        rng=random.Random(spec.get("seed", 0)), error_factory=error)
    if "outage_after_bytes" in spec:
        storage = Outage(storage)
    if "packs" in spec:
        storage = PackFaults(storage)
    opened.append(storage)
    return storage
access.open_storage = faulty_open

def report():
    if spec.get("report"):
        with open(spec["report"], "w") as f:
            json.dump([list(map(list, s.injected)) for s in opened], f)
atexit.register(report)

from kdist.cli.main import main
sys.argv[0] = "kdist"
main()
"""


class Kdist:
    """Runs ``kdist`` commands on one repository, optionally with injected storage faults."""

    def __init__(self, repo_args: list[str]):
        self.repo_args = repo_args

    def env(self, faults: dict | None) -> dict:
        env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_ALLOW_WEAK_KDF_FOR_TESTS="1")
        if faults is not None:
            env["KDIST_TEST_FAULTS"] = json.dumps(faults)
        return env

    def run(self, *args, faults: dict | None = None, expect: int | None = 0, timeout: float = 120):
        cmd = [sys.executable] + (["-c", FAULTY_KDIST] if faults is not None else ["-m", "kdist.cli.main"])
        p = subprocess.run(cmd + list(args) + self.repo_args, env=self.env(faults), capture_output=True,
                           text=True, timeout=timeout)
        if expect is not None and p.returncode != expect:
            raise AssertionError(f"kdist {' '.join(args)} exited {p.returncode}, expected {expect}:\n{p.stderr[-3000:]}")
        return p

    def backup(self, src, *extra, faults: dict | None = None, expect: int | None = 0):
        p = self.run("snapshot", "create", str(src), "--json", *extra, faults=faults, expect=expect)
        return json.loads(p.stdout)[0]["id"] if p.returncode == 0 else p

    def restore_matches(self, snap_id: str, state: dict, target, faults: dict | None = None) -> None:
        self.run("snapshot", "restore", snap_id, str(target), faults=faults)
        assert tree_state(str(target)) == state, f"snapshot {snap_id[:8]} does not restore byte-for-byte"


def make_tree(root, seed: int, files: int = 24, size: int = 96 * 1024) -> dict:
    """Incompressible files of about ``size`` bytes in a few directories, plus small ones."""
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(size // 2, size * 3 // 2)))
    (root / "notes.txt").write_text(f"tree {seed}\n" * 50)
    (root / "empty").write_bytes(b"")
    return tree_state(str(root))


def create_small_repo(storage, password: str = PASSWORD) -> None:
    format_blob.create(storage, password, RepositoryParameters(**SMALL), KdfParams.weak_for_tests())


def data_bytes(root) -> int:
    """What a full backup of ``root`` uploads, near enough: its files are incompressible."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _dirs, files in os.walk(root) for f in files)


def new_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes of the packs, index and manifest blobs that appeared between two listings."""
    return sum(n for name, n in after.items() if name not in before and name[0] in "pqxm")


def listing(storage) -> dict[str, int]:
    return {m.name: m.length for m in storage.list()}


def assert_clean_failure(p, code: int, *phrases: str) -> None:
    """Exit ``code``, no traceback, and a last line ``kdist: error: ...`` holding one of ``phrases``."""
    assert p.returncode == code, f"exit {p.returncode}, expected {code}:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("kdist: error: ") and any(w in last for w in phrases), last


# ---- filesystem and memory, through FaultInjectingStorage --------------------------------------

def test_transient_faults_memory_backend_backup_restores(tmp_path):
    """Library level, memory backend: a quarter of all calls fail (and the first of each kind);
    retries (without sleeping) absorb it."""
    from kdist.restore import Restorer
    from kdist.uploader import BackupOptions, Uploader

    first_calls = {kind: {1} for kind in ("PUT", "GET", "LIST", "STAT")}
    faulty = FaultInjectingStorage(MemoryStorage(), fail_on_call=first_calls, fail_probability=0.25,
                                   rng=random.Random(SEED))
    storage = RetryingStorage(faulty, attempts=12, sleep=lambda s: None)
    repo = Repository.create(storage, PASSWORD, RepositoryParameters(**SMALL), KdfParams.weak_for_tests())
    state = make_tree(tmp_path / "src", SEED)
    snap = Uploader(repo, BackupOptions(workers=2)).backup(str(tmp_path / "src"))
    repo.close()
    reader = Repository.open(storage, PASSWORD)
    Restorer(reader).restore(snap, str(tmp_path / "restored"))
    assert tree_state(str(tmp_path / "restored")) == state
    kinds = {kind for kind, _n in faulty.injected}
    assert {"PUT", "GET", "LIST"} <= kinds, f"faults injected: {sorted(kinds)}"


def test_transient_faults_filesystem_backup_retries_and_restores(tmp_path):
    """CLI, filesystem: every kind of call fails at FAULT_RATE; backups, an incremental backup,
    `gc run` and restores (under faults too) all finish, and restore byte-for-byte."""
    repo = tmp_path / "repo"
    create_small_repo(FilesystemStorage(repo, create=True))
    kd = Kdist(["--repo", str(repo)])
    src = tmp_path / "src"
    reports = []

    def faults(seed: int) -> dict:
        reports.append(tmp_path / f"faults-{len(reports)}.json")
        return {"rate": FAULT_RATE, "seed": seed, "report": str(reports[-1])}

    for r in range(ROUNDS + 1):
        state = make_tree(src, SEED + r, files=16 if r else 32)  # later rounds change half the files
        snap = kd.backup(src, faults=faults(SEED + r))
        kd.run("gc", "run", faults=faults(SEED + 1000 + r))
        kd.restore_matches(snap, state, tmp_path / f"restored-{r}", faults=faults(SEED + 2000 + r))
    injected = sum(len(x) for report in reports for x in json.loads(report.read_text()))
    assert injected > 0, "no fault was injected: raise KDIST_FAULT_RATE"
    kd.run("snapshot", "verify", "latest")
    print(f"\nfilesystem transient faults: {injected} calls failed at rate {FAULT_RATE}, all retried")


def test_persistent_outage_fails_cleanly_and_resumes(tmp_path):
    """Once the backup has stored 80% of its data, every storage call fails (retryable, so each is
    retried to exhaustion): the backup exits 14 with a clear error in bounded time; the earlier
    snapshot still restores; the next run (faults off) reuses what the failed one checkpointed
    and uploads much less than a full backup."""
    repo = tmp_path / "repo"
    storage = FilesystemStorage(repo, create=True)
    create_small_repo(storage)
    kd = Kdist(["--repo", str(repo)])
    src = tmp_path / "src"
    first_state = make_tree(src, SEED, files=4)
    first = kd.backup(src)
    make_tree(src / "new", SEED + 1, files=48)  # ~4.5 MiB of new data
    full, state = data_bytes(src / "new"), tree_state(str(src))
    before = listing(storage)
    started = time.monotonic()
    p = kd.backup(src, "--checkpoint-interval", "0.01", faults={"outage_after_bytes": full * 4 // 5}, expect=None)
    assert_clean_failure(p, 14, "injected failure of", "failed to upload")
    gave_up = time.monotonic() - started
    assert gave_up < OUTAGE_DEADLINE
    assert new_bytes(before, listing(storage)) > 0.5 * full, "the outage came too early"
    kd.restore_matches(first, first_state, tmp_path / "restored-first")
    mid = listing(storage)
    resumed = kd.backup(src)
    again = new_bytes(mid, listing(storage))
    kd.restore_matches(resumed, state, tmp_path / "restored")
    assert again < 0.7 * full, f"the resumed run uploaded {again} of {full} bytes: it did not reuse the first run's"
    print(f"\nfilesystem outage: the backup gave up after {gave_up:.1f} s; the resumed run uploaded {again} "
          f"of {full} bytes")


def test_storage_full_fails_at_once(tmp_path):
    """A non-retryable failure (storage full) is not retried: exit 14 at once, with its reason."""
    repo = tmp_path / "repo"
    create_small_repo(FilesystemStorage(repo, create=True))
    kd = Kdist(["--repo", str(repo)])
    make_tree(tmp_path / "src", SEED, files=8)
    started = time.monotonic()
    p = kd.backup(tmp_path / "src", faults={"packs": "PUT", "spare": 2, "error": "full"}, expect=None)
    assert_clean_failure(p, 14, "storage full")
    assert time.monotonic() - started < 20


def test_failed_pack_upload_still_indexes_the_stored_packs(tmp_path):
    """One pack's upload fails for good while the storage otherwise works (no checkpoint in
    between): the backup exits 14, and on the way out it should index the packs it did store,
    as the CLI intends ("keep what was uploaded: the next run reuses it")."""
    repo = tmp_path / "repo"
    storage = FilesystemStorage(repo, create=True)
    create_small_repo(storage)
    kd = Kdist(["--repo", str(repo)])
    src = tmp_path / "src"
    state, full = make_tree(src, SEED, files=48), data_bytes(src)
    before = listing(storage)
    p = kd.backup(src, faults={"packs": "PUT", "spare": 12}, expect=None)
    assert_clean_failure(p, 14, "injected failure of PUT", "failed to upload")
    assert new_bytes(before, listing(storage)) > 0.4 * full  # 12 packs of 256 KiB were stored
    mid = listing(storage)
    snap = kd.backup(src)
    again = new_bytes(mid, listing(storage))
    kd.restore_matches(snap, state, tmp_path / "restored")
    assert again < 0.8 * full, f"the second run uploaded {again} of {full} bytes: nothing was reused"


def test_outage_during_verify_is_a_storage_failure_not_corruption(tmp_path):
    """Pack reads fail for good (retries exhausted): verify and restore must say the storage is
    failing (exit 14), not that the snapshot is damaged (13) or partly restored (3)."""
    repo = tmp_path / "repo"
    create_small_repo(FilesystemStorage(repo, create=True))
    kd = Kdist(["--repo", str(repo)])
    make_tree(tmp_path / "src", SEED, files=8)
    snap = kd.backup(tmp_path / "src")
    outage = {"packs": "GET", "spare": 0}  # every read of a pack fails, retried to exhaustion
    assert_clean_failure(kd.run("snapshot", "verify", snap, faults=outage, expect=None), 14, "injected failure of GET")
    p = kd.run("snapshot", "restore", snap, str(tmp_path / "restored"), faults=outage, expect=None)
    assert_clean_failure(p, 14, "injected failure of GET")


# ---- half-written blobs -------------------------------------------------------------------

# A child process that puts one blob through FilesystemStorage and SIGKILLs itself half-way
# through writing its bytes: the crash happens inside put, after part of the data hit the disk.
CRASH_MID_PUT = r"""
import os, signal, sys
from repo_format.storage.filesystem import FilesystemStorage
storage = FilesystemStorage(sys.argv[1])
data = os.urandom(int(sys.argv[3]))
real_write = os.write
def write_half_then_die(fd, view):
    real_write(fd, bytes(view[:len(view) // 2]))
    os.fsync(fd)
    os.kill(os.getpid(), signal.SIGKILL)
os.write = write_half_then_die
getattr(storage, sys.argv[4])(sys.argv[2], data)
"""


@pytest.mark.parametrize("method", ["put", "put_if_absent"])
def test_filesystem_crash_mid_put_leaves_no_visible_blob(tmp_path, method):
    """FilesystemStorage writes a temp file, fsyncs it and renames (or links) it into place, so a
    process killed mid-write leaves only an unlisted ``.tmp-`` file, never a partial blob."""
    root = tmp_path / "store"
    storage = FilesystemStorage(root, create=True)
    name = "p" + "ab" * 16 + "-" + "cd" * 8
    p = subprocess.run([sys.executable, "-c", CRASH_MID_PUT, str(root), name, str(1 << 20), method],
                       capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    temps = [os.path.join(d, f) for d, _dirs, files in os.walk(root) for f in files if f.startswith(".tmp-")]
    assert temps and 0 < os.path.getsize(temps[0]) < 1 << 20, "the crash did not happen mid-write"
    assert [m.name for m in storage.list()] == []
    with pytest.raises(BlobNotFound):
        storage.get(name)
    with pytest.raises(BlobNotFound):
        storage.stat(name)
    assert storage.put_if_absent(name, b"complete") and storage.get(name) == b"complete"


def test_truncated_pack_is_refused_as_corrupt(tmp_path):
    """A pack cut short in place (what a non-atomic store can leave) is never read as valid:
    reads raise CorruptionError, `snapshot verify` exits 13 naming the pack, a restore leaves no
    partial file, `index rebuild` reports it damaged, and a truncated write from
    FaultInjectingStorage is replaced by the retry's complete blob."""
    repo = tmp_path / "repo"
    storage = FilesystemStorage(repo, create=True)
    create_small_repo(storage)
    kd = Kdist(["--repo", str(repo)])
    make_tree(tmp_path / "src", SEED, files=8)
    snap = kd.backup(tmp_path / "src")
    pack = max((m for m in storage.list("p")), key=lambda m: m.length)
    path = next(os.path.join(d, pack.name) for d, _dirs, files in os.walk(repo) if pack.name in files)
    with open(path, "r+b") as f:
        f.truncate(pack.length // 2)  # keeps the first half: records, no local index or postamble
    p = kd.run("snapshot", "verify", snap, expect=None)
    assert p.returncode == 13 and pack.name in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = kd.run("snapshot", "restore", snap, str(tmp_path / "restored"), expect=None)
    assert p.returncode in (3, 13) and pack.name in p.stderr, p.stderr[-2000:]
    p = kd.run("index", "rebuild", "--dry-run")
    assert f"damaged pack {pack.name}" in p.stderr
    reader = Repository.open(storage, PASSWORD)
    cut = pack.length // 2
    victim = next(e for e in reader.contents.committed if e.pack == pack.name and e.offset + e.packed_length > cut)
    with pytest.raises(CorruptionError, match="truncated"):
        reader.contents.read(victim.content_id)

    # a put that leaves a truncated visible blob, then fails: the retry stores the whole blob
    memory = MemoryStorage()
    faulty = FaultInjectingStorage(memory, fail_on_call={"PUT": {1}}, truncate_writes=True)
    RetryingStorage(faulty, sleep=lambda s: None).put("pdeadbeef", b"x" * 1000)
    assert memory.get("pdeadbeef") == b"x" * 1000 and faulty.injected == [("PUT", 1)]


# ---- S3 on moto, behind the fault proxy ---------------------------------------------------

def s3_rates(total: float) -> dict[str, float]:
    return {"slowdown": total * 0.4, "internal": total * 0.2, "drop": total * 0.2, "cut": total * 0.2}


@pytest.mark.filterwarnings("ignore:tzname .* identified but not understood")  # a date cut before "GMT"
def test_s3_cut_replies_are_retryable_never_short(s3_bucket):
    """Every reply cut at a random byte (inside the status line, headers or body) either still
    gives the right answer or raises RetryableStorageError: never a short blob, a wrong length
    (a HEAD cut inside its Content-Length), an empty listing or a KeyError (regression test for
    repo_format/storage/s3.py)."""
    endpoint, bucket = s3_bucket
    direct = S3Storage(bucket, "cuts", endpoint_url=endpoint)
    direct.put("pblob0000", b"x" * 3000)
    direct.put("empty0000", b"")
    for i in range(4):
        direct.put(f"name{i:04d}", b"y" * 10)
    with FaultProxy(endpoint, seed=SEED, cut=1.0) as proxy:
        storage = S3Storage(bucket, "cuts", endpoint_url=proxy.url, max_attempts=1)
        checks = {
            "get": lambda: storage.get("pblob0000") == b"x" * 3000,
            "range": lambda: storage.get("pblob0000", 100, 500) == b"x" * 500,
            "stat": lambda: storage.stat("pblob0000").length == 3000,
            "stat of an empty blob": lambda: storage.stat("empty0000").length == 0,
            "list": lambda: len(list(storage.list())) == 6,
        }
        outcomes: dict[str, set] = {op: set() for op in checks}
        for _ in range(25 * ROUNDS):
            for op, check in checks.items():
                try:
                    assert check(), f"{op} returned a wrong answer from a cut reply"
                    outcomes[op].add("ok")
                except RetryableStorageError:
                    outcomes[op].add("retryable")
        assert all("retryable" in seen for seen in outcomes.values()), outcomes
        assert proxy.counters()["faults"]["cut"] >= 125 * ROUNDS


def test_s3_repo_create_survives_a_lost_reply(s3_bucket):
    """The reply to the conditional PUT of the format blob is cut inside its status line:
    botocore retries, the retry finds our own blob (412), and that counts as created."""
    endpoint, bucket = s3_bucket
    with FaultProxy(endpoint, seed=SEED) as proxy:
        proxy.inject("PUT", "cut", cut_at=5)
        kd = Kdist(["--repo", f"s3://{bucket}/created", "--endpoint-url", proxy.url])
        kd.run("repo", "create")
        assert proxy.counters()["faults"]["cut"] == 1
        kd.run("repo", "connect")


def s3_repo(bucket: str, endpoint: str, prefix: str) -> S3Storage:
    storage = S3Storage(bucket, prefix, endpoint_url=endpoint)
    create_small_repo(storage)
    return storage


@pytest.mark.slow
def test_s3_backup_under_moderate_faults(tmp_path, s3_bucket):
    """S3_FAULT_RATE of all requests fail (SlowDown, InternalError, dropped, cut): backups, an
    incremental backup, `gc run` and restores finish; every snapshot restores byte-for-byte."""
    endpoint, bucket = s3_bucket
    s3_repo(bucket, endpoint, "moderate")
    src = tmp_path / "src"
    with FaultProxy(endpoint, seed=SEED, **s3_rates(S3_FAULT_RATE)) as proxy:
        kd = Kdist(["--repo", f"s3://{bucket}/moderate", "--endpoint-url", proxy.url])
        snaps = []
        for r in range(ROUNDS + 1):
            state = make_tree(src, SEED + r, files=16 if r else 24, size=64 * 1024)
            snaps.append((kd.backup(src), state))
        kd.run("gc", "run")
        for i, (snap, state) in enumerate(snaps):
            kd.restore_matches(snap, state, tmp_path / f"restored-{i}")
        counters = proxy.counters()
    assert all(n > 0 for n in counters["faults"].values()), counters
    print(f"\nS3 moderate faults: {counters['requests']} requests, faults injected {counters['faults']}")


@pytest.mark.slow
def test_s3_outage_fails_cleanly_and_resumes(tmp_path, s3_bucket):
    """Every request fails (all four kinds of fault) once the backup has stored 80% of its data:
    the backup exits 14 with a clear error in bounded time, and so does a command started during
    the outage; then, faults off, the earlier snapshot restores and the next run uploads much
    less than a full backup (counted at the proxy)."""
    endpoint, bucket = s3_bucket
    s3_repo(bucket, endpoint, "outage")
    src = tmp_path / "src"
    first_state = make_tree(src, SEED, files=4)
    with FaultProxy(endpoint, seed=SEED) as proxy:
        kd = Kdist(["--repo", f"s3://{bucket}/outage", "--endpoint-url", proxy.url])
        first = kd.backup(src)
        make_tree(src / "new", SEED + 1, files=48)
        state = tree_state(str(src))
        full, before = data_bytes(src / "new"), proxy.counters()["put_bytes"]
        proxy.outage(after_bytes=full * 4 // 5)
        started = time.monotonic()
        p = kd.backup(src, "--checkpoint-interval", "0.01", expect=None)
        assert_clean_failure(p, 14, "S3 ", "failed to upload")
        gave_up = time.monotonic() - started
        started = time.monotonic()  # a command started during the outage fails from its first request
        assert_clean_failure(kd.run("snapshot", "list", expect=None), 14, "S3 ")
        listed = time.monotonic() - started
        assert max(gave_up, listed) < OUTAGE_DEADLINE
        proxy.set_rates()  # the outage is over
        assert proxy.counters()["put_bytes"] - before > 0.5 * full, "the outage came too early"
        kd.restore_matches(first, first_state, tmp_path / "restored-first")
        mid = proxy.counters()["put_bytes"]
        resumed = kd.backup(src)
        again = proxy.counters()["put_bytes"] - mid
        kd.restore_matches(resumed, state, tmp_path / "restored")
    assert again < 0.7 * full, f"the resumed run uploaded {again} of {full} bytes: it did not reuse the first run's"
    print(f"\nS3 outage: the backup gave up after {gave_up:.1f} s, `snapshot list` after {listed:.1f} s; "
          f"the resumed run uploaded {again} of {full} bytes")
