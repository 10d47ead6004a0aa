"""Maintenance at fleet sizes: `kdist gc run` and `kdist maintenance run` on a repository of N contents.

    python -m benchmarks.gc_scale [--contents 1000000 5000000 20000000] [--json] [--repo-dir DIR] [--keep]
                                  [--contents-per-pack K] [--snapshots S] [--day-share F] [--full-kdf]

For each N, builds a filesystem repository with N contents, half of them reachable from snapshots
and half garbage, quickly (numpy, no Python loop per content except to write the directories):

- The index is written directly by ``benchmarks.fleet_scale.write_synthetic_index``, as a
  maintained repository holds it: a range set ``xr9``, ``xs`` sets of epochs 10-12, raw ``xn``
  blobs in epochs 13-14, epoch markers 1-14. Its contents lie in N/K packs (K = 1024 by
  default: 32 MiB packs of ~32 KiB contents, as ``kdist`` fills them), numbered; a content is
  reachable when its pack's number is even, so reachable contents and garbage lie in packs of
  their own (a forgotten snapshot's packs hold mostly its own contents).
- The packs exist as sparse placeholder files (never read: nothing in these runs reads a data
  pack) at the storage's path layout, their length what a real pack of their entries measures
  (records, sealed local index, postamble), their mtime two days back: content GC marks only
  contents whose pack is at least ``min_content_age`` (24 h) old, blob GC and pack rewrite list
  them, and pack rewrite finds none of them mostly dead or small (it would read them).
- The reachable half is reachable through real snapshot trees, written through the real
  repository (``repo.objects.write_bytes(encode_directory(entries), metadata=True)``, real
  metadata packs and index blob): a file entry's oid is its content id in hex (the object id
  of a single-chunk file), 100 files per directory, 100 such directories per middle directory,
  so the root holds N/20000 of those. S snapshots (3 by default) are nightly backups of a tree
  that grew by 1% a night: they share every directory but the last middle one and the root,
  so the walk, which reads each directory once, reads each leaf directory once, not S times.

Then, each a child process sampled every 10 ms (``fleet_scale.run_kdist``; the maintenance host's
local cache in a directory of its own, kept across the runs, as on a real host):

1. ``kdist gc run --json``: marks the garbage half deleted (one raw index blob of N/2 entries);
2. ``kdist maintenance run --json`` right after it: nothing left to mark, the same walk and
   listings again;
3. one more day: the backups of a day (raw ``xn`` blobs in the current epoch holding ``--day-share``
   of N new contents, written as ``fleet_scale`` writes raw blobs, in new packs, and a snapshot
   that reaches them), then ``kdist maintenance run --json`` again, which compacts the epochs
   the day settled. ``compaction_rewritten_bytes``: the bytes of the index blobs (``xn``, ``xs``,
   ``xr``; not the markers ``xe`` or the clock probes ``xt``) that this run wrote, from listings
   before and after it, split by kind; ``compaction_ratio``: that over the bytes of the day's
   raw index blobs.

Time. The repository has the full safety margins (the default preset, what a fleet runs) and the
storage's clock is moved by moving mtimes (filesystem storage timestamps are mtimes): packs are
written two days back; "one more day" moves every blob already in the repository one day back,
places the day's blobs in it (packs at its start, raw index blobs over it, the day's tree three
hours back) and writes the two epoch markers that the day's hourly maintenance runs would have
written (two hours and 50 minutes back, so the day's epoch has settled: marker E+2 exists and
has been listed for ``listing_settle``, and is too young for another advance). So what each
measured run does is the same at every N, and is what a production run does. Scaled-down margins
(``SafetyParameters.scaled``, as tests use) cannot do that here: at the tests' 1/3600,
``max_pause`` becomes one second and the other margins seconds; at any scale short enough not
to wait for, margins are shorter than the runs themselves at these sizes (minutes), so a run
would abort (``PlanExpired``) or see margins pass while it runs, doing more or less at each N.
The maintenance history (start and end times inside encrypted manifests) is not moved: the
day's run sees runs 1 and 2 as recent, not a day old. That only withholds what the history
enables: it would not drop deleted entries anyway (no two content-GC cycles ``drop_margin``
apart) and there are no pack candidates to confirm (every pack is referenced until a merge
drops its entries).

Each run: wall seconds; peak RSS (VmHWM, the kernel's high-water mark), peak RssAnon (the heap:
what bounded memory is about) and peak RssFile (mapped files: the local cache's index, page
cache the kernel can drop), sampled; the storage requests the command reports in its ``--json``
(``requests``: calls and bytes by kind) and what each step did (``steps``). ``--json`` prints
one JSON object per N, one a line; without it a table. Checks recorded next to the numbers: the
gc run marked exactly the garbage (``gc_marked`` = ``garbage_contents``) and its walk reached
every reachable content and directory (``gc_live`` = ``expected_live``).

The repository uses test-strength scrypt unless ``--full-kdf`` (its 128 MiB would set the peak of
small runs). Numbers, not pass/fail. Maintenance on Ray does not exist yet: no ``--ray-actors``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

import numpy as np

from repo_format import constants as C
from repo_format.content import make_epoch_manager
from repo_format.crypto import WEAK_KDF_ENV
from repo_format.index import MergedIndex
from repo_format.repository import Repository
from repo_format.storage.filesystem import FilesystemStorage

from benchmarks.fleet_scale import (
    ENTRY_DTYPE, MIB, PASSWORD, Sampled, _split, checked, create_repository, index_blobs, index_plaintext, log,
    run_kdist, run_sizes, table, write_raw_blob, write_synthetic_index,
)
from kdist.snapshot import TYPE_DIR, TYPE_FILE, Entry, Snapshot, Source, encode_directory

FILES_PER_DIR = 100  # files in a leaf directory
DIRS_PER_MIDDLE = 100  # leaf directories in a middle one: the root holds N/20000 (half of N is reachable)
CONTENTS_PER_PACK = 1024
DAY = 86400.0
HOUR = 3600.0
DAY_BLOBS = 24  # the day's raw index blobs: an hourly backup
SOURCE = Source("fleet-host", "backup", "/data")
# the size of a pack beyond its records: its sealed local index (header, the table of its own
# name, an entry per record) and the postamble (repo_format/pack.py)
PACK_OVERHEAD = (C.INDEX_HEADER.size + C.INDEX_PACK_NAME_LENGTH.size + C.AEAD_NONCE_SIZE + C.AEAD_TAG_SIZE
                 + C.PACK_POSTAMBLE.size)
INDEX_KINDS = (C.INDEX_PREFIX, C.COMPACTED_PREFIX, C.RANGE_PREFIX)  # index blobs, not markers or probes


# ---- what the synthetic index holds ----------------------------------------------------------
class Contents:
    """Shown every generated index blob (``index_plaintext``'s ``on_blob``): keeps the ids and
    sizes of the contents in reachable packs (even numbers, or all), and every pack's name,
    entries and bytes of records, for the placeholders."""

    def __init__(self, total_packs: int, all_reachable: bool = False):
        self.all_reachable = all_reachable
        self.pack_names = np.zeros(total_packs, dtype="S64")
        self.pack_entries = np.zeros(total_packs, dtype=np.int64)
        self.pack_bytes = np.zeros(total_packs, dtype=np.int64)
        self._ids: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self.entries = 0

    def __call__(self, e: np.ndarray, numbers: np.ndarray, pack_table: bytes) -> None:
        pack = numbers.astype(np.int64)[e["pack"]]
        n = len(self.pack_entries)
        self.pack_entries += np.bincount(pack, minlength=n)
        self.pack_bytes += np.bincount(pack, weights=e["packed"], minlength=n).astype(np.int64)
        rows = np.frombuffer(pack_table, dtype=np.uint8).reshape(len(numbers), -1)
        names = np.ascontiguousarray(rows[:, C.INDEX_PACK_NAME_LENGTH.size:])
        self.pack_names[numbers.astype(np.int64)] = names.view(f"S{names.shape[1]}").ravel()
        keep = np.ones(len(e), dtype=bool) if self.all_reachable else pack % 2 == 0
        self._ids.append(e.view(np.uint8).reshape(len(e), ENTRY_DTYPE.itemsize)[keep, :C.CONTENT_ID_SIZE].copy())
        self._sizes.append(e["original"][keep].astype(np.int64))
        self.entries += len(e)

    def reachable(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The reachable ids ((n, 32) uint8) and sizes, in a seeded random order (a directory
        holds files whose ids are anywhere in the id space)."""
        ids = np.concatenate(self._ids) if self._ids else np.zeros((0, C.CONTENT_ID_SIZE), np.uint8)
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int64)
        order = np.random.default_rng(seed).permutation(len(ids))
        return ids[order], sizes[order]

    def write_placeholders(self, storage: FilesystemStorage, mtime: float) -> tuple[int, int]:
        """Every pack the index names, as a sparse file at its place in the storage's layout, as
        long as a real pack of its records; returns (packs, bytes they claim)."""
        packs = total = 0
        for p in np.flatnonzero(self.pack_entries):
            name = self.pack_names[p].decode()
            length = int(self.pack_bytes[p] + self.pack_entries[p] * C.INDEX_ENTRY.size) + PACK_OVERHEAD + len(name)
            path = storage._path(name)  # the layout's own path (validates the name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(length)
            os.utime(path, (mtime, mtime))
            packs += 1
            total += length
        return packs, total


# ---- snapshot trees through the real repository ----------------------------------------------
def _dir_entry(name: str, oid: str, summary: dict, mtime_ns: int) -> Entry:
    return Entry(name=name, type=TYPE_DIR, mode=0o755, mtime_ns=mtime_ns, uid=1000, gid=1000, user="backup",
                 group="backup", oid=oid, ctime_ns=mtime_ns, nlink=2, summary=summary)


def _summary(children: list[tuple[str, dict]]) -> dict:
    return {"files": sum(s["files"] for _o, s in children),
            "dirs": sum(1 + s["dirs"] for _o, s in children),
            "bytes": sum(s["bytes"] for _o, s in children)}


class TreeWriter:
    """Writes directory objects through a real repository; counts the distinct ones (the walk
    reaches each directory object, and so each directory content, once)."""

    def __init__(self, repo: Repository, mtime_ns: int):
        self.repo = repo
        self.mtime_ns = mtime_ns
        self.oids: set[str] = set()
        self.inode = 1000

    def directory(self, entries: list[Entry]) -> str:
        oid = self.repo.objects.write_bytes(encode_directory(entries), metadata=True)
        self.oids.add(oid)
        return oid

    def leaves(self, ids: np.ndarray, sizes: np.ndarray) -> list[tuple[str, dict]]:
        """Leaf directories of FILES_PER_DIR single-chunk files each: (oid, summary)."""
        out = []
        for start in range(0, len(ids), FILES_PER_DIR):
            files = []
            end = start + FILES_PER_DIR
            for j, (cid, size) in enumerate(zip(ids[start:end], sizes[start:end])):
                self.inode += 1
                files.append(Entry(name=f"file{j:03d}.dat", type=TYPE_FILE, mode=0o644, size=int(size),
                                   mtime_ns=self.mtime_ns - self.inode, uid=1000, gid=1000, user="backup",
                                   group="backup", oid=cid.tobytes().hex(), inode=self.inode,
                                   ctime_ns=self.mtime_ns - self.inode))
            summary = {"files": len(files), "dirs": 0, "bytes": sum(f.size for f in files)}
            out.append((self.directory(files), summary))
        return out

    def parent(self, children: list[tuple[str, dict]], prefix: str) -> tuple[str, dict]:
        entries = [_dir_entry(f"{prefix}{i:06d}", oid, s, self.mtime_ns) for i, (oid, s) in enumerate(children)]
        return self.directory(entries), _summary(children)


def publish(repo: Repository, root: tuple[str, dict], end: float) -> None:
    oid, summary = root
    snap = Snapshot(source=SOURCE, root=oid, start=end - 600, end=end, tags=["nightly"],
                    totals={"files": summary["files"], "dirs": summary["dirs"], "bytes": summary["bytes"]})
    repo.manifests.put(snap.labels(), snap.payload())


def write_snapshots(repo: Repository, tree: TreeWriter, leaves: list[tuple[str, dict]], middles: int,
                    snapshots: int, now: float) -> list[tuple[str, dict]]:
    """``snapshots`` nightly snapshots of a tree that grew by 1% of its leaf directories a night,
    the last one holding them all; returns the last one's middle directories."""
    bounds = [i * len(leaves) // middles for i in range(middles + 1)]
    step = max(1, len(leaves) // 100)
    if len(leaves) - (snapshots - 1) * step < 1:
        raise ValueError(f"{len(leaves)} leaf directories are too few for {snapshots} snapshots")
    memo: dict[tuple[int, int], tuple[str, dict]] = {}  # (middle, leaves in it): the same object every night
    mids: list[tuple[str, dict]] = []
    for s in range(snapshots):
        covered = len(leaves) - (snapshots - 1 - s) * step
        mids = []
        for m in range(middles):
            lo, hi = bounds[m], min(bounds[m + 1], covered)
            if hi > lo:
                if (m, hi) not in memo:
                    memo[(m, hi)] = tree.parent(leaves[lo:hi], "dir")
                mids.append(memo[(m, hi)])
        publish(repo, tree.parent(mids, "part"), now - (snapshots - s) * DAY)
    return mids


def open_writer(storage: FilesystemStorage) -> Repository:
    """The real repository, for writing directories only: with an empty index to deduplicate
    against (the synthetic one holds no directory), so the build does not load N entries."""
    return Repository.open(storage, PASSWORD, heartbeat_thread=False, committed=MergedIndex())


# ---- time ------------------------------------------------------------------------------------
def blob_paths(storage: FilesystemStorage) -> dict[str, str]:
    return {m.name: storage._path(m.name) for m in storage.list()}


def set_mtime(path: str, t: float) -> None:
    os.utime(path, (t, t))


def index_sizes(storage: FilesystemStorage) -> dict[str, int]:
    return {k: v for k, v in index_blobs(storage).items() if k.startswith(INDEX_KINDS)}


# ---- one N -----------------------------------------------------------------------------------
def build(storage: FilesystemStorage, fmt, n: int, contents_per_pack: int, snapshots: int, seed: int,
          log) -> tuple[dict, list[tuple[str, dict]]]:
    """The synthetic index, its packs (two days old) and the snapshot trees reaching half of it.
    Returns what was built and the newest snapshot's middle directories."""
    out: dict = {}
    t0 = time.perf_counter()
    total_packs = -(-n // contents_per_pack)  # as write_synthetic_index counts them
    if total_packs < 2:
        raise ValueError(f"{n} contents at {contents_per_pack} a pack make one pack: no garbage packs")
    contents = Contents(total_packs)
    written = write_synthetic_index(storage, fmt, n, seed=seed, contents_per_pack=contents_per_pack,
                                    on_blob=contents)
    assert written["entries"] == contents.entries == n
    out["index_build_seconds"] = round(time.perf_counter() - t0, 1)
    out["synthetic_index_bytes"] = written["bytes"]
    out["synthetic_index_blobs"] = written["blobs"]

    t1 = time.perf_counter()
    out["packs"], out["pack_bytes"] = contents.write_placeholders(storage, time.time() - 2 * DAY)
    out["packs_build_seconds"] = round(time.perf_counter() - t1, 1)

    t2 = time.perf_counter()
    ids, sizes = contents.reachable(seed)
    del contents
    out["reachable_contents"] = len(ids)
    out["garbage_contents"] = n - len(ids)
    repo = open_writer(storage)
    tree = TreeWriter(repo, time.time_ns() - 3 * 10**9 * int(DAY))
    leaves = tree.leaves(ids, sizes)
    middles = max(1, -(-len(leaves) // DIRS_PER_MIDDLE))
    mids = write_snapshots(repo, tree, leaves, middles, snapshots, time.time())
    repo.close()
    out["trees_build_seconds"] = round(time.perf_counter() - t2, 1)
    out["snapshots"] = snapshots
    out["leaf_directories"] = len(leaves)
    out["middle_directories"] = middles
    out["directory_objects"] = len(tree.oids)
    out["expected_live"] = len(ids) + len(tree.oids)
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"  built in {out['build_seconds']} s (index {out['index_build_seconds']} s, {written['blobs']} blobs, "
        f"{written['bytes'] / MIB:.0f} MiB; {out['packs']} packs {out['packs_build_seconds']} s; "
        f"{out['directory_objects']} directories in {snapshots} snapshots {out['trees_build_seconds']} s): "
        f"{len(ids):,} reachable, {out['garbage_contents']:,} garbage")
    return out, mids


def one_more_day(storage: FilesystemStorage, fmt, n: int, contents_per_pack: int, day_share: float,
                 mids: list[tuple[str, dict]], seed: int, log) -> dict:
    """A day passes: the day's backups, then the markers of the day's maintenance (see the module
    docstring). Returns what was written."""
    t0 = time.perf_counter()
    before = set(blob_paths(storage))
    epochs = make_epoch_manager(storage, fmt, secrets.token_hex(C.SESSION_ID_BYTES))
    epoch = epochs.refresh().current
    entries = max(DAY_BLOBS, int(n * day_share))
    total_packs = max(1, -(-entries // contents_per_pack))
    contents = Contents(total_packs, all_reachable=True)
    rng = np.random.default_rng(seed + 1)
    salt, now_us = int(rng.integers(0, 2**63)), int(time.time() * 1e6)
    raw: list[tuple[str, int]] = []
    for count in _split(entries, DAY_BLOBS):
        plaintext = index_plaintext(rng, 0, 2**64, count, epoch, now_us, total_packs, salt, contents)
        raw.append(write_raw_blob(storage, fmt, plaintext, epoch))
    now = time.time()
    packs, _ = contents.write_placeholders(storage, now - 23 * HOUR)
    ids, sizes = contents.reachable(seed + 1)
    repo = open_writer(storage)
    tree = TreeWriter(repo, time.time_ns())
    day = tree.parent(tree.leaves(ids, sizes), "dir")
    publish(repo, tree.parent(mids + [day], "part"), now - 3 * HOUR)
    repo.close()

    # what was there a day older; the day's packs at its start (as written), its raw index blobs
    # over it (hourly backups), its tree three hours back
    written_at = {name: now - 22 * HOUR + i * 19 * HOUR / DAY_BLOBS for i, (name, _size) in enumerate(raw)}
    day_packs = {contents.pack_names[p].decode() for p in np.flatnonzero(contents.pack_entries)}
    for name, path in blob_paths(storage).items():
        if name in before:
            set_mtime(path, os.stat(path).st_mtime - DAY)
        elif name not in day_packs:
            set_mtime(path, written_at.get(name, now - 3 * HOUR))
    for ahead, back in ((1, 2 * HOUR), (2, 50 * 60)):  # the day's maintenance advanced twice
        epochs.write_marker(epoch + ahead)
        for m in storage.list(f"{C.EPOCH_MARKER_PREFIX}{epoch + ahead}"):  # xe<N>, or signed: xe<N>_<16 hex>
            if m.name[len(f"{C.EPOCH_MARKER_PREFIX}{epoch + ahead}"):][:1] in ("", "_"):
                set_mtime(storage._path(m.name), now - back)
    out = {"day_entries": entries, "day_blobs": len(raw), "day_new_bytes": sum(size for _n, size in raw),
           "day_packs": packs, "day_directory_objects": len(tree.oids), "day_epoch": epoch,
           "day_build_seconds": round(time.perf_counter() - t0, 1)}
    log(f"  one more day: {entries:,} new contents in {len(raw)} raw blobs ({out['day_new_bytes'] / MIB:.1f} MiB) "
        f"in epoch {epoch}, markers {epoch + 1} and {epoch + 2}, in {out['day_build_seconds']} s")
    return out


def _phase(out: dict, name: str, r: Sampled) -> None:
    report = r.output or {}
    out[f"{name}_seconds"] = round(r.wall_s, 2)
    out[f"{name}_peak_rss_mib"] = round(r.vmhwm_kib / 1024, 1)
    out[f"{name}_peak_rss_anon_mib"] = round(r.rss_anon_kib / 1024, 1)
    out[f"{name}_peak_rss_file_mib"] = round(r.rss_file_kib / 1024, 1)
    out[f"{name}_samples"] = r.samples
    requests = report.get("requests", {})
    out[f"{name}_requests"] = requests
    for kind, c in sorted(requests.items()):
        out[f"{name}_{kind.lower()}_calls"] = c["calls"]
        out[f"{name}_{kind.lower()}_bytes"] = c["bytes"]
    out[f"{name}_steps"] = report.get("steps", {})
    gc = report.get("steps", {}).get("content_gc", {})
    out[f"{name}_marked"], out[f"{name}_live"] = gc.get("marked"), gc.get("live")


def run_one(n: int, base: str, contents_per_pack: int, snapshots: int, day_share: float, weak_kdf: bool,
            seed: int = 1, log=log, ray_actors: tuple[int, ...] = (), days: int = 1) -> dict:
    repo_path, logs = os.path.join(base, "repo"), os.path.join(base, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_REPO=repo_path, KDIST_CACHE_DIR=os.path.join(base, "cache"))
    env.pop("KDIST_NO_CACHE", None)
    if weak_kdf:
        env[WEAK_KDF_ENV] = "1"
    out: dict = {"contents": n, "contents_per_pack": contents_per_pack, "weak_kdf": weak_kdf}

    _storage, fmt = create_repository(repo_path, weak_kdf)
    storage = FilesystemStorage(repo_path, fsync=False)  # the build's own puts: no fsync per blob
    built, mids = build(storage, fmt, n, contents_per_pack, snapshots, seed, log)
    out.update(built)
    out["index_bytes"] = sum(index_sizes(storage).values())
    os.sync()  # the build's dirty pages written back before anything is measured

    def kdist(phase: str, args: list[str]) -> Sampled:
        r = checked(f"kdist {' '.join(args)}", run_kdist(args, env, os.path.join(logs, phase)), n)
        _phase(out, phase, r)
        log(f"  {phase}: {r.wall_s:.1f} s, peak RSS {r.vmhwm_kib / 1024:.0f} MiB (RssAnon "
            f"{r.rss_anon_kib / 1024:.0f}), marked {out[f'{phase}_marked']}, live {out[f'{phase}_live']}")
        return r

    kdist("gc", ["gc", "run", "--json"])
    kdist("maintenance", ["maintenance", "run", "--json"])
    if ray_actors:  # the walk alone, then shared among k actors (dry runs: nothing changes)
        kdist("walk", ["gc", "run", "--dry-run", "--json"])
        out["walk_seconds"] = out["walk_steps"]["content_gc"]["walk_seconds"]
        for k in ray_actors:
            kdist(f"ray{k}", ["gc", "run", "--dry-run", "--json", "--ray", "--actors", str(k)])
            out[f"ray{k}_walk_seconds"] = out[f"ray{k}_steps"]["content_gc"]["walk_seconds"]
            log(f"  walk with {k} Ray actors: {out[f'ray{k}_walk_seconds']:.1f} s (one process: "
                f"{out['walk_seconds']:.1f} s)")

    out.update(one_more_day(storage, fmt, n, contents_per_pack, day_share, mids, seed, log))
    os.sync()
    before = index_sizes(storage)
    kdist("compaction", ["maintenance", "run", "--json"])
    after = index_sizes(storage)
    new = {k: v for k, v in after.items() if k not in before}
    out["compaction_rewritten_bytes"] = sum(new.values())
    for kind in INDEX_KINDS:
        out[f"compaction_{kind}_bytes"] = sum(v for k, v in new.items() if k.startswith(kind))
        out[f"compaction_{kind}_blobs"] = sum(1 for k in new if k.startswith(kind))
    out["compaction_deleted_blobs"] = sum(1 for k in before if k not in after)
    out["compaction_ratio"] = round(out["compaction_rewritten_bytes"] / out["day_new_bytes"], 1)
    # further days: what a run rewrites once the synthetic backlog (raw blobs of epochs the build
    # left unsettled, compacted by the first day's run) is gone
    per_day = []
    for day in range(2, days + 1):
        new_day = one_more_day(storage, fmt, n, contents_per_pack, day_share, mids, seed + day, log)
        os.sync()
        before = index_sizes(storage)
        kdist(f"day{day}", ["maintenance", "run", "--json"])
        after = index_sizes(storage)
        per_day.append((sum(v for k, v in after.items() if k not in before), new_day["day_new_bytes"]))
    if per_day:
        out["steady_rewritten_bytes"] = [w for w, _a in per_day]
        out["steady_day_new_bytes"] = [a for _w, a in per_day]
        out["steady_ratio"] = round(sum(w for w, _a in per_day) / sum(a for _w, a in per_day), 1)
        log(f"  days 2-{days}: rewrote {[round(w / MIB, 1) for w, _a in per_day]} MiB for "
            f"{[round(a / MIB, 2) for _w, a in per_day]} MiB of new entries: {out['steady_ratio']}x")
    out["cache_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(env["KDIST_CACHE_DIR"])
                             for f in fs)
    log(f"  compaction wrote {out['compaction_rewritten_bytes'] / MIB:.1f} MiB of index blobs "
        f"(xs {out['compaction_xs_bytes'] / MIB:.1f}, xr {out['compaction_xr_bytes'] / MIB:.1f}, "
        f"xn {out['compaction_xn_bytes'] / MIB:.1f}) for {out['day_new_bytes'] / MIB:.2f} MiB of the day's "
        f"entries: {out['compaction_ratio']}x")
    return out


# ---- the table -------------------------------------------------------------------------------
COLUMNS = [
    ("N", lambda r: f"{r['contents']:,}"),
    ("build s", lambda r: f"{r['build_seconds']:.0f}"),
    ("index MiB", lambda r: f"{r['index_bytes'] / MIB:.0f}"),
    ("marked", lambda r: f"{r['gc_marked']:,}"),
    ("live", lambda r: f"{r['gc_live']:,}"),
    ("gc s", lambda r: f"{r['gc_seconds']:.1f}"),
    ("gc RSS", lambda r: f"{r['gc_peak_rss_mib']:.0f}"),
    ("gc RssAnon", lambda r: f"{r['gc_peak_rss_anon_mib']:.0f}"),
    ("gc GETs", lambda r: f"{r.get('gc_get_calls', 0)}"),
    ("gc GET MiB", lambda r: f"{r.get('gc_get_bytes', 0) / MIB:.0f}"),
    ("gc PUT MiB", lambda r: f"{r.get('gc_put_bytes', 0) / MIB:.0f}"),
    ("maint s", lambda r: f"{r['maintenance_seconds']:.1f}"),
    ("maint RSS", lambda r: f"{r['maintenance_peak_rss_mib']:.0f}"),
    ("maint RssAnon", lambda r: f"{r['maintenance_peak_rss_anon_mib']:.0f}"),
    ("maint GETs", lambda r: f"{r.get('maintenance_get_calls', 0)}"),
    ("day s", lambda r: f"{r['compaction_seconds']:.1f}"),
    ("day RSS", lambda r: f"{r['compaction_peak_rss_mib']:.0f}"),
    ("day RssAnon", lambda r: f"{r['compaction_peak_rss_anon_mib']:.0f}"),
    ("rewritten MiB", lambda r: f"{r['compaction_rewritten_bytes'] / MIB:.0f}"),
    ("day MiB", lambda r: f"{r['day_new_bytes'] / MIB:.2f}"),
    ("ratio", lambda r: f"{r['compaction_ratio']:.0f}"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contents", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                    help="numbers of contents in the index, one repository each")
    ap.add_argument("--contents-per-pack", type=int, default=CONTENTS_PER_PACK,
                    help=f"contents per pack (default {CONTENTS_PER_PACK}: ~32 MiB packs of the index's "
                         "~32 KiB contents)")
    ap.add_argument("--snapshots", type=int, default=3, help="nightly snapshots sharing their directories")
    ap.add_argument("--day-share", type=float, default=0.01, help="new contents of the extra day, a share of N")
    ap.add_argument("--full-kdf", action="store_true", help="full-strength scrypt (128 MiB per command)")
    ap.add_argument("--repo-dir", default=None, help="where repositories go (default: a new directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep each N's repository, cache and logs")
    ap.add_argument("--json", action="store_true", help="print one JSON object per N (one a line), no table")
    ap.add_argument("--days", type=int, default=1,
                    help="simulated days of backups, each followed by a maintenance run (the first includes the "
                         "build's backlog; the others show the steady state)")
    ap.add_argument("--ray-actors", type=int, nargs="*", default=[],
                    help="also time content GC's walk with --ray and this many actors (e.g. 1 2), against one process")
    args = ap.parse_args(argv)

    rows, failed = run_sizes(args.contents, args.repo_dir, args.keep, args.json, "kdist-gc-scale-",
                             lambda n, base: run_one(n, base, args.contents_per_pack, args.snapshots, args.day_share,
                                                     not args.full_kdf, ray_actors=tuple(args.ray_actors),
                                                     days=args.days))
    if not args.json and rows:
        print(table(rows, COLUMNS))
        print("RSS: peak VmHWM in MiB; RssAnon: sampled peak (heap); GET/PUT: what the command reported; day: the "
              "maintenance run after one more day; rewritten: index blobs it wrote; ratio: over the day's raw blobs.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
