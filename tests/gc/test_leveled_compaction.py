"""Leveled index compaction: what maintenance rewrites follows what was added, not the index's
size, and the index stays whole and small in blob count while it does.

Quick maintenance runs (index steps only) on the in-memory storage with a virtual clock and the
full preset scaled from hours to seconds; index entries are written directly (synthetic packs).
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import constants as C  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import IndexEntry  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402

from kdist.gc.index_maintenance import RANGE_RATIO, TIER_FANOUT  # noqa: E402
from kdist.gc.run import MaintenanceOptions, run_maintenance  # noqa: E402

SAFETY = SAFETY_FULL.scaled(1 / 3600)
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})
BASE, DAILY, DAYS = 20_000, 150, 40


@pytest.fixture
def world(virtual_time, memory_repository):
    return memory_repository(PARAMS), virtual_time


def _entries(rng: random.Random, n: int, t: float) -> list[IndexEntry]:
    return [IndexEntry(rng.randbytes(32), f"p{rng.randrange(50):04x}" + "0" * 60, rng.randrange(1 << 20), 100, 100,
                       0, int(t * 1e6)) for _ in range(n)]


def _quick(storage) -> dict:
    repo = Repository.open(storage, "pw", heartbeat_thread=False)
    try:
        return run_maintenance(repo, MaintenanceOptions(full=False)).steps["index"]
    finally:
        repo.close()


def _index_blobs(storage) -> dict[str, int]:
    return {m.name: m.length for m in storage.list("x") if not m.name.startswith(C.EPOCH_MARKER_PREFIX)
            and not m.name.startswith(C.PROBE_PREFIX)}


def test_rewrites_follow_what_was_added_and_the_index_stays_whole(world):
    storage, t = world
    rng = random.Random(1)
    writer = Repository.open(storage, "pw", heartbeat_thread=False)
    written = {}
    base = _entries(rng, BASE, t[0])
    writer.contents.epochs.write_index(base)
    written.update((e.content_id, e) for e in base)
    for _ in range(6):  # the base settles into a range set
        t[0] += SAFETY.min_epoch_duration + SAFETY.listing_settle
        _quick(storage)
    assert any(n.startswith(C.RANGE_PREFIX) for n in _index_blobs(storage))

    added = rewritten = range_merges = set_merges = 0
    most_blobs = 0
    for _day in range(DAYS):
        new = _entries(rng, DAILY, t[0])
        name = writer.contents.epochs.write_index(new)
        added += storage.stat(name).length
        written.update((e.content_id, e) for e in new)
        t[0] += SAFETY.min_epoch_duration + SAFETY.listing_settle
        done = _quick(storage)
        rewritten += done["written_bytes"]
        range_merges += done["range"] is not None
        set_merges += "merged" in done
        most_blobs = max(most_blobs, len(_index_blobs(storage)))
    writer.close()

    range_bytes = BASE * C.INDEX_ENTRY.size
    # the range is rewritten when what is above it reaches a quarter of it: DAYS * DAILY = 6,000
    # entries above 20,000 make one merge (the old policy merged every four epochs: ten)

    assert range_merges <= 1 + DAYS * DAILY / (RANGE_RATIO * BASE)
    assert set_merges >= 2  # tiers of sets merged forward instead
    assert rewritten <= 8 * added + range_merges * range_bytes * 1.3, (rewritten, added, range_merges)
    assert most_blobs <= 4 * TIER_FANOUT + 8  # readers read a bounded number of blobs
    reader = Repository.open(storage, "pw", heartbeat_thread=False)
    index = reader.contents.epochs.load_index()
    missing = [c for c, e in written.items() if index.lookup(c) != e]
    assert missing == []
