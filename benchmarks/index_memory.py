"""Memory of the committed index in one process (one backup actor), by number of contents.

    python -m benchmarks.index_memory [--contents 100000 1000000]

For each size, writes that many index entries (as a backup would, in index blobs of 20,000) into
an in-memory repository, then measures what loading the index costs a fresh reader: Python heap
growth (tracemalloc) and time, for the load and for the first lookup (which, below
``MergedIndex.DICT_LIMIT`` entries, builds a dict of winners). This is the figure that decides
whether actors on one node should share one copy of the index (kdist.distributed, issue 5).
Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import time
import tracemalloc

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.index import IndexEntry  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

BLOB = 20_000


def _id(i: int) -> bytes:
    """A content id as the repository makes them: a (keyed) hash, so uniformly spread."""
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=32).digest()


def build(n: int) -> MemoryStorage:
    storage = MemoryStorage()
    repo = Repository.create(storage, "bench", kdf=KdfParams.weak_for_tests())
    pack = "p" + "0" * 32 + "-" + "1" * 32
    for start in range(0, n, BLOB):
        entries = [IndexEntry(_id(i), pack, i * 100, 100, 200, 1, 1_800_000_000_000_000 + i)
                   for i in range(start, min(start + BLOB, n))]
        repo.contents.epochs.write_index(entries)
    return storage


def measure(n: int) -> dict:
    """Times first (tracemalloc slows every allocation), then memory on a second, traced load."""
    storage = build(n)
    ids = [_id(i) for i in range(0, n, max(1, n // 10_000))]
    t = time.perf_counter()
    repo = Repository.open(storage, "bench", heartbeat_thread=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    repo.contents.lookup(ids[len(ids) // 2])
    first_lookup_s = time.perf_counter() - t
    t = time.perf_counter()
    for cid in ids:
        repo.contents.lookup(cid)
    lookup_us = (time.perf_counter() - t) / len(ids) * 1e6
    del repo
    gc.collect()
    tracemalloc.start()
    repo = Repository.open(storage, "bench", heartbeat_thread=False)
    after_load = tracemalloc.get_traced_memory()[0]
    repo.contents.lookup(ids[0])
    after_lookup = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"contents": n, "load_s": load_s, "load_mib": after_load / 2**20, "first_lookup_s": first_lookup_s,
            "with_lookups_mib": after_lookup / 2**20, "lookup_us": lookup_us}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contents", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args(argv)
    for n in args.contents:
        r = measure(n)
        print(f"{n:>9} contents: load {r['load_s']:.2f} s, {r['load_mib']:.0f} MiB; first lookup {r['first_lookup_s']:.2f} s, "
              f"{r['with_lookups_mib']:.0f} MiB in all; {r['lookup_us']:.1f} us per lookup; "
              f"per million contents: {r['with_lookups_mib'] / n * 1e6:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
