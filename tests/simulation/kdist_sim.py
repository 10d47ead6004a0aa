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

Invariants, checked after every step:
1. every snapshot that was published and not forgotten restores completely, every content
   authenticating (checked through a freshly opened reader);
2. a writer that was never paused past its session expiry and did not crash publishes its
   snapshot (maintenance must not take contents from under a live backup);
3. (scenario ``content_age``) maintenance never marks a running backup's new contents deleted:
   not a safety property (the backup undeletes them, gc/README.md), but each such mark is churn
   that costs the backup an undelete and makes another backup upload the content again.

Run a soak: ``python tests/simulation/kdist_sim.py --schedules 20000 [--seed N] [--mutation RULE]
[--profile P] [--listing-lag H]``; ``--log`` prints every schedule's log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
from dataclasses import dataclass, field, replace

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import clock  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format.content import ContentLost  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import KdistError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.session import SessionExpired  # noqa: E402
from repo_format.storage.base import BlobStorage  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

from kdist.gc.clock_guard import StorageClock  # noqa: E402
from kdist.gc.run import MaintenanceOptions, Rules, maintenance_steps  # noqa: E402
from kdist.snapshot import Entry, Snapshot, Source, TYPE_FILE, encode_directory, read_directory  # noqa: E402

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
PROFILES = {
    "mixed": {"pool": 10, "writers": 10, "maintainers": 14, "forgets": 5, "keep": 2, "span": 200.0},
    "churn": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0},
    "stall": {"pool": 8, "writers": 12, "maintainers": 40, "forgets": 6, "keep": 2, "span": 150.0,
              "file_max": 40000, "chunk_avg": 4096, "stall_p": 0.06, "stalls": (3, 36, 48),
              "skew": 3.0, "maintenance_clock": 3.0},
    "sigstop": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0,
                "sigstop_p": 0.7, "sigstops": (3, 6, 12, 30)},
}
PROFILE_DEFAULTS = {
    "pack_size": 64 * 1024,  # bytes; the repository's pack size (64 KiB is the format's minimum)
    "chunk_avg": 1024,  # bytes; chunks are a quarter to four times this
    "file_max": 5000,  # largest file of the pool and unique files (bytes)
    "stall_p": 0.04, "stalls": (3, 10, 30),  # chance per writer step of a stall, and its length (H)
    "skew": 1.0,  # client clocks are off by up to this (H), maintenance clients' included
    "maintenance_clock": None,  # if set, every maintenance run's clock is this far ahead (H), +-0.1
    "sigstop_p": 0.0, "sigstops": (),  # chance a maintenance run is stopped inside a request, length (H)
}


def profile(name: str) -> dict:
    return {**PROFILE_DEFAULTS, **PROFILES[name]}


MUTATIONS = ("content_age", "two_cycle_drop", "pack_age", "live_session", "view_staleness",
             "pause_revalidation", "storage_clock")


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

    def _write(self, name: str):
        self.writes += 1
        if self.crash_at_write is not None and self.writes >= self.crash_at_write:
            raise Crash(f"crash at write {self.writes}")
        stop = self.stop_at_write
        if stop is not None and (self.writes == stop if isinstance(stop, int) else name.startswith(stop)):
            self.stop_at_write = None  # stopped once
            self.world.sigstop(self.actor, self.stop_for, f"stopped before write {self.writes} ({name[:2]})")

    def _created(self, name):
        if name not in self.inner._blobs:
            self.world.created[name] = self.world.t
        self.world.changed(name)

    def put(self, name, data):
        self._write(name)
        self._created(name)
        self.inner.put(name, data)

    def put_if_absent(self, name, data):
        self._write(name)
        self._created(name)
        return self.inner.put_if_absent(name, data)

    def get(self, name, offset=0, length=-1):
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
        self.inner.delete(name)
        self.world.created.pop(name, None)
        self.world.changed(name)


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
    t: float = 1_800_000_000.0
    log: list = field(default_factory=list)
    published: dict = field(default_factory=dict)  # snapshot id -> {name: sha256}
    forgotten: set = field(default_factory=set)
    created: dict = field(default_factory=dict)  # blob name -> when it was created (listing lag)
    lag_by_prefix: dict = field(default_factory=dict)  # directed scenarios: some kinds of blob list later
    on_stop: object = None  # directed scenarios: what happens while an actor is stopped (sigstop)

    def __post_init__(self):
        self.prof = profile(self.profile)
        self.rng = random.Random(self.seed)
        _seed_randomness(random.Random(self.seed ^ 0x5EED))
        self.storage = MemoryStorage(clock=lambda: self.t)
        self.pool = self._file_pool()
        self._current_skew = 0.0
        self._reader = None
        clock.set_clock(lambda: self.t + self._current_skew)
        clock.set_monotonic(lambda: self.t)  # durations are true durations
        self._nested = False
        self.version, self._checked = 0, None
        avg = self.prof["chunk_avg"]
        params = replace(PARAMS, pack_size=self.prof["pack_size"], metadata_pack_size=self.prof["pack_size"],
                         chunk_avg=avg, chunk_min=avg // 4, chunk_max=avg * 4)
        Repository.create(self.storage, PASSWORD, params, KdfParams.weak_for_tests()).close()

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

    def lag_of(self, name: str) -> float:
        """How long after its creation a blob shows up in listings (at most listing_settle)."""
        for prefix, lag in self.lag_by_prefix.items():
            if name.startswith(prefix):
                return lag
        return self.listing_lag

    def open(self, actor_storage, **kw) -> Repository:
        return Repository.open(actor_storage, PASSWORD, heartbeat_thread=False, **kw)

    # ---- actors ----------------------------------------------------------------------------
    def writer(self, actor: Actor, crash_at: int | None, files: list[bytes] | None = None):
        st = ActorStorage(self, crash_at)
        repo = actor.repo = self.open(st)
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
        _heartbeat(repo, marker)
        root = repo.objects.write_bytes(encode_directory(entries), metadata=True)
        repo.flush()
        yield "flushed tree"
        _heartbeat(repo, marker)
        repo.contents.revalidate()
        yield "revalidated"
        snap = Snapshot(source=Source(actor.name, "sim", "/data"), root=root, start=0, end=self.t)
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
                    full: bool | None = None):
        st = ActorStorage(self, crash_at, actor, stop_at, stop_for)
        repo = self.open(st)
        rules = Rules()
        if self.mutation in ("content_age", "two_cycle_drop", "pack_age", "live_session", "pause_revalidation"):
            setattr(rules, self.mutation, False)
        gc_clock = None
        if self.mutation == "storage_clock":
            gc_clock = _ClientClock(st, repo.session, SAFETY.max_pause, lambda: self.t + actor.skew)
        if full is None:
            full = self.rng.random() < 0.5  # half of the runs are `maintenance run --quick`
        return (yield from maintenance_steps(repo, MaintenanceOptions(full=full, rules=rules), clock=gc_clock))

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
        blob that could matter changed since the last check)."""
        state = (self.version, len(self.published), len(self.forgotten))
        if state == self._checked:
            return
        self._checked = state
        if self._reader is None:
            self._reader = Repository.open(self.storage, PASSWORD, heartbeat_thread=False)
            self._reader.contents.read_entry = self._cached_read(self._reader.contents.read_entry)
        reader = self._reader
        reader.contents.committed = reader.contents.epochs.load_index()
        records = {r.id: r for r in reader.manifests.find(type="snapshot")}
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

    def _cached_read(self, read_entry):
        """Packs are immutable: a (content, pack, offset) authenticated once reads the same
        while the pack exists, so the check re-reads only what changed."""
        cache: dict = {}

        def read(e):
            key = (e.content_id, e.pack, e.offset, e.packed_length, e.compression)
            if key in cache and e.pack in self.storage._blobs:  # existence, without a stat
                return cache[key]
            data = cache[key] = read_entry(e)
            return data

        return read

    def _read(self, reader: Repository, oid: str) -> bytes:
        out = bytearray()
        for cid, _n in reader.objects.chunks(oid):
            e = reader.contents.lookup(cid)
            if e is None:
                raise Violation(f"content {cid.hex()[:12]} is not in the index")
            out += reader.contents.read_entry(e)
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


class Director:
    """Directed scenarios: the real code, through the World and its invariant checks, in a
    schedule written by hand, for a rule whose window random schedules hit too rarely."""

    def __init__(self, world: World):
        self.w = world
        world._actors, world._starts, world._t0, world._spawned = [], [], world.t, 0
        world._steps, world._step_no = 10**6, 0
        self.n = 0

    def spawn(self, kind: str, files=None, full=True, stop_at=None, stop_for=0.0) -> Actor:
        self.n += 1
        a = Actor(f"{kind}{self.n}", kind, None, skew=0.0, wake_at=self.w.t, last_step=self.w.t)
        a.gen = (self.w.writer(a, None, files=files) if kind == "writer"
                 else self.w.maintenance(a, None, stop_at, stop_for, full=full))
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
    session markers, index blobs and manifests show up late (0.08 H), packs at once. A backup uploads a full
    pack at its start; a blob-GC run lists the pack but not yet the session marker (phase one:
    a candidate). The backup runs for an hour, indexes the pack, publishes, and retires its
    marker; a blob-GC run right then lists the pack but not yet the index blob naming it, and no
    live session: phase two deletes it. Only the pack age protects a pack this young."""
    d = Director(world)
    world.lag_by_prefix = {C.SESSION_PREFIX: 0.08 * H, C.INDEX_PREFIX: 0.08 * H, C.MANIFEST_PREFIX: 0.08 * H}
    big = world.rng.randbytes(PARAMS.pack_size + 16 * 1024)  # fills a pack: uploaded before any index names it
    w = d.spawn("writer", files=[big, world.rng.randbytes(2000)])
    d.run(w, until="wrote f0")
    d.wait(0.02)
    d.run(d.spawn("maintenance", full=True))  # R1: the pack, without its (not yet listed) session
    d.wait(SAFETY.cleanup_margin + 0.1)  # the backup reads on (its heartbeat keeps it live)
    d.run(w)  # index blob, manifest, marker retired
    d.wait(0.02)
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

    def meanwhile(stopped: Actor, end: float) -> None:
        d.run(d.spawn("writer", files=[world.rng.randbytes(500)]))
        d.wait(end - world.t)

    world.on_stop = meanwhile
    d.run(d.spawn("maintenance", full=False, stop_at=C.MANIFEST_COMPACTED_PREFIX, stop_for=2 * H))
    world.on_stop = None
    for _ in range(3):
        d.wait(0.5)
        d.run(d.spawn("maintenance", full=False))


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


# Directed scenarios: each named for the rule it shows load-bearing (it must pass with every rule
# on and fail with that one off), except those for a bug found and fixed (they must pass), and
# those in OPEN_BUGS, which fail with every rule on (none now).
SCENARIOS = {"pause_revalidation": scenario_pause_revalidation, "pack_age": scenario_pack_age,
             "two_cycle_drop": scenario_two_cycle_drop, "content_age": scenario_content_age,
             "manifest_compaction_pause": scenario_manifest_compaction_pause}
OPEN_BUGS: tuple[str, ...] = ()


def run_scenario(name: str, mutation: str | None = None, seed: int = 0) -> World:
    world = World(seed, mutation)
    try:
        SCENARIOS[name](world)
    finally:
        clock.set_clock(None)
        clock.set_monotonic(None)
        _restore_randomness()
    return world


class _SeededSecrets:
    """Stands in for ``secrets`` in the library while a schedule runs: names, ids and keys
    derive from the seed, so a seed replays the same blobs in the same order."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def token_bytes(self, n: int = 32) -> bytes:
        return self.rng.randbytes(n)

    def token_hex(self, n: int = 32) -> str:
        return self.rng.randbytes(n).hex()


_SECRETS_USERS = ("repo_format.repository", "repo_format.crypto", "repo_format.pack", "repo_format.epoch",
                  "repo_format.format_blob", "repo_format.session", "repo_format.manifest")


_SERIAL_USERS = ("repo_format.epoch", "repo_format.manifest")


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
                 profile: str = "mixed") -> World:
    world = World(seed, mutation, listing_lag, profile)
    try:
        world.run(steps=steps)
    finally:
        clock.set_clock(None)
        clock.set_monotonic(None)
        _restore_randomness()
    return world


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--mutation", choices=MUTATIONS)
    ap.add_argument("--listing-lag", type=float, default=0.0)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="mixed")
    ap.add_argument("--log", action="store_true", help="print every schedule's log, not only a failing one's")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), help="run one directed scenario instead")
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
            clock.set_clock(None)
            clock.set_monotonic(None)
            _restore_randomness()
        if args.log:
            print("\n".join(world.log))
        print(f"scenario {args.scenario}: no violation")
        return 0
    for seed in range(args.seed, args.seed + args.schedules):
        world = World(seed, args.mutation, args.listing_lag, args.profile)
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
            clock.set_clock(None)
            clock.set_monotonic(None)
            _restore_randomness()
    print(f"{args.schedules} schedules, no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
