"""A deterministic simulator of the lock-free protocol, running the real code.

World: one in-memory storage whose timestamps come from a virtual clock (the storage's clock),
optionally a listing that lags behind writes. Actors are generators that run real kdist code one
step at a time: writers (each with its own clock skew, pauses, crashes at any storage write, and
files drawn from a shared pool so they deduplicate against each other and against old, possibly
deleted contents), maintenance jobs (``kdist.gc.run.maintenance_steps``; pauses longer than the
margins, crashes between steps, and in the "sigstop" profile stops inside a storage request while
the others run on), and forgets of old snapshots. The scheduler picks the next actor with a
seeded RNG, so a seed reproduces a schedule exactly. A lagging listing hides a blob for a while
after it is created (an overwritten one, a session marker's heartbeat, stays listed).

Directed scenarios (``SCENARIOS``, ``--scenario NAME``) run the same actors and checks in a
schedule written by hand, for rules whose window random schedules hit too rarely.

Local caches: some writers and maintenance runs (``CACHE_USE``) open the repository with a
local cache, one directory per World shared like processes on one host, which seeded events
delete, copy and later restore (stale and missing files), and damage (see
``World.cache_event``); file ages run on the virtual clock. A cache must change nothing but the
requests (``--no-cache`` runs the same schedule without).

Invariants, checked after every step:
1. every snapshot that was published and not forgotten restores completely, every content
   authenticating (checked through a freshly opened reader), and no forgotten one that was no
   longer listed is listed again (manifest compaction drops tombstones only once nothing holds
   what they deleted);
2. a writer that was never paused past its session expiry and did not crash publishes its
   snapshot (maintenance must not take contents from under a live backup);
3. (scenario ``content_age``) maintenance never marks a running backup's new contents deleted:
   not a safety property (the backup undeletes them, gc/README.md), but each such mark is churn
   that costs the backup an undelete and makes another backup upload the content again.

Run a soak: ``python tests/simulation/kdist_sim.py --schedules 20000 [--seed N] [--mutation RULE]
[--profile P] [--listing-lag H] [--no-cache]``; ``--log`` prints every schedule's log.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import clock  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format.content import ContentLost  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import ContentNotFound, KdistError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import IndexEntry, MergedIndex  # noqa: E402
from repo_format.local_cache import CONTENTS_DIR, INDEX_DIR, CacheSettings  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.session import SessionExpired  # noqa: E402
from repo_format.storage.base import BlobStorage, Retention  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

from kdist.failures import read_failures, record_failure  # noqa: E402
from kdist.gc.clock_guard import StorageClock  # noqa: E402
from kdist.gc.run import MaintenanceOptions, Rules, maintenance_steps  # noqa: E402
from kdist.snapshot import Entry, Snapshot, Source, TYPE_FILE, encode_directory, read_directory  # noqa: E402

T0 = 1_800_000_000.0  # the virtual clock's start
SIM_MEMORY_LIMIT = 16 * 240  # bytes: key ranges of ~8 index entries, runs of 60 reached keys
SIM_FAILURE_KEEP = 6.0  # H: how long maintenance keeps a failure record (30 days in real runs)
H = 1.0  # one simulated hour; the repository's safety margins are the full preset in hours
SAFETY = SAFETY_FULL.scaled(1 / 3600)  # e.g. pack_age 24 H, drop_margin 4 H, session_expiry 2 H
PASSWORD = "sim"
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024,
                              chunk_min=256, chunk_max=4096, extra={"safety": SAFETY.to_dict()})
# Schedule shapes. "mixed" is the default; "churn" has frequent maintenance, aggressive forgets
# and a small pool of shared files, so old contents are often forgotten and then reused.
# "stall": bigger files into small packs, so packs are uploaded when full in the middle of a
# backup and indexed only at its next flush, by writers that often stall (alive, heartbeat
# running) for longer than pack_age; client clocks hours off, and the maintenance host's clock
# 3 hours ahead (a time zone set wrong): only the storage's clock may be trusted.
# "sigstop": maintenance runs are stopped inside a storage request (between reading the storage
# clock and the write that relies on it), for hours, while everybody else carries on.
# "locked": churn on a storage with Object Lock (a retention of a few hours to days, drawn per
# schedule): maintenance's deletes of locked blobs are refused and left for later runs, and full
# runs extend the locks of what they keep.
PROFILES = {
    "mixed": {"pool": 10, "writers": 10, "maintainers": 14, "forgets": 5, "keep": 2, "span": 200.0},
    "churn": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0},
    "stall": {"pool": 8, "writers": 12, "maintainers": 40, "forgets": 6, "keep": 2, "span": 150.0,
              "file_max": 40000, "chunk_avg": 4096, "stall_p": 0.06, "stalls": (3, 36, 48),
              "skew": 3.0, "maintenance_clock": 3.0},
    "sigstop": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0,
                "sigstop_p": 0.7, "sigstops": (3, 6, 12, 30)},
    "locked": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0,
               "locks": (2, 6, 20, 60)},
}
PROFILE_DEFAULTS = {
    "pack_size": 64 * 1024,  # bytes; the repository's pack size (64 KiB is the format's minimum)
    "chunk_avg": 1024,  # bytes; chunks are a quarter to four times this
    "file_max": 5000,  # largest file of the pool and unique files (bytes)
    "stall_p": 0.04, "stalls": (3, 10, 30),  # chance per writer step of a stall, and its length (H)
    "skew": 1.0,  # client clocks are off by up to this (H), maintenance clients' included
    "maintenance_clock": None,  # if set, every maintenance run's clock is this far ahead (H), +-0.1
    "sigstop_p": 0.0, "sigstops": (),  # chance a maintenance run is stopped inside a request, length (H)
    "locks": (),  # Object Lock retentions (H), one drawn per schedule; none: no Object Lock
}


def profile(name: str) -> dict:
    return {**PROFILE_DEFAULTS, **PROFILES[name]}


MUTATIONS = ("content_age", "two_cycle_drop", "pack_age", "live_session", "view_staleness",
             "pause_revalidation", "storage_clock", "listing_decides", "reauthenticate_mapped", "checkpoint_session",
             "merge_copies_first", "spent_tombstones", "failure_type", "part_driver")

# Local caches (repo_format/local_cache.py): one directory per World, shared by the processes
# that use one, like processes on one host. Their choices and the events below draw from a
# separate RNG, so a seed's schedule is the same with caches and without: with every rule on, a
# cache may save requests but must change nothing else (test_caches_change_nothing).
CACHE_USE = {"writer": 0.25, "maintenance": 0.05}  # chance a process of this kind opens with the cache (a cost)
CACHE_EVENT_P = 0.015  # chance per step of an event on the cache directory, one of:
CACHE_EVENTS = (("delete", 2), ("copy", 3), ("restore", 3), ("damage", 2))  # (event, weight)
# In memory where there is a tmpfs: creating and deleting files on a disk's file system costs
# milliseconds each (more after mass deletions), a hundred times as much.
CACHE_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class Crash(Exception):
    """An actor dies here (kill -9): whatever it had not finished stays as it is."""


class Violation(AssertionError):
    pass


class ActorStorage(BlobStorage):
    """One actor's door to the shared storage: may crash it at a chosen write, may stop it (SIGSTOP)
    just before a chosen write while the others carry on, may lag listings."""

    def __init__(self, world: "World", crash_at_write: int | None, actor: "Actor | None" = None,
                 stop_at_write: int | None = None, stop_for: float = 0.0):
        self.world = world
        self.inner = world.storage
        self.crash_at_write = crash_at_write
        self.actor = actor
        self.stop_at_write = stop_at_write
        self.stop_for = stop_for
        self.writes = 0
        self.cached = False  # its process uses the local cache (World.open)

    def _write(self, name: str):
        self.writes += 1
        crash = self.crash_at_write
        if crash is not None and (self.writes >= crash if isinstance(crash, int) else name.startswith(crash)):
            raise Crash(f"crash at write {self.writes} ({name[:2]})")
        stop = self.stop_at_write
        if stop is not None and (self.writes == stop if isinstance(stop, int) else name.startswith(stop)):
            self.stop_at_write = None  # stopped once
            self.world.sigstop(self.actor, self.stop_for, f"stopped before write {self.writes} ({name[:2]})")

    def _created(self, name):
        if name not in self.inner._blobs:
            self.world.created[name] = self.world.t
        self.world.changed(name)

    def put(self, name, data):
        if self.cached:
            self.world.cache_written = True  # written through
        self._write(name)
        self._created(name)
        self.inner.put(name, data)

    def put_if_absent(self, name, data):
        if self.cached:
            self.world.cache_written = True
        self._write(name)
        self._created(name)
        return self.inner.put_if_absent(name, data)

    def get(self, name, offset=0, length=-1):
        if self.cached:
            self.world.cache_written = True  # what it read may now be a file of the cache
        return self.inner.get(name, offset, length)

    def stat(self, name):
        return self.inner.stat(name)

    def list(self, prefix=""):
        """A lagging listing misses blobs created less than ``listing_lag`` ago; a blob that is
        overwritten (a session marker's heartbeat) stays listed, as on S3 and POSIX."""
        w = self.world
        for m in self.inner.list(prefix):
            if w.t - w.created.get(m.name, m.timestamp) >= w.lag_of(m.name):
                yield m

    def delete(self, name):
        self._write(name)
        self.inner.delete(name)  # BlobLocked under Object Lock: nothing changed
        self.world.created.pop(name, None)
        self.world.changed(name)

    def retention(self):
        return self.inner.retention()

    def extend_retention(self, name, until):
        self._write(name)
        self.inner.extend_retention(name, until)


@dataclass
class Actor:
    name: str
    kind: str
    gen: object
    skew: float
    wake_at: float = 0.0
    last_step: float = 0.0
    max_gap: float = 0.0  # the longest pause it has suffered
    done: bool = False
    repo: object = None
    paused_for: float = 0.0
    stalled: bool = False  # not progressing but alive: its heartbeat thread still runs
    stopped: bool = False  # SIGSTOPped inside a storage request (see World.sigstop)


@dataclass
class World:
    seed: int
    mutation: str | None = None
    listing_lag: float = 0.0
    profile: str = "mixed"
    caches: bool = True  # processes may use a local cache (CACHE_USE), with events on it
    format_version: int = C.FORMAT_VERSION  # 3: format 3's content records (repo_format.convergent)
    t: float = T0
    log: list = field(default_factory=list)
    published: dict = field(default_factory=dict)  # snapshot id -> {name: sha256}
    forgotten: set = field(default_factory=set)
    gone: set = field(default_factory=set)  # forgotten, and seen no longer listed
    created: dict = field(default_factory=dict)  # blob name -> when it was created (listing lag)
    lag_by_prefix: dict = field(default_factory=dict)  # directed scenarios: some kinds of blob list later
    on_stop: object = None  # directed scenarios: what happens while an actor is stopped (sigstop)

    def __post_init__(self):
        self.prof = profile(self.profile)
        self.rng = random.Random(self.seed)
        _seed_randomness(random.Random(self.seed ^ 0x5EED))
        lock = self.rng.choice(self.prof["locks"]) * H if self.prof["locks"] else None
        self.storage = MemoryStorage(clock=lambda: self.t,
                                     retention=Retention("GOVERNANCE", lock) if lock else None)
        self.pool = self._file_pool()
        self._current_skew = 0.0
        self._reader = None
        clock.set_clock(lambda: self.t + self._current_skew)
        clock.set_monotonic(lambda: self.t)  # durations are true durations
        clock.set_sleep(lambda _seconds: None)  # a backoff between two reads takes no real time
        self._nested = False
        self.version, self._checked = 0, None
        self.index_version = self.manifest_version = 0  # blobs of the index, of the manifests
        self._index_read = self._manifests_read = None
        self._records: dict = {}
        avg = self.prof["chunk_avg"]
        params = replace(PARAMS, pack_size=self.prof["pack_size"], metadata_pack_size=self.prof["pack_size"],
                         chunk_avg=avg, chunk_min=avg // 4, chunk_max=avg * 4)
        repo = Repository.create(self.storage, PASSWORD, params, KdfParams.weak_for_tests(),
                                 version=self.format_version)
        repo.close()
        self._cache_setup(repo.format.unique_id)

    def _file_pool(self) -> list[bytes]:
        base = [self.rng.randbytes(self.rng.randint(200, self.prof["file_max"] + 1000)) for _ in range(self.prof["pool"])]
        pool = list(base)
        for _ in range(6):  # files sharing chunks with others
            a, b = self.rng.sample(base, 2)
            pool.append(a[: len(a) // 2] + b)
        return pool

    def changed(self, name: str) -> None:
        """A blob was written or deleted: the next check must look (probes and session markers
        cannot change what a snapshot restores)."""
        if not name.startswith((C.PROBE_PREFIX, C.SESSION_PREFIX)):
            self.version += 1
            if name.startswith(C.INDEX_FAMILY_PREFIX):
                self.index_version += 1
            elif name.startswith(C.MANIFEST_PREFIX):
                self.manifest_version += 1

    def lag_of(self, name: str) -> float:
        """How long after its creation a blob shows up in listings (at most listing_settle)."""
        for prefix, lag in self.lag_by_prefix.items():
            if name.startswith(prefix):
                return lag
        return self.listing_lag

    def open(self, actor_storage, cache: bool = False, **kw) -> Repository:
        settings = CacheSettings(base=self.cache_base) if cache and self.cache_base is not None else None
        repo = Repository.open(actor_storage, PASSWORD, heartbeat_thread=False, cache=settings, **kw)
        if isinstance(actor_storage, ActorStorage):
            actor_storage.cached = repo.cache is not None
        if self.mutation is not None:
            # a writer deduplicates only against places it vouches for (repo_format/vouched.py):
            # a trust rule of its own (its mutation checks are in tests/security), which would
            # store again what a broken rule here lost, and so hide that rule's violation
            repo.contents.guard.enabled = False
        if self.mutation == "listing_decides" and repo.cache is not None:
            repo.contents.epochs.load_index = _load_every_cached_blob(repo.contents.epochs)
        if self.mutation == "reauthenticate_mapped" and repo.cache is not None:
            assert hasattr(repo.cache, "still_authentic"), "the mutation's hook is gone: update it"
            repo.cache.still_authentic = lambda name, blob: True  # a mapped file, once authenticated, is trusted
        return repo

    # ---- local caches ----------------------------------------------------------------------
    def _cache_setup(self, repository_id: bytes) -> None:
        """The cache directory (``cache_base``), file times on the virtual clock, and the
        cache's warnings into the log (with the directory's name left out: the log replays)."""
        self.cache_rng = random.Random(self.seed ^ 0xCAC4E)
        self.cache_base = Path(tempfile.mkdtemp(prefix="kdist-sim-cache-", dir=CACHE_TMP)) if self.caches else None
        if self.cache_base is not None:
            self._cache_index = CacheSettings(base=self.cache_base).directory(repository_id) / INDEX_DIR
        self._cache_copy: Path | None = None  # an old copy of the cache directory (event "copy")
        self._stamped: dict[str, tuple[int, int]] = {}  # index file -> (inode, mtime) as stamped
        self.cache_written = False  # index files may have been written since the last stamp
        self._cache_copied_at = 0.0
        # The cache compares file times with clock.system_time() (index files of superseded
        # blobs are dropped 15 min after their last write, a constant in seconds): both on the
        # virtual clock here, in its hours (see _stamp_cache).
        clock.system_time = self.file_time
        self._log_handler = _CacheLog(self)
        _CACHE_LOG.addHandler(self._log_handler)
        _CACHE_LOG.propagate = False

    def file_time(self) -> float:
        """The virtual clock as the file system's: a simulated hour (H) is 3600 s of it."""
        return T0 + (self.t - T0) * 3600 / H

    def uses_cache(self, kind: str) -> bool:
        return self.cache_base is not None and self.cache_rng.random() < CACHE_USE[kind]

    def _stamp_cache(self, now: bool = True) -> None:
        """Give the files the cache wrote since the last call (stamped by the real clock) the
        virtual time, so their ages are virtual ages; ``now=False`` (after a restore) keeps the
        times they have: copies keep their times, as ``cp -a`` and restores from backups do.
        (Known files are told by inode and time, not by how their time compares with the real
        clock's, which the virtual one may be near.) Only the flat directories (index files,
        small blobs), whose ages decide what is dropped; contents' ages only order eviction."""
        if self.cache_base is None or not (self.cache_written or not now):
            return
        self.cache_written = False
        entries = []
        try:
            for sub in os.scandir(self._cache_index.parent):
                if sub.is_dir() and sub.name != CONTENTS_DIR:
                    entries += os.scandir(sub.path)
        except OSError:
            pass
        for e in entries:
            try:
                st = e.stat()
                if self._stamped.get(e.path) != (st.st_ino, st.st_mtime_ns):
                    if now:
                        os.utime(e.path, (self.file_time(),) * 2)
                        st = os.stat(e.path)
                    self._stamped[e.path] = (st.st_ino, st.st_mtime_ns)
            except OSError:
                pass

    def cache_event(self, kind: str | None = None, over: bool | None = None, keep_times: bool | None = None) -> None:
        """An event on the cache directory while processes use it: deleted (``rm -rf``), copied
        (an old copy, for "restore"), restored from that copy (``over`` the current one: its
        stale files come back, files written since stay; or instead of it: those are missing
        too; with the copy's file times, ``cp -a``, or new ones, ``cp -r``), or a bit of one
        file flipped (``damage``). Random in schedules (``kind`` None), chosen in scenarios."""
        r, base = self.cache_rng, self.cache_base
        if base is None:
            return
        self._stamp_cache()
        if kind is None:
            kind = r.choices([k for k, _ in CACHE_EVENTS], [w for _, w in CACHE_EVENTS])[0]
        what = {"delete": "deleted (rm -rf)", "copy": "copied"}.get(kind, kind)
        if kind == "delete":
            shutil.rmtree(base, ignore_errors=True)
        elif kind == "copy":
            if self._cache_copy is None:
                self._cache_copy = Path(tempfile.mkdtemp(prefix="kdist-sim-cache-copy-", dir=CACHE_TMP))
            shutil.rmtree(self._cache_copy, ignore_errors=True)
            if base.exists():
                shutil.copytree(base, self._cache_copy, symlinks=True)
            else:
                self._cache_copy.mkdir()
            self._cache_copied_at = self.t
        elif kind == "restore":
            if self._cache_copy is None:
                return
            over = r.random() < 0.5 if over is None else over
            keep_times = r.random() < 0.5 if keep_times is None else keep_times
            if not over:
                shutil.rmtree(base, ignore_errors=True)
            shutil.copytree(self._cache_copy, base, symlinks=True, dirs_exist_ok=True,
                            copy_function=shutil.copy2 if keep_times else shutil.copy)
            self.cache_written = True
            self._stamp_cache(now=not keep_times)
            what = (f"restored {'over the current one' if over else 'instead'} from the copy of "
                    f"t={self._cache_copied_at - T0:.2f}, {'with its file times' if keep_times else 'as new files'}")
        elif kind == "damage":
            files = sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith((".", "CACHEDIR")))
            if not files:
                return
            path = files[r.randrange(len(files))]
            try:
                at = r.randrange(path.stat().st_size or 1)
            except OSError:
                return
            what = self.damage(path, at, 1 << r.randrange(8), in_place=r.random() < 0.5)
        self.log.append(f"    t={self.t - T0:8.2f} cache: {what}")

    def damage(self, path: Path, at: int, mask: int, in_place: bool) -> str:
        """Flip bits (``mask``) of the byte at ``at`` of a cache file: ``in_place``, in the file
        itself, which processes that opened it before have mapped (bit rot read back in after
        the page was evicted, another program writing into it); else in a new file renamed over
        it (what processes that open it afresh see)."""
        try:
            data = bytearray(path.read_bytes())
            if at >= len(data):
                return "damage: nothing to damage"
            data[at] ^= mask
            if in_place:
                with open(path, "r+b") as f:
                    f.seek(at)
                    f.write(data[at:at + 1])
            else:
                tmp = path.with_name(f".sim-damaged-{path.name}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        except OSError as exc:
            return f"damage: {exc.strerror}"
        self.cache_written = True  # its time is now the real clock's
        return f"damaged {path.parent.name}/{path.name[:12]} at byte {at}{' in place' if in_place else ''}"

    def close(self) -> None:
        """Put the process back as it was (clocks, randomness, logging) and remove the cache."""
        clock.set_clock(None)
        clock.set_monotonic(None)
        clock.set_sleep(None)
        clock.system_time = _SYSTEM_TIME
        _restore_randomness()
        _CACHE_LOG.removeHandler(self._log_handler)
        _CACHE_LOG.propagate = True
        for d in (self.cache_base, self._cache_copy):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)

    # ---- actors ----------------------------------------------------------------------------
    def writer(self, actor: Actor, crash_at: int | None, files: list[bytes] | None = None,
               cache: bool | None = None, host: str | None = None, reuse: dict | None = None, idle: int = 0,
               part: bool = False):
        """``reuse``: name -> (entry, digest) of unchanged files taken from an earlier snapshot's
        tree without reading them (only a checkpoint protects them, writer rule 6); ``idle``:
        publish a checkpoint after the files, then heartbeat for that many steps first. ``part``:
        that checkpoint is a sharded backup's part, whose process has retired its session, and
        this writer is its driver (labels ``run``, ``driver``; kdist.distributed)."""
        st = ActorStorage(self, crash_at)
        repo = actor.repo = self.open(st, cache=self.uses_cache("writer") if cache is None else cache)
        if self.mutation == "view_staleness":
            repo.contents.epochs.safety = replace(repo.contents.epochs.safety, index_refresh=1e9)
            repo.contents.epochs.write_index = _stale_write_index(repo.contents.epochs)
        marker = repo.contents.marker
        if files is None:
            long_backup = self.rng.random() < 0.3  # a long backup: many files, rare flushes
            count = self.rng.randint(8, 30) if long_backup else self.rng.randint(1, 5)
            files = [self.rng.choice(self.pool) if self.rng.random() < 0.6 else self.rng.randbytes(self.rng.randint(100, self.prof["file_max"]))
                     for _ in range(count)]  # shared files deduplicate; unique ones become garbage when forgotten
            flush_p = 0.05 if long_backup else 0.3
        else:  # a directed scenario's backup: these files, one flush at the end
            flush_p = 0.0
        entries, expected = [], {}
        yield "opened"
        for i, data in enumerate(files):
            _heartbeat(repo, marker)
            oid = repo.objects.write_bytes(data)
            entries.append(Entry(name=f"f{i}", type=TYPE_FILE, size=len(data), oid=oid, mode=0o644))
            expected[f"f{i}"] = hashlib.sha256(data).hexdigest()
            yield f"wrote f{i}"
            if flush_p and self.rng.random() < flush_p:
                _heartbeat(repo, marker)
                repo.flush()
                yield "flushed"
        source = Source(host or actor.name, "sim", "/data")
        for name, (entry, digest) in (reuse or {}).items():
            entries.append(replace(entry, name=name))
            expected[name] = digest
        if idle:
            _heartbeat(repo, marker)
            croot = repo.objects_for(source.host).write_bytes(encode_directory(entries), metadata=True)
            repo.flush()
            repo.contents.revalidate()
            cp = Snapshot(source=source, root=croot, start=0, end=self.t, checkpoint=True, run="r" if part else "")
            labels = {**cp.labels(), "session": repo.session}
            if part:  # the part's own session, retired; the driver's, live
                labels.update(session="0" * len(repo.session), driver=repo.session)
            repo.manifests.put(labels, cp.payload())
            yield "checkpointed"
            for _ in range(idle):
                _heartbeat(repo, marker)
                yield "idle"
        _heartbeat(repo, marker)
        root = repo.objects_for(source.host).write_bytes(encode_directory(entries), metadata=True)
        repo.flush()
        yield "flushed tree"
        _heartbeat(repo, marker)
        repo.contents.revalidate()
        yield "revalidated"
        snap = Snapshot(source=source, root=root, start=0, end=self.t)
        rec = repo.manifests.put(snap.labels(), snap.payload())
        try:
            repo.contents.confirm_published()  # paused between revalidating and publishing?
        except ContentLost:
            repo.manifests.delete([rec.id])
            raise
        self.published[rec.id] = expected
        yield f"published {rec.id[:8]}"
        repo.close()

    def maintenance(self, actor: Actor, crash_at: int | None, stop_at: int | None = None, stop_for: float = 0.0,
                    full: bool | None = None, cache: bool | None = None):
        st = ActorStorage(self, crash_at, actor, stop_at, stop_for)
        repo = self.open(st, cache=self.uses_cache("maintenance") if cache is None else cache)
        rules = Rules()
        if self.mutation in ("content_age", "two_cycle_drop", "pack_age", "live_session", "pause_revalidation",
                             "checkpoint_session", "merge_copies_first", "spent_tombstones", "failure_type",
                             "part_driver"):
            setattr(rules, self.mutation, False)
        gc_clock = None
        if self.mutation == "storage_clock":
            gc_clock = _ClientClock(st, repo.session, SAFETY.max_pause, lambda: self.t + actor.skew)
        if full is None:
            full = self.rng.random() < 0.5  # half of the runs are `maintenance run --quick`
        # a memory limit this small splits the simulator's small indexes into several key ranges
        # and spills the reached keys in several runs: the bounded-memory plan, not one range
        options = MaintenanceOptions(full=full, rules=rules, memory_limit=SIM_MEMORY_LIMIT,
                                     failure_keep=SIM_FAILURE_KEEP)
        return (yield from maintenance_steps(repo, options, clock=gc_clock))

    def forgetter(self, actor: Actor):
        st = ActorStorage(self, None)
        repo = self.open(st)
        live = [i for i in self.published if i not in self.forgotten]
        keep = self.prof["keep"]
        if len(live) > keep:
            victims = self.rng.sample(live, self.rng.randint(1, len(live) - keep))
            repo.manifests.delete(victims)
            self.forgotten.update(victims)
            yield f"forgot {len(victims)}"

    # ---- invariant ---------------------------------------------------------------------------
    def check(self) -> None:
        """Invariant 1, through a reader whose index and manifests are read afresh (unless no
        blob that could matter changed since the last check: the index is reloaded when a blob
        of the index changed, the manifests when a manifest did, and the snapshots are read
        again when any blob did, e.g. a pack was deleted)."""
        state = (self.version, len(self.published), len(self.forgotten))
        if state == self._checked:
            return
        self._checked = state
        if self._reader is None:
            self._reader = Repository.open(self.storage, PASSWORD, heartbeat_thread=False)
            self._cache_reads(self._reader.contents)
        reader = self._reader
        if self._index_read != self.index_version:
            self._index_read = self.index_version
            reader.contents.refresh_index()  # (a reload, so lookups do not reload again meanwhile)
        if self._manifests_read != self.manifest_version:
            self._manifests_read = self.manifest_version
            self._records = {r.id: r for r in reader.manifests.find(type="snapshot")}
        records = self._records
        back = [sid[:8] for sid in self.gone if sid in records]
        if back:  # a tombstone dropped while a blob still held the record it deleted
            raise Violation(f"forgotten snapshots {back} are listed again")
        # a forget takes effect when its tombstone is newer than the record: not at once for one
        # whose listing lagged behind the snapshot and whose clock is behind its writer's
        self.gone.update(sid for sid in self.forgotten if sid not in records)
        for sid, expected in self.published.items():
            if sid in self.forgotten:
                continue
            try:
                rec = [records[sid]] if sid in records else []
                if not rec:
                    raise Violation(f"snapshot {sid[:8]} vanished from the manifests")
                snap = Snapshot.from_record(rec[0])
                got = {}
                for e in read_directory(reader.objects, snap.root):
                    got[e.name] = hashlib.sha256(self._read(reader, e.oid)).hexdigest()
            except KdistError as exc:
                raise Violation(f"snapshot {sid[:8]} does not restore: {exc}") from exc
            if got != expected:
                raise Violation(f"snapshot {sid[:8]} restores different data")

    def _cache_reads(self, contents) -> None:
        """Packs are immutable: a (content, pack, offset) authenticated once reads the same
        while the pack exists, so the check re-reads only what changed (files' chunks, and
        trees and chunk lists, which are read by id)."""
        cache: dict = {}
        read_entry = contents.read_entry

        def cached_read_entry(e, ref):
            key = (ref, e.pack, e.offset, e.packed_length, e.compression)
            if key in cache and e.pack in self.storage._blobs:  # existence, without a stat
                return cache[key]
            data = cache[key] = read_entry(e, ref)
            return data

        def cached_read(ref):
            e = contents.lookup(ref)
            if e is None:
                raise ContentNotFound(f"content {ref[:32].hex()} is not in the index")
            return cached_read_entry(e, ref)

        contents.read_entry, contents.read = cached_read_entry, cached_read

    def _read(self, reader: Repository, oid: str) -> bytes:
        out = bytearray()
        for cid, _n in reader.objects.chunks(oid):
            e = reader.contents.lookup(cid)
            if e is None:
                raise Violation(f"content {cid.hex()[:12]} is not in the index")
            out += reader.contents.read_entry(e, cid)
        return bytes(out)

    # ---- the schedule --------------------------------------------------------------------------
    def run(self, steps: int = 400) -> None:
        """Actors start at random times over the profile's span; each runs its steps quickly
        (minutes apart) unless paused; time jumps ahead when nobody is ready."""
        prof = self.prof
        span = prof["span"] * H
        kinds = ["writer"] * prof["writers"] + ["maintenance"] * prof["maintainers"] + ["forget"] * prof["forgets"]
        self._starts = sorted((self.rng.uniform(0, span), k) for k in kinds)
        self._t0 = self.t
        self._actors: list[Actor] = []
        self._spawned = 0
        self._steps, self._step_no = steps, 0
        while self._step_no < steps:
            if not self._tick():
                break

    def _spawn(self) -> None:
        prof, starts, actors = self.prof, self._starts, self._actors
        while self._spawned < len(starts) and self._t0 + starts[self._spawned][0] <= self.t:
            kind = starts[self._spawned][1]
            self._spawned += 1
            a = Actor(f"{kind}{self._spawned}", kind, None, skew=self.rng.uniform(-1, 1) * H * prof["skew"],
                      wake_at=self.t, last_step=self.t)
            crash = self.rng.randint(1, 40) if self.rng.random() < 0.2 else None
            if kind == "maintenance" and prof["maintenance_clock"] is not None:  # one host runs maintenance
                a.skew = (prof["maintenance_clock"] + self.rng.uniform(-0.1, 0.1)) * H
            if kind == "maintenance":
                stop_at, stop_for = None, 0.0
                if prof["sigstop_p"] and self.rng.random() < prof["sigstop_p"]:
                    stop_at, stop_for = self.rng.randint(2, 7), self.rng.choice(prof["sigstops"]) * H
                a.gen = self.maintenance(a, crash, stop_at, stop_for)
            else:
                a.gen = self.writer(a, crash) if kind == "writer" else self.forgetter(a)
            actors.append(a)

    def _tick(self, until: float | None = None) -> bool:
        """One step of the schedule (or a jump of time to the next event); False when all is done."""
        step = self._step_no
        self._step_no += 1
        self._spawn()
        actors = self._actors
        ready = [a for a in actors if not a.done and not a.stopped and a.wake_at <= self.t]
        if not ready:
            upcoming = [a.wake_at for a in actors if not a.done and not a.stopped]
            if self._spawned < len(self._starts):
                upcoming.append(self._t0 + self._starts[self._spawned][0])
            if until is not None:
                upcoming.append(until)
            if not upcoming:
                return False
            self._advance(min(upcoming) - self.t, actors)
            return True
        a = self.rng.choice(ready)
        self._step(a, step)
        self._advance(self.rng.expovariate(1 / (0.02 * H)), actors)
        if self.rng.random() < 0.08:  # a pause: a laptop sleeps, a VM stops, SIGSTOP
            a.paused_for = self.rng.choice([0.3, 1, 1.5, 3, 6, 12, 30]) * H
            a.wake_at = self.t + a.paused_for
        elif a.kind == "writer" and self.rng.random() < self.prof["stall_p"]:  # a stall: alive, reading a huge file
            a.wake_at = self.t + self.rng.choice(self.prof["stalls"]) * H
            a.stalled = True
        if self.cache_base is not None and self.cache_rng.random() < CACHE_EVENT_P:
            self.cache_event()
        self.check()
        return True

    def sigstop(self, actor: Actor | None, duration: float, what: str) -> None:
        """``actor`` is stopped in the middle of a storage request for ``duration``: the others
        run meanwhile (one level deep: a run stopped while another is stopped just goes on)."""
        if self._nested or actor is None or actor.done:
            return
        self.log.append(f"    t={self.t - 1_800_000_000:8.2f} {actor.name}: {what}, for {duration / H:.1f} H")
        actor.stopped = True
        actor.max_gap = max(actor.max_gap, duration)
        end, skew = self.t + duration, self._current_skew
        self._nested = True
        try:
            if self.on_stop is not None:
                self.on_stop(actor, end)
            while self.on_stop is None and self.t < end and self._step_no < self._steps:
                if not self._tick(until=end):
                    break
            if self.t < end:
                self._advance(end - self.t, self._actors)
        finally:
            self._nested = False
            actor.stopped = False
            self._current_skew = skew
        self.log.append(f"    t={self.t - 1_800_000_000:8.2f} {actor.name}: continued")

    def _advance(self, dt: float, actors: list[Actor]) -> None:
        """Let time pass; running writers' heartbeat threads keep their markers fresh meanwhile."""
        end = self.t + max(dt, 0.0)
        while True:
            for w in actors:
                if w.kind == "writer" and not w.done and (w.wake_at <= self.t or w.stalled) and w.repo is not None:
                    try:
                        _heartbeat(w.repo, w.repo.contents.marker)
                    except Crash as exc:
                        w.done = True
                        self.log.append(f"    t={self.t - 1_800_000_000:8.2f} {w.name}: {exc} (heartbeat)")
            if self.t >= end:
                self._stamp_cache()
                return
            self.t = min(end, self.t + SAFETY.session_heartbeat)

    def _step(self, a: Actor, step: int) -> None:
        a.max_gap = max(a.max_gap, a.paused_for)
        a.paused_for = 0.0
        a.stalled = False
        self._current_skew = a.skew
        try:
            what = next(a.gen)
            self.log.append(f"{step:3d} t={self.t - 1_800_000_000:8.2f} {a.name}: {what}")
        except StopIteration as fin:
            a.done = True
            detail = f" {fin.value.steps}" if getattr(fin.value, "steps", None) else ""
            self.log.append(f"{step:3d} t={self.t - 1_800_000_000:8.2f} {a.name}: done{detail}")
        except Crash as exc:
            a.done = True
            self.log.append(f"{step:3d} t={self.t - 1_800_000_000:8.2f} {a.name}: {exc}")
        except (SessionExpired, ContentLost) as exc:
            a.done = True
            self.log.append(f"{step:3d} t={self.t - 1_800_000_000:8.2f} {a.name}: refused: {exc}")
            if a.kind == "writer" and a.max_gap < SAFETY.session_expiry * 0.5 and isinstance(exc, ContentLost):
                raise Violation(f"{a.name} was live and still lost contents: {exc}") from exc
        except KdistError as exc:  # e.g. a maintenance run that refused a stale plan
            a.done = True
            self.log.append(f"{step:3d} t={self.t - 1_800_000_000:8.2f} {a.name}: stopped: {type(exc).__name__}: {exc}")
        finally:
            self._current_skew = 0.0
            a.last_step = self.t
            self._stamp_cache()


class Director:
    """Directed scenarios: the real code, through the World and its invariant checks, in a
    schedule written by hand, for a rule whose window random schedules hit too rarely."""

    def __init__(self, world: World):
        self.w = world
        world._actors, world._starts, world._t0, world._spawned = [], [], world.t, 0
        world._steps, world._step_no = 10**6, 0
        self.n = 0

    def spawn(self, kind: str, files=None, full=True, stop_at=None, stop_for=0.0, cache: bool | None = None,
              crash_at=None, **writer) -> Actor:
        """``cache``: open with the World's cache (None: as random schedules choose); ``writer``:
        the writer's other options (host, reuse, idle)."""
        self.n += 1
        a = Actor(f"{kind}{self.n}", kind, None, skew=0.0, wake_at=self.w.t, last_step=self.w.t)
        a.gen = (self.w.writer(a, None, files=files, cache=cache, **writer) if kind == "writer"
                 else self.w.maintenance(a, crash_at, stop_at, stop_for, full=full, cache=cache))
        self.w._actors.append(a)
        return a

    def run(self, a: Actor, until: str | None = None) -> Actor:
        """Step ``a`` until it is done, or until the step that logs ``until``; check after each."""
        while not a.done:
            self.w._step(a, self.w._step_no)
            self.w._step_no += 1
            self.w.check()
            self.wait(0.002)  # seconds apart
            if until is not None and until in self.w.log[-1]:
                break
        return a

    def wait(self, hours: float) -> None:
        self.w._advance(hours * H, self.w._actors)

    def while_stopped(self, stop_at: str, hours: float, meanwhile) -> None:
        """A quick maintenance run stopped (SIGSTOP) for ``hours`` just before its first write
        of a name starting with ``stop_at``; ``meanwhile()`` runs during the stop."""

        def on_stop(stopped: Actor, end: float) -> None:
            meanwhile()
            self.wait(end - self.w.t)

        self.w.on_stop = on_stop
        self.run(self.spawn("maintenance", full=False, stop_at=stop_at, stop_for=hours * H))
        self.w.on_stop = None

    def quick_runs(self, count: int, every: float) -> None:
        """``count`` quick maintenance runs, ``every`` hours apart (the first after one wait)."""
        for _ in range(count):
            self.wait(every)
            self.run(self.spawn("maintenance", full=False))

    def record_failure(self, host: str) -> None:
        """A backup of ``host`` failed and recorded it (``kdist.failures``)."""
        repo = self.w.open(ActorStorage(self.w, None))
        record_failure(repo.manifests, host, "sim", "/data", "simulated failure", 14)
        self.w.log.append(f"    t={self.w.t - 1_800_000_000:8.2f} recorded a failure of {host}")

    def forget(self, ids) -> None:
        repo = self.w.open(ActorStorage(self.w, None))
        repo.manifests.delete(list(ids))
        self.w.forgotten.update(ids)
        self.w.log.append(f"    t={self.w.t - 1_800_000_000:8.2f} forgot {len(ids)}")


def scenario_pause_revalidation(world: World) -> None:
    """A content-GC run is stopped (SIGSTOP, 6 H) after reading the storage time its marks carry
    and before writing them. Meanwhile a backup deduplicates against the contents it is about to
    mark and publishes, and two complete GC cycles drop_margin apart walk that snapshot (nothing
    is marked yet, so nothing to undelete). The marks then land, stamped 6 H early: older than the
    deletion watermark those two cycles make. Only the pause rule (withdrawing marks written more
    than max_pause after their time) stops the next range merge from dropping the contents."""
    d = Director(world)
    f = world.rng.randbytes(3000)
    d.run(d.spawn("writer", files=[f]))  # S0 reaches f's contents
    d.forget(list(world.published))  # ... and is forgotten: they are garbage
    d.wait(25)  # older than min_content_age

    def meanwhile(stopped: Actor, end: float) -> None:
        d.run(d.spawn("writer", files=[f]))  # S1 reaches them again (deduplicated: they are live)
        d.run(d.spawn("maintenance", full=True))  # C1 starts after the marks' time; walks S1
        d.wait(SAFETY.drop_margin + 0.2)
        d.run(d.spawn("maintenance", full=True))  # C2, drop_margin after C1
        d.wait(end - world.t)

    world.on_stop = meanwhile
    d.run(d.spawn("maintenance", full=True, stop_at="xn", stop_for=6 * H))  # stopped before the marks' put
    world.on_stop = None
    for _ in range(12):  # then quick runs, hourly: epochs advance and settle, range merges drop
        d.wait(1)
        d.run(d.spawn("maintenance", full=False))


def scenario_pack_age(world: World) -> None:
    """A listing that shows every new blob within listing_settle, in no particular order: here
    index blobs and manifests show up late (0.08 H), session markers sooner (0.03 H), packs at
    once. A backup uploads a full pack at its start; a blob-GC run lists the pack but not yet the
    session's first heartbeat (phase one: a candidate). The backup runs for an hour, indexes the
    pack, publishes, and ends its session (an end blob); a blob-GC run 0.04 H later lists the
    pack and the end blob but not yet the index blob naming it: no live session, and phase two
    deletes it. Only the pack age protects a pack this young."""
    d = Director(world)
    world.lag_by_prefix = {C.SESSION_PREFIX: 0.03 * H, C.INDEX_PREFIX: 0.08 * H, C.MANIFEST_PREFIX: 0.08 * H}
    big = world.rng.randbytes(PARAMS.pack_size + 16 * 1024)  # fills a pack: uploaded before any index names it
    w = d.spawn("writer", files=[big, world.rng.randbytes(2000)])
    d.run(w, until="wrote f0")
    d.wait(0.005)
    d.run(d.spawn("maintenance", full=True))  # R1: the pack, without its (not yet listed) session
    d.wait(SAFETY.cleanup_margin + 0.1)  # the backup reads on (its heartbeat keeps it live)
    d.run(w)  # index blob, manifest, session ended
    d.wait(0.04)
    d.run(d.spawn("maintenance", full=True))  # R2: the pack, without the (not yet listed) index blob


def scenario_two_cycle_drop(world: World) -> None:
    """A content-GC run walks the snapshots; before it writes its marks, a backup that
    deduplicated against some of those contents (they were live) publishes and retires. The marks
    land on contents a snapshot reaches. Then only quick runs (no walk): they advance the epoch
    until the marks' epoch settles, and merge it. Only the watermark (two complete cycles, the
    second of which walks the new snapshot and undeletes) keeps the merge from dropping them."""
    d = Director(world)
    f = world.rng.randbytes(3000)
    d.run(d.spawn("writer", files=[f]))  # S0 reaches f's contents
    d.forget(list(world.published))  # ... and is forgotten: they are garbage
    d.wait(25)  # older than min_content_age
    w = d.spawn("writer", files=[f])
    d.run(w, until="revalidated")  # deduplicated against them (live), about to publish
    m = d.run(d.spawn("maintenance", full=True), until="content-gc planned")  # the walk misses S1
    d.run(w)  # S1 published
    d.run(m)  # marks what S1 reaches
    for _ in range(12):  # then quick runs, hourly: epochs advance and settle, range merges drop
        d.wait(1)
        d.run(d.spawn("maintenance", full=False))


def scenario_manifest_compaction_pause(world: World) -> None:
    """Every rule on (a data-loss bug the sigstop profile found, now fixed): a quick run's
    manifest compaction reads the records, then is stopped (2 H) before it puts the compacted
    blob; a backup publishes meanwhile. Judged by the blob's own timestamp, the compacted blob
    would "cover" the snapshot's manifest and the next compaction delete it; judged by its
    ``read_at`` it does not."""
    d = Director(world)
    for _ in range(16):  # enough manifest blobs for a compaction
        d.run(d.spawn("writer", files=[world.rng.randbytes(500)]))

    d.while_stopped(C.MANIFEST_COMPACTED_PREFIX, 2,
                    lambda: d.run(d.spawn("writer", files=[world.rng.randbytes(500)])))
    d.quick_runs(3, 0.5)


def scenario_content_age(world: World) -> None:
    """A backup has uploaded and indexed its new contents and is about to publish when a full
    maintenance run walks every snapshot: those contents are unreachable, and young. Invariant 3:
    none of them is marked deleted. Only the minimum content age keeps content GC off them; with
    it off the marks land, the backup undeletes them before it publishes (so invariant 1 holds:
    the rule is not needed for safety), and the check below reports the churn."""
    d = Director(world)
    w = d.spawn("writer", files=[world.rng.randbytes(3000), world.rng.randbytes(5000)])
    d.run(w, until="flushed tree")  # packs and index written; no manifest reaches them yet
    d.run(d.spawn("maintenance", full=True))
    reader = world.open(ActorStorage(world, None))
    marked = [e for e in reader.contents.epochs.load_index() if e.deleted]
    if marked:
        raise Violation(f"maintenance marked {len(marked)} contents of a running backup deleted")
    d.run(w)
    if not w.done or not world.published:
        raise Violation("the running backup did not publish")


def scenario_listing_decides(world: World) -> None:
    """The listing alone decides which index blobs make up the index; the local cache only
    supplies the bytes of blobs the listing names. A backup on a host with a cache publishes S0;
    the cache keeps the index blob naming S0's contents, live, and a copy of the cache is taken
    (a backup of the home directory). S0 is forgotten; hourly maintenance marks its contents,
    and once two cycles drop_margin apart have passed, a range merge drops the marks: the
    contents are gone from the index (and blob GC deletes their packs). A backup on the host
    follows the listing (its cache drops the superseded file); then the old copy is restored
    over the cache. A backup of the same file must upload its contents again: a load that also
    took the restored, superseded index file would find them live, deduplicate against them,
    and publish a snapshot whose contents are not in the index."""
    d = Director(world)
    f = world.rng.randbytes(3000)
    d.run(d.spawn("writer", files=[f], cache=True))  # S0; the cache holds the blob naming f's contents
    lost = _snapshot_contents(world, next(iter(world.published)))
    packs = {world.open(ActorStorage(world, None)).contents.lookup(c).pack for c in lost}
    world.cache_event("copy")
    d.forget(list(world.published))  # f's contents are garbage
    d.wait(25)  # older than min_content_age
    for _ in range(24):  # mark, two cycles drop_margin apart, epochs settle, a range merge drops
        d.run(d.spawn("maintenance", full=True, cache=False))
        d.wait(1)
        index = world.open(ActorStorage(world, None)).contents.epochs.load_index()
        if all(index.lookup(c) is None for c in lost) and not packs & set(world.storage._blobs):
            break  # dropped from the index, and blob GC deleted their packs
    else:
        raise RuntimeError("scenario listing_decides: the contents were not dropped; it tests nothing")
    d.run(d.spawn("writer", files=[world.rng.randbytes(500)], cache=True))  # the cache follows the listing
    world.cache_event("restore", over=True, keep_times=False)
    d.run(d.spawn("writer", files=[f], cache=True))  # must not deduplicate against f's old contents


def scenario_reauthenticate_mapped(world: World) -> None:
    """A process reuses the index blobs it mapped from the cache at every later load of the
    index, and a byte of such a file may change in place after it was authenticated (another
    program writing into it; bit rot read back in after the page was evicted): every load must
    authenticate the mapped files it reuses again (a data-loss bug the simulator found). Here: S0's content X is forgotten
    and marked deleted (C1); cycles C2 and C4, drop_margin apart, pass, and a range set R holds
    X's mark. A backup maps R from the cache, and then X's deleted flag in R's file flips. If its
    next reload, index_refresh later, used the mapping as it was, X would look live: the backup
    would deduplicate against X and publish S1 (its revalidation seeing X live too), and quick
    runs, merging with the watermark past the mark, would drop X from under S1. (Random
    schedules found milder forms: a flipped content id hiding a content a backup had
    deduplicated against, which then refused to publish; a flipped pack number, an IndexError
    in a maintenance run.)"""
    d = Director(world)
    f = world.rng.randbytes(200)  # one chunk: one content, X
    d.run(d.spawn("writer", files=[f], cache=False))  # S0
    (x,) = _snapshot_contents(world, next(iter(world.published)))
    d.forget(list(world.published))
    d.wait(25)  # older than min_content_age
    for _ in range(3):  # C1 marks X; C2, C3 advance the epoch, compact, merge (X's mark kept)
        d.run(d.spawn("maintenance", full=True, cache=False))
        d.wait(1)
    d.wait(SAFETY.drop_margin + 0.2 - 2)
    d.run(d.spawn("maintenance", full=True, cache=False))  # C4, drop_margin after C2
    w = d.spawn("writer", files=[world.rng.randbytes(300), f], cache=True)
    d.run(w, until="wrote f0")  # its index, X's mark included, mapped from the cache
    flipped = 0
    for name in sorted(w.repo.contents.epochs.loaded_names()):
        path = world._cache_index / name
        data = path.read_bytes()
        at = data.find(x)
        flags = at + C.CONTENT_ID_SIZE + 4 * 4 + 1  # INDEX_ENTRY: id, pack, offset, 2 lengths, compression, flags
        if at >= 0 and data[flags] & C.INDEX_FLAG_DELETED:
            what = world.damage(path, flags, C.INDEX_FLAG_DELETED, in_place=True)
            world.log.append(f"    t={world.t - T0:8.2f} cache: {what}")
            flipped += 1
    if not flipped:
        raise RuntimeError("scenario reauthenticate_mapped: X's mark is not in the backup's index; it tests nothing")
    d.wait(SAFETY.index_refresh + 0.01)
    d.run(w)  # reloads (the mapping: X live), deduplicates against X, publishes S1
    for _ in range(8):  # quick runs: a merge drops X
        d.wait(1)
        d.run(d.spawn("maintenance", full=False, cache=False))


def scenario_checkpoint_session(world: World) -> None:
    """A long backup reuses an unchanged file of snapshot P (it names the file's contents without
    reading them: only its checkpoint protects them, writer rule 6), publishes a checkpoint and
    runs on, heartbeating. P is forgotten, and a later backup of the same source finishes, which
    supersedes the checkpoint as the next night's backup would. Only the liveness rule keeps
    maintenance from taking the checkpoint for a dead backup's: without it the checkpoint is
    forgotten, content GC marks the file's contents, a merge two cycles later drops them, and the
    long backup's snapshot does not restore."""
    _long_backup_reusing_a_forgotten_file(world, Director(world))


def _long_backup_reusing_a_forgotten_file(world: World, d: "Director", **writer) -> None:
    """``checkpoint_session``'s schedule; ``writer``: the long backup's other options."""
    f = world.rng.randbytes(3000)
    d.run(d.spawn("writer", files=[f], host="h"))
    [p] = list(world.published)
    reader = world.open(ActorStorage(world, None))
    rec = next(r for r in reader.manifests.find(type="snapshot") if r.id == p)
    [old] = read_directory(reader.objects, Snapshot.from_record(rec).root)
    w = d.spawn("writer", files=[world.rng.randbytes(500)], host="h", idle=60,
                reuse={"unchanged": (old, hashlib.sha256(f).hexdigest())}, **writer)
    d.run(w, until="checkpointed")
    d.forget([p])
    d.run(d.spawn("writer", files=[world.rng.randbytes(500)], host="h"))  # supersedes the checkpoint
    for hour in range(50):  # maintenance hourly, GC every other hour; the backup heartbeats between
        d.wait(1)
        d.run(w, until="idle")
        d.run(d.spawn("maintenance", full=hour % 2 == 0))
    d.run(w)  # publishes: its tree names the reused file


def scenario_part_driver(world: World) -> None:
    """As ``checkpoint_session``, for a sharded backup: its part reuses an unchanged file of
    snapshot P and publishes a checkpoint naming its run and its driver's session; the part's
    own session is retired (parts finish before their driver publishes) while the driver runs
    on, heartbeating. P is forgotten and a later backup of the same source finishes. Only judging
    the part by its driver's session keeps maintenance from forgetting it: with the mutation it
    is judged by its own, forgotten, the file's contents are marked and dropped, and the
    driver's snapshot does not restore. The driver here, unlike kdist's, keeps its part when it
    publishes: once its session has ended, maintenance must forget the part."""
    d = Director(world)
    _long_backup_reusing_a_forgotten_file(world, d, part=True)
    d.wait(SAFETY.session_expiry + SAFETY.listing_settle + 1)
    d.run(d.spawn("maintenance", full=False))
    reader = world.open(ActorStorage(world, None))
    if any(r.labels.get("run") for r in reader.manifests.find(type="snapshot")):
        raise AssertionError("a dead driver's part was never forgotten")


def scenario_merge_copies_first(world: World) -> None:
    """Leveled compaction: the xs sets of four epochs above the range set are merged forward into
    the current epoch. They hold the only entries of published snapshots' contents (the epochs'
    raw blobs are long cleaned up), and the run that merges them crashes at its first copy's put.
    Only the order keeps that crash from losing them: copies first, and the sources deleted by a
    later run once every copy is in the index. With the mutation the run deletes the sources
    before it writes the copies."""
    d = Director(world)
    _sets_to_merge(world, d)
    d.run(d.spawn("maintenance", full=False, crash_at=C.INDEX_PREFIX))  # the merging run
    if "crash at" not in world.log[-1]:
        raise AssertionError("the scenario did not reach a set merge")
    d.quick_runs(6, 1)  # then ordinary runs


def scenario_merge_paused_and_racing(world: World) -> None:
    """Every rule on: a run merging the sets of four epochs forward is stopped (3 H) at its first
    copy's put; meanwhile another run merges the same sets, later runs delete the sources, and
    backups go on. The stopped run then puts its copies (of blobs read before it stopped) and
    records its merge. Nothing may be lost, and no set merged twice may make readers miss an
    entry."""
    d = Director(world)
    _sets_to_merge(world, d)

    def meanwhile() -> None:
        for _ in range(2):
            d.run(d.spawn("writer", files=[world.rng.randbytes(1500)]))
            d.quick_runs(3, 0.5)

    d.while_stopped(C.INDEX_PREFIX, 3, meanwhile)
    if not any("merge the sets" in line or "'merged'" in line for line in world.log):
        raise AssertionError("the scenario did not reach a set merge")
    d.quick_runs(8, 1)


def _sets_to_merge(world: World, d: Director) -> None:
    """A large range set (synthetic entries), then backups one an epoch until four epochs'
    compacted sets above it wait to be merged forward (the next quick run merges them)."""
    repo = world.open(ActorStorage(world, None))
    rng = random.Random(5)
    repo.contents.epochs.write_index([IndexEntry(rng.randbytes(32), "p" + "0" * 63, 0, 1, 1, 0, 1)
                                      for _ in range(3000)])
    d.quick_runs(6, 1)
    while True:
        d.run(d.spawn("writer", files=[world.rng.randbytes(2000)]))
        for _ in range(4):
            d.wait(1)
            view = world.open(ActorStorage(world, None)).contents.epochs.refresh()
            above = [e for (k, e), sets in view.sets.items() if k == C.COMPACTED_PREFIX and not view.raw.get(e)
                     and e > 0 and any(st.complete for st in sets)]
            if len(above) >= 4:
                return
            d.run(d.spawn("maintenance", full=False))


def scenario_spent_tombstones(world: World) -> None:
    """Manifest compaction drops a tombstone only once no listed blob holds a live record of its
    id. A quick run reads the records and is stopped (2 H) before it puts its compacted blob;
    meanwhile a snapshot is forgotten and other runs compact (dropping the tombstone, with the
    mutation) and delete the blobs their compacted blob covers. The stopped run then puts a blob
    holding the snapshot's live record, which nothing hides any more: it is listed again."""
    d = Director(world)
    for _ in range(16):  # enough manifest blobs for a compaction
        d.run(d.spawn("writer", files=[world.rng.randbytes(500)]))
    victim = next(iter(world.published))

    def meanwhile() -> None:
        d.forget([victim])
        d.quick_runs(3, 0.5)

    d.while_stopped(C.MANIFEST_COMPACTED_PREFIX, 2, meanwhile)
    d.quick_runs(3, 0.5)


def scenario_failure_type(world: World) -> None:
    """Maintenance forgets failure records (``kdist/failures.py``) once they are older than
    their keep, and only those: a snapshot is published and a failed backup of the same host
    is recorded; both grow old, runs forget the record and the snapshot stays. With the
    mutation the step takes every old record, and the snapshot goes with it."""
    d = Director(world)
    d.run(d.spawn("writer", files=[world.rng.randbytes(500)], host="h"))
    d.record_failure("h")
    d.wait(SIM_FAILURE_KEEP + 1)
    d.quick_runs(2, 1)
    if read_failures(world.open(ActorStorage(world, None)).manifests):
        raise AssertionError("the scenario's failure record was never forgotten")


def _snapshot_contents(world: World, sid: str) -> set[bytes]:
    """The content ids a published snapshot reaches (its tree's files' chunks)."""
    reader = world.open(ActorStorage(world, None))
    rec = next(r for r in reader.manifests.find(type="snapshot") if r.id == sid)
    out = set()
    for e in read_directory(reader.objects, Snapshot.from_record(rec).root):
        out.update(cid for cid, _n in reader.objects.chunks(e.oid))
    return out


# Directed scenarios: each named for the rule it shows load-bearing (it must pass with every rule
# on and fail with that one off), except those for a bug found and fixed (they must pass), and
# those in OPEN_BUGS, which fail with every rule on (none now).
SCENARIOS = {"pause_revalidation": scenario_pause_revalidation, "pack_age": scenario_pack_age,
             "two_cycle_drop": scenario_two_cycle_drop, "content_age": scenario_content_age,
             "manifest_compaction_pause": scenario_manifest_compaction_pause,
             "listing_decides": scenario_listing_decides,
             "reauthenticate_mapped": scenario_reauthenticate_mapped,
             "checkpoint_session": scenario_checkpoint_session,
             "merge_copies_first": scenario_merge_copies_first,
             "spent_tombstones": scenario_spent_tombstones,
             "failure_type": scenario_failure_type,
             "part_driver": scenario_part_driver,
             "merge_paused_and_racing": scenario_merge_paused_and_racing}
OPEN_BUGS: tuple[str, ...] = ()


def run_scenario(name: str, mutation: str | None = None, seed: int = 0) -> World:
    world = World(seed, mutation)
    try:
        SCENARIOS[name](world)
    finally:
        world.close()
    return world


class _SeededSecrets:
    """Stands in for ``secrets`` in the library while a schedule runs: names, ids and keys
    derive from the seed, so a seed replays the same blobs in the same order. Only for the
    thread that runs the schedule: another thread (a session heartbeat of a repository an
    earlier test left open, in the same process) gets real randomness, and draws nothing from
    the seed (one such draw once changed a replayed schedule's snapshot ids in CI)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.thread = threading.get_ident()

    def token_bytes(self, n: int = 32) -> bytes:
        if threading.get_ident() != self.thread:
            return secrets.token_bytes(n)
        return self.rng.randbytes(n)

    def token_hex(self, n: int = 32) -> str:
        if threading.get_ident() != self.thread:
            return secrets.token_hex(n)
        return self.rng.randbytes(n).hex()


_SECRETS_USERS = ("repo_format.repository", "repo_format.crypto", "repo_format.pack", "repo_format.epoch",
                  "repo_format.format_blob", "repo_format.session", "repo_format.manifest", "repo_format.keyslots")


_SERIAL_USERS = ("repo_format.epoch", "repo_format.manifest", "repo_format.content_reader")


def _serial_map(fn, items):
    return [fn(x) for x in items]


def _seed_randomness(rng: random.Random) -> None:
    """Also: blob reads run one after another instead of on the shared thread pool (the same
    results, in the same order, without a thread hand-off per read)."""
    fake = _SeededSecrets(rng)
    for name in _SECRETS_USERS:
        setattr(sys.modules[name], "secrets", fake)
    for name in _SERIAL_USERS:
        setattr(sys.modules[name], "parallel_map", _serial_map)


def _restore_randomness() -> None:
    import secrets
    from repo_format.io_pool import parallel_map
    for name in _SECRETS_USERS:
        setattr(sys.modules[name], "secrets", secrets)
    for name in _SERIAL_USERS:
        setattr(sys.modules[name], "parallel_map", parallel_map)


_SYSTEM_TIME = clock.system_time
_CACHE_LOG = logging.getLogger("kdist.cache")


class _CacheLog(logging.Handler):
    """The local cache's warnings (a damaged file discarded, ...) go into the World's log."""

    def __init__(self, world: World):
        super().__init__(logging.INFO)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if self.world.cache_base is not None:
            msg = msg.replace(str(self.world.cache_base), "<cache>")
        self.world.log.append(f"    t={self.world.t - 1_800_000_000:8.2f} cache: {msg}")


def _load_every_cached_blob(epochs):
    """Mutation 'listing_decides': the index load also uses every index file in the local cache,
    not only those of the blobs the listing names (e.g. a cache "warmed" first, the listing
    then adding what is new): stale files of superseded blobs, as a copy of the cache restored
    from long ago brings back, come into the index."""
    real = epochs.load_index

    def load_index():
        cached = []
        try:
            names = sorted(n for n in os.listdir(epochs.cache.directory / INDEX_DIR) if not n.startswith("."))
        except OSError:
            names = []
        for name in names:
            blob = epochs.cache.index_blob(name)  # authentic: a blob of this repository, once
            if blob is not None:
                cached.append((name, blob))
        index = real()
        listed = epochs.loaded_names()
        return MergedIndex(index._blobs + [b for name, b in cached if name not in listed])

    return load_index


def _heartbeat(repo: Repository, marker) -> None:
    """The heartbeat thread's work, done in the schedule so it stays deterministic."""
    if repo.contents._marker_started and clock.monotonic() - (marker._last_ok or 0) >= SAFETY.session_heartbeat:
        marker.refresh()
        marker.on_beat()


def _stale_write_index(epochs):
    """Mutation 'view_staleness': write into the epoch of an old view, never re-check."""
    first_view = {}

    def write_index(entries):
        from repo_format.index import encode_index, seal_index
        view = first_view.setdefault("v", epochs.view or epochs.refresh())
        plaintext = encode_index(entries)
        name = epochs._raw_name(plaintext, view.current)
        epochs.storage.put(name, seal_index(epochs._aead, name, plaintext))
        return name

    return write_index


class _ClientClock(StorageClock):
    """Mutation 'storage_clock': the maintenance job trusts its own (skewed) clock."""

    def __init__(self, storage, session, max_pause, client_now):
        self._client_now = client_now
        super().__init__(storage, session, max_pause)

    def now(self) -> float:
        return self._client_now()


def run_schedule(seed: int, mutation: str | None = None, listing_lag: float = 0.0, steps: int = 400,
                 profile: str = "mixed", caches: bool = True, format_version: int = C.FORMAT_VERSION) -> World:
    world = World(seed, mutation, listing_lag, profile, caches, format_version)
    try:
        world.run(steps=steps)
    finally:
        world.close()
    return world


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--mutation", choices=MUTATIONS)
    ap.add_argument("--listing-lag", type=float, default=0.0)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="mixed")
    ap.add_argument("--no-cache", action="store_true", help="no process uses a local cache")
    ap.add_argument("--log", action="store_true", help="print every schedule's log, not only a failing one's")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), help="run one directed scenario instead")
    ap.add_argument("--format-version", type=int, choices=(C.FORMAT_VERSION, C.FORMAT_VERSION_CONVERGENT),
                    default=C.FORMAT_VERSION, help="3: format 3 (convergent content records, sealed snapshot records)")
    args = ap.parse_args(argv)
    if args.scenario:
        world = World(args.seed, args.mutation)
        try:
            SCENARIOS[args.scenario](world)
        except Violation as exc:
            print("\n".join(world.log))
            print(f"VIOLATION in scenario {args.scenario}: {exc}")
            return 1
        finally:
            world.close()
        if args.log:
            print("\n".join(world.log))
        print(f"scenario {args.scenario}: no violation")
        return 0
    for seed in range(args.seed, args.seed + args.schedules):
        world = World(seed, args.mutation, args.listing_lag, args.profile, not args.no_cache, args.format_version)
        try:
            world.run(steps=args.steps)
        except Violation as exc:
            print("\n".join(world.log))
            print(f"VIOLATION with seed {seed}: {exc}")
            return 1
        else:
            if args.log:
                print("\n".join(world.log))
        finally:
            world.close()
    print(f"{args.schedules} schedules, no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
