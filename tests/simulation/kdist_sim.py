"""A deterministic simulator of the lock-free protocol, running the real code.

World: one in-memory storage whose timestamps come from a virtual clock (the storage's clock),
optionally a listing that lags behind writes. Actors are generators that run real kdist code one
step at a time: writers (each with its own clock skew, pauses, crashes at any storage write, and
files drawn from a shared pool so they deduplicate against each other and against old, possibly
deleted contents), maintenance jobs (``kdist.gc.run.maintenance_steps``; pauses longer than the
margins, crashes between steps), and forgets of old snapshots. The scheduler picks the next actor
with a seeded RNG, so a seed reproduces a schedule exactly.

Invariants, checked after every step:
1. every snapshot that was published and not forgotten restores completely, every content
   authenticating (checked through a freshly opened reader);
2. a writer that was never paused past its session expiry and did not crash publishes its
   snapshot (maintenance must not take contents from under a live backup).

Run a soak: ``python tests/simulation/kdist_sim.py --schedules 20000 [--seed N] [--mutation RULE]``.
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
PROFILES = {
    "mixed": {"pool": 10, "writers": 10, "maintainers": 14, "forgets": 5, "keep": 2, "span": 200.0},
    "churn": {"pool": 4, "writers": 12, "maintainers": 40, "forgets": 12, "keep": 1, "span": 150.0},
}
MUTATIONS = ("content_age", "two_cycle_drop", "pack_age", "live_session", "view_staleness",
             "pause_revalidation", "storage_clock")


class Crash(Exception):
    """An actor dies here (kill -9): whatever it had not finished stays as it is."""


class Violation(AssertionError):
    pass


class ActorStorage(BlobStorage):
    """One actor's door to the shared storage: may crash it at a chosen write, may lag listings."""

    def __init__(self, world: "World", crash_at_write: int | None):
        self.world = world
        self.inner = world.storage
        self.crash_at_write = crash_at_write
        self.writes = 0

    def _write(self):
        self.writes += 1
        if self.crash_at_write is not None and self.writes >= self.crash_at_write:
            raise Crash(f"crash at write {self.writes}")

    def put(self, name, data):
        self._write()
        self.inner.put(name, data)

    def put_if_absent(self, name, data):
        self._write()
        return self.inner.put_if_absent(name, data)

    def get(self, name, offset=0, length=-1):
        return self.inner.get(name, offset, length)

    def stat(self, name):
        return self.inner.stat(name)

    def list(self, prefix=""):
        lag = self.world.listing_lag
        for m in self.inner.list(prefix):
            if self.world.t - m.timestamp >= lag:
                yield m

    def delete(self, name):
        self._write()
        self.inner.delete(name)


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

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        _seed_randomness(random.Random(self.seed ^ 0x5EED))
        self.storage = MemoryStorage(clock=lambda: self.t)
        self.pool = self._file_pool()
        self._current_skew = 0.0
        self._reader = None
        clock.set_clock(lambda: self.t + self._current_skew)
        clock.set_monotonic(lambda: self.t)  # durations are true durations
        Repository.create(self.storage, PASSWORD, PARAMS, KdfParams.weak_for_tests()).close()

    def _file_pool(self) -> list[bytes]:
        base = [self.rng.randbytes(self.rng.randint(200, 6000)) for _ in range(PROFILES[self.profile]["pool"])]
        pool = list(base)
        for _ in range(6):  # files sharing chunks with others
            a, b = self.rng.sample(base, 2)
            pool.append(a[: len(a) // 2] + b)
        return pool

    def open(self, actor_storage, **kw) -> Repository:
        return Repository.open(actor_storage, PASSWORD, heartbeat_thread=False, **kw)

    # ---- actors ----------------------------------------------------------------------------
    def writer(self, actor: Actor, crash_at: int | None):
        st = ActorStorage(self, crash_at)
        repo = actor.repo = self.open(st)
        if self.mutation == "view_staleness":
            repo.contents.epochs.safety = replace(repo.contents.epochs.safety, index_refresh=1e9)
            repo.contents.epochs.write_index = _stale_write_index(repo.contents.epochs)
        marker = repo.contents.marker
        long_backup = self.rng.random() < 0.3  # a long backup: many files, rare flushes
        count = self.rng.randint(8, 30) if long_backup else self.rng.randint(1, 5)
        files = [self.rng.choice(self.pool) if self.rng.random() < 0.6 else self.rng.randbytes(self.rng.randint(100, 5000))
                 for _ in range(count)]  # shared files deduplicate; unique ones become garbage when forgotten
        flush_p = 0.05 if long_backup else 0.3
        entries, expected = [], {}
        yield "opened"
        for i, data in enumerate(files):
            _heartbeat(repo, marker)
            oid = repo.objects.write_bytes(data)
            entries.append(Entry(name=f"f{i}", type=TYPE_FILE, size=len(data), oid=oid, mode=0o644))
            expected[f"f{i}"] = hashlib.sha256(data).hexdigest()
            yield f"wrote f{i}"
            if self.rng.random() < flush_p:
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

    def maintenance(self, actor: Actor, crash_at: int | None):
        st = ActorStorage(self, crash_at)
        repo = self.open(st)
        rules = Rules()
        if self.mutation in ("content_age", "two_cycle_drop", "pack_age", "live_session", "pause_revalidation"):
            setattr(rules, self.mutation, False)
        gc_clock = None
        if self.mutation == "storage_clock":
            gc_clock = _ClientClock(st, repo.session, SAFETY.max_pause, lambda: self.t + actor.skew)
        full = self.rng.random() < 0.5  # half of the runs are `maintenance run --quick`
        return (yield from maintenance_steps(repo, MaintenanceOptions(full=full, rules=rules), clock=gc_clock))

    def forgetter(self, actor: Actor):
        st = ActorStorage(self, None)
        repo = self.open(st)
        live = [i for i in self.published if i not in self.forgotten]
        keep = PROFILES[self.profile]["keep"]
        if len(live) > keep:
            victims = self.rng.sample(live, self.rng.randint(1, len(live) - keep))
            repo.manifests.delete(victims)
            self.forgotten.update(victims)
            yield f"forgot {len(victims)}"

    # ---- invariant ---------------------------------------------------------------------------
    def check(self) -> None:
        """Invariant 1, through a reader whose index and manifests are read afresh."""
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
        prof = PROFILES[self.profile]
        span = prof["span"] * H
        kinds = ["writer"] * prof["writers"] + ["maintenance"] * prof["maintainers"] + ["forget"] * prof["forgets"]
        starts = sorted((self.rng.uniform(0, span), k) for k in kinds)
        t0 = self.t
        actors: list[Actor] = []
        spawned = 0
        for step in range(steps):
            while spawned < len(starts) and t0 + starts[spawned][0] <= self.t:
                kind = starts[spawned][1]
                spawned += 1
                a = Actor(f"{kind}{spawned}", kind, None, skew=self.rng.uniform(-1, 1) * H,
                          wake_at=self.t, last_step=self.t)
                crash = self.rng.randint(1, 40) if self.rng.random() < 0.2 else None
                a.gen = (self.writer(a, crash) if kind == "writer" else
                         self.maintenance(a, crash) if kind == "maintenance" else self.forgetter(a))
                actors.append(a)
            ready = [a for a in actors if not a.done and a.wake_at <= self.t]
            if not ready:
                upcoming = [a.wake_at for a in actors if not a.done]
                if spawned < len(starts):
                    upcoming.append(t0 + starts[spawned][0])
                if not upcoming:
                    break
                self._advance(min(upcoming) - self.t, actors)
                continue
            a = self.rng.choice(ready)
            self._step(a, step)
            self._advance(self.rng.expovariate(1 / (0.02 * H)), actors)
            if self.rng.random() < 0.08:  # a pause: a laptop sleeps, a VM stops, SIGSTOP
                a.paused_for = self.rng.choice([0.3, 1, 1.5, 3, 6, 12, 30]) * H
                a.wake_at = self.t + a.paused_for
            elif a.kind == "writer" and self.rng.random() < 0.04:  # a stall: alive, reading a huge file
                a.wake_at = self.t + self.rng.choice([3, 10, 30]) * H
                a.stalled = True
            self.check()

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


def _seed_randomness(rng: random.Random) -> None:
    fake = _SeededSecrets(rng)
    for name in _SECRETS_USERS:
        setattr(sys.modules[name], "secrets", fake)


def _restore_randomness() -> None:
    import secrets
    for name in _SECRETS_USERS:
        setattr(sys.modules[name], "secrets", secrets)


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
    args = ap.parse_args(argv)
    for seed in range(args.seed, args.seed + args.schedules):
        world = World(seed, args.mutation, args.listing_lag, args.profile)
        try:
            world.run(steps=args.steps)
        except Violation as exc:
            print("\n".join(world.log))
            print(f"VIOLATION with seed {seed}: {exc}")
            return 1
        finally:
            clock.set_clock(None)
            clock.set_monotonic(None)
            _restore_randomness()
    print(f"{args.schedules} schedules, no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
