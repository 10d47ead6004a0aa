"""A fleet's repository at scale: backup, list and restore with a cold and a warm local cache, by number of contents.

    python -m benchmarks.fleet_scale [--contents 1000000 5000000 20000000] [--json] [--workdir DIR] [--keep]
                                     [--contents-per-pack K] [--raw-entries R] [--full-kdf]

For each N, builds a filesystem repository whose index holds N contents, quickly: the index blobs
are written directly (numpy, no Python loop per entry), spread over epochs as maintenance leaves
them (most entries in a range set ``xr``, some in ``xs`` sets of three later epochs, a few dozen
raw ``xn`` blobs of different sizes, 2% of N unless ``--raw-entries``, in the two newest ones),
with the epoch markers; ids are uniform, the packs they name are fake (nothing reads them): a
handful per blob with ``--contents-per-pack 0``, else N/K packs (K = 64 by default) over which the
contents are spread, so every blob's pack table names the packs its entries lie in, as in a real
repository. A few
hosts back up small trees with the real ``kdist snapshot create`` first (it has no ``--host``:
hosts differ by source path and user), so the repository has snapshots to list.

Then, each command a child process (``kdist ... --json``, the local cache in a directory of its
own), the measured host:

1. backs up a tree of 1,000 files with an empty local cache (cold: the whole index is fetched);
2. (another host backs up a small tree: new index blobs the next run has not seen);
3. backs up the same tree after 10 files changed, with the cache of step 1 (warm, nightly);
4. lists the snapshots; 5. restores one file of its snapshot.

Each command's wall time; its peak RssAnon (anonymous memory: what the index must not grow) and
peak RssFile (pages of files it maps, the cache's index files among them: page cache, which the
kernel can drop), sampled from /proc/<pid>/status every 10 ms, and its VmHWM (peak total RSS);
its storage requests (GET calls and bytes). Next to them: the bytes of index blobs in the
repository when the cold backup starts (what it must download once) and of those written after
it (what the warm backup should download instead, whatever N).

``--json`` prints one object per N, one a line: ``contents``, ``index_bytes``, ``new_index_bytes``
and, for each of ``cold_backup``, ``warm_backup``, ``list``, ``restore``: ``<phase>_wall_s``,
``<phase>_rss_mib`` (peak RssAnon), ``<phase>_rss_file_mib``, ``<phase>_vmhwm_mib``,
``<phase>_get_calls``, ``<phase>_get_bytes`` (and PUT, LIST), with a few checks (files read and
reused by the warm backup, the restored file compared with its source).

The repository uses test-strength scrypt unless ``--full-kdf``: every command's scrypt
(128 MiB, freed before the index is read) would otherwise set the peak RssAnon of small runs
and hide how memory grows with N. Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from repo_format import constants as C
from repo_format.content import make_epoch_manager
from repo_format.crypto import WEAK_KDF_ENV, KdfParams
from repo_format.index import index_blob_name, seal_index
from repo_format.repository import Repository
from repo_format.storage.filesystem import FilesystemStorage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "fleet-bench"
MIB = 2**20

# How maintenance leaves the index (repo_format/epoch.py): everything up to RANGE_EPOCH merged
# into one range set, each later settled epoch compacted into an xs set, the two newest epochs
# (not settled yet) still raw blobs; the current epoch is the newest marker.
RANGE_EPOCH = 9
XS_SHARES = {10: 0.05, 11: 0.04, 12: 0.03}  # of N, per epoch
RAW_EPOCHS = (13, 14)
RAW_SHARE = 0.02
RAW_BLOBS = 36
CURRENT_EPOCH = RAW_EPOCHS[-1]
PACKS_PER_BLOB = 8
WEEK_US = 7 * 86400 * 10**6

ENTRY_DTYPE = np.dtype([
    ("key", ">u8"), ("rest", "V24"),  # the 32-byte id: first 8 bytes as a number, then 24 more
    ("pack", ">u4"), ("offset", ">u4"), ("packed", ">u4"), ("original", ">u4"),
    ("compression", "u1"), ("flags", "u1"), ("reserved", ">u2"), ("timestamp", ">i8"),
])
assert ENTRY_DTYPE.itemsize == C.INDEX_ENTRY.size


# ---- the synthetic index ---------------------------------------------------------------------
def _unique_keys(rng: np.random.Generator, lo: int, hi: int, count: int) -> np.ndarray:
    """``count`` distinct uniform 64-bit keys in [lo, hi), sorted."""
    keys = np.unique(rng.integers(lo, hi, size=count, dtype=np.uint64))
    while len(keys) < count:  # a collision in 2^64 (practically never)
        keys = np.unique(np.concatenate([keys, rng.integers(lo, hi, size=count - len(keys), dtype=np.uint64)]))
    return keys


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_columns(values: np.ndarray) -> np.ndarray:
    """Each uint64 as 16 lowercase hex digits: an (n, 16) uint8 array."""
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    return _HEX[((values[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]


def pack_table(pack_numbers: np.ndarray, salt: int) -> bytes:
    """The pack table (``>H`` length + name each) of packs numbered ``pack_numbers`` out of the
    repository's packs: ``p<32 hex>-<16 hex>`` names made from the numbers (one name per number
    in the whole repository), without a Python loop per pack."""
    u = pack_numbers.astype(np.uint64)
    with np.errstate(over="ignore"):  # multiplying by odd constants mod 2^64: distinct numbers, distinct names
        parts = [u * np.uint64(m) + np.uint64(salt)
                 for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)]
    name_len = 1 + 2 * C.PACK_RANDOM_BYTES + 1 + 2 * C.SESSION_ID_BYTES
    rows = np.empty((len(u), 2 + name_len), dtype=np.uint8)
    rows[:, :2] = np.frombuffer(C.INDEX_PACK_NAME_LENGTH.pack(name_len), dtype=np.uint8)
    rows[:, 2] = ord(C.DATA_PACK_PREFIX)
    rows[:, 3:19], rows[:, 19:35] = _hex_columns(parts[0]), _hex_columns(parts[1])
    rows[:, 35] = ord("-")
    rows[:, 36:52] = _hex_columns(parts[2])
    return rows.tobytes()


def index_plaintext(rng: np.random.Generator, lo: int, hi: int, count: int, epoch: int, now_us: int,
                    total_packs: int | None = None, salt: int = 0, on_blob=None) -> bytes:
    """An encoded index (``encode_index``'s format) of ``count`` uniform ids in [lo, hi).

    Without ``total_packs`` the entries name a handful of packs of their own; with it, the
    contents are spread over the repository's ``total_packs`` packs, so the blob's pack table
    names every pack one of its entries lies in (a compacted blob covers a slice of the id
    space, and every pack holds ids from all over it: nearly every pack, when there are fewer
    packs than entries).

    ``on_blob(entries, numbers, table)``, if given, is shown what was generated: the entry
    array (``ENTRY_DTYPE``, sorted by id; the first 32 bytes of each row are the content id),
    the repository-wide number of each pack in the blob's table (``entries["pack"]`` indexes
    it) and the table's bytes."""
    e = np.zeros(count, dtype=ENTRY_DTYPE)
    e["key"] = _unique_keys(rng, lo, hi, count)
    e["rest"] = np.frombuffer(rng.bytes(24 * count), dtype="V24")
    if total_packs is None:
        npacks = max(1, min(PACKS_PER_BLOB, count))  # the format allows at most count + 1
        numbers = rng.integers(0, 2**62, size=npacks, dtype=np.uint64)
        e["pack"] = rng.integers(0, npacks, size=count, dtype=np.uint32)
    else:
        numbers, e["pack"] = np.unique(rng.integers(0, total_packs, size=count, dtype=np.uint64), return_inverse=True)
        npacks = len(numbers)
    table = pack_table(numbers, salt)
    e["offset"] = rng.integers(0, 30 * MIB, size=count, dtype=np.uint32)
    packed = rng.integers(512, 64 * 1024, size=count, dtype=np.uint32)
    e["packed"] = packed
    e["original"] = packed + rng.integers(0, packed, dtype=np.uint32)
    e["compression"] = np.where(rng.random(count) < 0.7, C.COMPRESSION_ZSTD, C.COMPRESSION_NONE)
    # written in the week this epoch stands for, the newest epoch ending a day ago
    end = now_us - 86400 * 10**6 - (CURRENT_EPOCH - epoch) * WEEK_US
    e["timestamp"] = end - rng.integers(0, WEEK_US, size=count, dtype=np.int64)
    if on_blob is not None:
        on_blob(e, numbers, table)
    head = C.INDEX_HEADER.pack(C.INDEX_MAGIC, C.INDEX_VERSION, 0, 0, count, npacks)
    return head + table + e.tobytes()


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def plan_index(n: int, rng: np.random.Generator, raw_entries: int | None = None) -> dict:
    """How many entries go where: {"xr": (epoch, count), "xs": {epoch: count}, "xn": [(epoch, count), ...]}.
    The raw blobs hold ``raw_entries`` (default RAW_SHARE of N: a bigger fleet writes more a day)."""
    n_raw = max(RAW_BLOBS, int(n * RAW_SHARE) if raw_entries is None else raw_entries)
    xs = {e: int(n * share) for e, share in XS_SHARES.items()}
    n_range = n - n_raw - sum(xs.values())
    if n_range < 1:
        raise ValueError(f"{n} contents are too few for {n_raw} in raw blobs and {sum(xs.values())} in xs sets")
    weights = rng.lognormal(0.0, 1.0, RAW_BLOBS)  # raw blobs of different sizes, at least one entry each
    raw = [1 + int(c) for c in np.floor(weights / weights.sum() * (n_raw - RAW_BLOBS)).astype(int)]
    raw[0] += n_raw - sum(raw)
    raw_epochs = [RAW_EPOCHS[0] if i < RAW_BLOBS // 2 else RAW_EPOCHS[1] for i in range(RAW_BLOBS)]
    return {"xr": (RANGE_EPOCH, n_range), "xs": xs, "xn": list(zip(raw_epochs, raw))}


def write_raw_blob(storage: FilesystemStorage, fmt, plaintext: bytes, epoch: int) -> tuple[str, int]:
    """Seal and put one raw index blob ``xn<epoch>_...`` as a backup of a session of its own
    names it; returns its name and sealed size."""
    name = index_blob_name(fmt.keys.name_hasher(), plaintext, epoch, secrets.token_hex(C.SESSION_ID_BYTES))
    sealed = seal_index(fmt.keys.index_aead(), name, plaintext)
    storage.put(name, sealed)
    return name, len(sealed)


def write_synthetic_index(storage: FilesystemStorage, fmt, n: int, seed: int = 1, raw_entries: int | None = None,
                          contents_per_pack: int | None = None, on_blob=None) -> dict:
    """Write N index entries as a maintained repository holds them; returns what was written.
    ``contents_per_pack``: the repository has N / that many packs (else a handful per blob).
    ``on_blob``: shown every blob's entries (see ``index_plaintext``)."""
    rng = np.random.default_rng(seed)
    total_packs = max(1, -(-n // contents_per_pack)) if contents_per_pack else None
    salt = int(rng.integers(0, 2**63))
    now_us = int(time.time() * 1e6)
    plan = plan_index(n, rng, raw_entries)
    written = {"entries": 0, "blobs": 0, "bytes": 0, "raw_entries": sum(c for _e, c in plan["xn"])}

    def count(entries: int, size: int) -> None:
        written["entries"] += entries
        written["blobs"] += 1
        written["bytes"] += size

    epochs = make_epoch_manager(storage, fmt, "0" * 2 * C.SESSION_ID_BYTES)  # signs sets, as maintenance does

    def write_set(kind: str, epoch: int, entries: int) -> None:
        """Members cover consecutive slices of the 64-bit key space: disjoint, in increasing order."""
        members = max(1, -(-entries // C.INDEX_BLOB_MAX_ENTRIES))
        bounds = [i * 2**64 // members for i in range(members + 1)]
        counts = _split(entries, members)
        st = epochs.put_set(kind, epoch, [
            lambda i=i, c=c: index_plaintext(rng, bounds[i], bounds[i + 1], c, epoch, now_us, total_packs, salt,
                                             on_blob) for i, c in enumerate(counts)])
        for i, c in enumerate(counts):
            count(c, st.members[i].length)

    write_set("xr", *plan["xr"])
    for epoch, entries in plan["xs"].items():
        write_set("xs", epoch, entries)
    for epoch, entries in plan["xn"]:
        plaintext = index_plaintext(rng, 0, 2**64, entries, epoch, now_us, total_packs, salt, on_blob)
        count(entries, write_raw_blob(storage, fmt, plaintext, epoch)[1])
    return written


def create_repository(path: str, weak_kdf: bool):
    if weak_kdf:
        os.environ[WEAK_KDF_ENV] = "1"  # this process's too: KdfParams.weak_for_tests insists
    storage = FilesystemStorage(path, create=True)
    repo = Repository.create(storage, PASSWORD, kdf=KdfParams.weak_for_tests() if weak_kdf else None)
    fmt = repo.format
    repo.close()
    epochs = make_epoch_manager(storage, fmt, secrets.token_hex(C.SESSION_ID_BYTES))
    for e in range(1, CURRENT_EPOCH + 1):  # markers are never deleted: every advance left one
        epochs.write_marker(e)
    return storage, fmt


def index_blobs(storage: FilesystemStorage) -> dict[str, int]:
    """Every index blob in the repository (not the epoch markers): name -> bytes."""
    return {m.name: m.length for m in storage.list("x") if not m.name.startswith(C.EPOCH_MARKER_PREFIX)}


# ---- source trees ----------------------------------------------------------------------------
def make_tree(path: str, files: int, seed: int, min_size: int = 1024, max_size: int = 64 * 1024) -> list[str]:
    """``files`` files of random bytes in directories of 50; returns their relative paths."""
    rng = np.random.default_rng(seed)
    rel = []
    for i in range(files):
        r = os.path.join(f"d{i // 50:03d}", f"f{i:05d}")
        os.makedirs(os.path.join(path, os.path.dirname(r)), exist_ok=True)
        with open(os.path.join(path, r), "wb") as f:
            f.write(rng.bytes(int(rng.integers(min_size, max_size))))
        rel.append(r)
    return rel


def change_files(path: str, rel: list[str], count: int, seed: int) -> list[str]:
    """Rewrite ``count`` of the files (new bytes, same size): a night's changes."""
    rng = np.random.default_rng(seed)
    picked = [rel[i] for i in sorted(rng.choice(len(rel), size=min(count, len(rel)), replace=False))]
    for r in picked:
        p = os.path.join(path, r)
        size = os.path.getsize(p)
        with open(p, "wb") as f:
            f.write(rng.bytes(size))
    return picked


# ---- running and sampling one command --------------------------------------------------------
@dataclass
class Sampled:
    wall_s: float = 0.0
    exit_code: int = 0
    rss_anon_kib: int = 0
    rss_file_kib: int = 0
    vmhwm_kib: int = 0
    samples: int = 0
    requests: dict = field(default_factory=dict)
    output: object = None
    stderr: str = ""


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_kdist(args: list[str], env: dict, log_prefix: str, interval: float = 0.01) -> Sampled:
    """Run ``kdist ARGS`` (benchmarks.fleet_child: the CLI in the child process itself, which
    also dumps its storage requests) and sample its memory until it exits."""
    req_path = log_prefix + ".requests.json"
    env = dict(env, FLEET_REQUESTS=req_path)
    result = Sampled()
    with open(log_prefix + ".out", "wb") as out, open(log_prefix + ".err", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fleet_child", *args], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

        def sample():
            while proc.poll() is None:
                s = _status(proc.pid)
                if s:
                    result.samples += 1
                    result.rss_anon_kib = max(result.rss_anon_kib, s.get("RssAnon", 0))
                    result.rss_file_kib = max(result.rss_file_kib, s.get("RssFile", 0))
                    result.vmhwm_kib = max(result.vmhwm_kib, s.get("VmHWM", 0))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result.exit_code = proc.wait()
        result.wall_s = time.perf_counter() - start
        sampler.join()
    with open(log_prefix + ".err", errors="replace") as f:
        result.stderr = f.read()
    with open(log_prefix + ".out", errors="replace") as f:
        text = f.read()
    try:
        result.output = json.loads(text) if text.strip() else None
    except ValueError:
        result.output = None
    if os.path.exists(req_path):
        with open(req_path) as f:
            result.requests = json.load(f)
    return result


class CommandFailed(RuntimeError):
    pass


def checked(what: str, r: Sampled, n: int) -> Sampled:
    if r.exit_code != 0:
        raise CommandFailed(f"N={n}: {what} exited {r.exit_code}: {r.stderr.strip()[-2000:]}")
    return r


# ---- one N -----------------------------------------------------------------------------------
def _phase(out: dict, name: str, r: Sampled, requests: dict | None = None) -> None:
    req = requests if requests is not None else r.requests
    out[f"{name}_wall_s"] = round(r.wall_s, 3)
    out[f"{name}_rss_mib"] = round(r.rss_anon_kib / 1024, 1)  # peak RssAnon
    out[f"{name}_rss_file_mib"] = round(r.rss_file_kib / 1024, 1)
    out[f"{name}_vmhwm_mib"] = round(r.vmhwm_kib / 1024, 1)
    out[f"{name}_samples"] = r.samples
    for kind in ("GET", "PUT", "LIST"):
        c = req.get(kind, {"calls": 0, "bytes": 0})
        out[f"{name}_{kind.lower()}_calls"] = c["calls"]
        out[f"{name}_{kind.lower()}_bytes"] = c["bytes"]


def run_one(n: int, base: str, files: int, changed: int, hosts: int, weak_kdf: bool,
            raw_entries: int | None = None, contents_per_pack: int | None = None, log=print) -> dict:
    os.makedirs(base, exist_ok=True)
    repo_path, logs = os.path.join(base, "repo"), os.path.join(base, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_REPO=repo_path)
    env.pop("KDIST_NO_CACHE", None)
    if weak_kdf:
        env[WEAK_KDF_ENV] = "1"
    out: dict = {"contents": n, "files": files, "changed_files": changed, "hosts": hosts, "weak_kdf": weak_kdf,
                 "contents_per_pack": contents_per_pack}

    def backup(tree: str, cache: str, who: str, tag: str) -> Sampled:
        r = run_kdist(["snapshot", "create", tree, "--json"], dict(env, KDIST_CACHE_DIR=cache, USER=who, LOGNAME=who),
                      os.path.join(logs, tag))
        return checked(f"kdist snapshot create {tree} ({tag})", r, n)

    t0 = time.perf_counter()
    storage, fmt = create_repository(repo_path, weak_kdf)
    # the other hosts' snapshots first: their backups then read a small index (fast), and their
    # index blobs lie in the current epoch, where they belong
    for h in range(hosts):
        tree = os.path.join(base, "hosts", f"host{h}")
        make_tree(tree, 100, seed=100 + h, max_size=16 * 1024)
        backup(tree, os.path.join(base, "caches", f"host{h}"), f"host{h}", f"seed-host{h}")
    t1 = time.perf_counter()
    written = write_synthetic_index(storage, fmt, n, raw_entries=raw_entries, contents_per_pack=contents_per_pack)
    out["build_s"] = round(time.perf_counter() - t1, 1)
    out["setup_s"] = round(time.perf_counter() - t0, 1)
    out["synthetic_entries"] = written["entries"]
    out["raw_blob_entries"] = written["raw_entries"]
    log(f"  N={n:,}: {written['entries']:,} entries in {written['blobs']} index blobs "
        f"({written['bytes'] / MIB:.0f} MiB) written in {out['build_s']} s; {hosts} hosts backed up")

    tree = os.path.join(base, "main")
    rel = make_tree(tree, files, seed=7)
    cache = os.path.join(base, "caches", "main")
    before_cold = index_blobs(storage)
    out["index_blobs"] = len(before_cold)
    out["index_bytes"] = sum(before_cold.values())
    os.sync()  # the build's dirty pages written back before anything is measured

    cold = backup(tree, cache, "main", "cold-backup")
    _phase(out, "cold_backup", cold, cold.output[0]["requests"])
    log(f"  cold backup: {cold.wall_s:.1f} s, RssAnon {cold.rss_anon_kib / 1024:.0f} MiB, "
        f"GET {out['cold_backup_get_bytes'] / MIB:.0f} MiB (index {out['index_bytes'] / MIB:.0f} MiB)")

    # another host's nightly backup: new index blobs. Its own cache starts as a copy of ours
    # (hard links: cache files are only ever replaced whole), so it is warm and quick.
    other_cache = os.path.join(base, "caches", "other")
    shutil.copytree(cache, other_cache, copy_function=os.link)
    other_tree = os.path.join(base, "hosts", "other")
    make_tree(other_tree, 200, seed=999, max_size=16 * 1024)
    before_other = index_blobs(storage)
    other = backup(other_tree, other_cache, "other", "other-host-backup")
    shutil.rmtree(other_cache, ignore_errors=True)
    before_warm = index_blobs(storage)
    # what the warm backup has not seen: the cold one fetched its own index blob when it
    # reloaded the index at its end, so this is the other host's
    out["new_index_bytes"] = sum(v for k, v in before_warm.items() if k not in before_other)
    out["new_index_blobs"] = sum(1 for k in before_warm if k not in before_other)
    out["other_host_wall_s"] = round(other.wall_s, 2)

    change_files(tree, rel, changed, seed=8)
    os.sync()
    warm = backup(tree, cache, "main", "warm-backup")
    _phase(out, "warm_backup", warm, warm.output[0]["requests"])
    totals = warm.output[0]["totals"]
    out["warm_backup_files_read"] = totals.get("files_read")
    out["warm_backup_files_reused"] = totals.get("files_reused")
    log(f"  warm backup: {warm.wall_s:.1f} s, RssAnon {warm.rss_anon_kib / 1024:.0f} MiB, "
        f"GET {out['warm_backup_get_bytes'] / 1024:.0f} KiB (new index blobs {out['new_index_bytes'] / 1024:.0f} KiB)")

    env_main = dict(env, KDIST_CACHE_DIR=cache, USER="main", LOGNAME="main")
    listed = checked("kdist snapshot list", run_kdist(["snapshot", "list", "--json"], env_main,
                                                      os.path.join(logs, "list")), n)
    _phase(out, "list", listed)
    out["snapshots_listed"] = len(listed.output or [])

    target = os.path.join(base, "restored")
    one = rel[len(rel) // 2]
    restored = checked("kdist snapshot restore", run_kdist(
        ["snapshot", "restore", warm.output[0]["id"], target, "--include", one, "--json"], env_main,
        os.path.join(logs, "restore")), n)
    _phase(out, "restore", restored, restored.output["requests"])
    out["restore_files"] = restored.output.get("files")
    with open(os.path.join(tree, one), "rb") as a, open(os.path.join(target, os.path.basename(one)), "rb") as b:
        out["restore_ok"] = a.read() == b.read()
    out["cache_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(cache) for f in fs)
    log(f"  list: {listed.wall_s:.1f} s, {out['snapshots_listed']} snapshots; restore of one file: "
        f"{restored.wall_s:.1f} s, GET {out['restore_get_calls']} ({out['restore_get_bytes'] / 1024:.0f} KiB)")
    return out


# ---- the table -------------------------------------------------------------------------------
COLUMNS = [
    ("N", lambda r: f"{r['contents']:,}"),
    ("index MiB", lambda r: f"{r['index_bytes'] / MIB:.0f}"),
    ("cold s", lambda r: f"{r['cold_backup_wall_s']:.1f}"),
    ("cold RssAnon", lambda r: f"{r['cold_backup_rss_mib']:.0f}"),
    ("cold RssFile", lambda r: f"{r['cold_backup_rss_file_mib']:.0f}"),
    ("cold VmHWM", lambda r: f"{r['cold_backup_vmhwm_mib']:.0f}"),
    ("cold GETs", lambda r: f"{r['cold_backup_get_calls']}"),
    ("cold GET MiB", lambda r: f"{r['cold_backup_get_bytes'] / MIB:.1f}"),
    ("warm s", lambda r: f"{r['warm_backup_wall_s']:.1f}"),
    ("warm RssAnon", lambda r: f"{r['warm_backup_rss_mib']:.0f}"),
    ("warm RssFile", lambda r: f"{r['warm_backup_rss_file_mib']:.0f}"),
    ("warm VmHWM", lambda r: f"{r['warm_backup_vmhwm_mib']:.0f}"),
    ("warm GETs", lambda r: f"{r['warm_backup_get_calls']}"),
    ("warm GET KiB", lambda r: f"{r['warm_backup_get_bytes'] / 1024:.0f}"),
    ("new index KiB", lambda r: f"{r['new_index_bytes'] / 1024:.0f}"),
    ("list s", lambda r: f"{r['list_wall_s']:.2f}"),
    ("list RssAnon", lambda r: f"{r['list_rss_mib']:.0f}"),
    ("list GETs", lambda r: f"{r['list_get_calls']}"),
    ("restore s", lambda r: f"{r['restore_wall_s']:.2f}"),
    ("restore RssAnon", lambda r: f"{r['restore_rss_mib']:.0f}"),
    ("restore RssFile", lambda r: f"{r['restore_rss_file_mib']:.0f}"),
    ("restore GETs", lambda r: f"{r['restore_get_calls']}"),
]


def table(rows: list[dict], columns: list = COLUMNS) -> str:
    lines = ["| " + " | ".join(h for h, _f in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _h, f in columns) + " |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_sizes(sizes: list[int], workdir: str | None, keep: bool, as_json: bool, prefix: str, run) -> tuple[list, bool]:
    """``run(n, base)`` for each N in a fresh directory ``<workdir>/n<N>`` (default workdir: a new
    one under /tmp named ``prefix...``), each row printed as a line of JSON if ``as_json``; what
    a run made is removed unless ``keep`` (a failed one's logs stay). Returns (rows, any failed)."""
    root = workdir or tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.makedirs(root, exist_ok=True)
    rows, failed = [], False
    for n in sizes:
        base = os.path.join(root, f"n{n}")
        shutil.rmtree(base, ignore_errors=True)
        log(f"N={n:,} in {base}")
        try:
            row = run(n, base)
        except CommandFailed as exc:
            log(f"  failed: {exc} (logs kept in {base}/logs)")
            failed = True
            continue
        rows.append(row)
        if as_json:
            print(json.dumps(row), flush=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    if not keep and not workdir and not failed:
        shutil.rmtree(root, ignore_errors=True)
    return rows, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contents", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                    help="numbers of contents in the index, one repository each")
    ap.add_argument("--files", type=int, default=1000, help="files in the measured host's tree")
    ap.add_argument("--changed", type=int, default=10, help="files changed before the warm backup")
    ap.add_argument("--hosts", type=int, default=3, help="other hosts with a snapshot each, made first")
    ap.add_argument("--raw-entries", type=int, default=None,
                    help=f"entries in the raw index blobs of the newest epochs (default {RAW_SHARE * 100:g}%% of N)")
    ap.add_argument("--contents-per-pack", type=int, default=64,
                    help="spread the contents over N / this many packs, so each index blob's pack table names "
                         "the packs its entries lie in, as in a real repository (default 64: 1 MiB chunks in "
                         "64 MiB of packs, the hardest case; 0: a handful of packs per blob)")
    ap.add_argument("--full-kdf", action="store_true", help="full-strength scrypt (128 MiB per command)")
    ap.add_argument("--workdir", default=None,
                    help="where repositories and caches go (default: a new directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep each N's repository, caches and logs")
    ap.add_argument("--json", action="store_true", help="print one JSON object per N (one a line), no table")
    args = ap.parse_args(argv)

    rows, failed = run_sizes(args.contents, args.workdir, args.keep, args.json, "kdist-fleet-", lambda n, base: run_one(
        n, base, args.files, args.changed, args.hosts, not args.full_kdf, args.raw_entries,
        args.contents_per_pack or None, log))
    if not args.json and rows:
        print(table(rows))
        print("RssAnon, RssFile, VmHWM: peaks in MiB (sampled every 10 ms); GET: calls and bytes the command "
              "reported; index MiB: all index blobs when the cold backup starts; new index: blobs written after it.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
