"""Content GC in bounded memory: the plan made range by range, with the reached keys spilled to
disk, is the plan the whole index in memory gives; execution re-validates range by range; GC's
idea of what a snapshot reaches is check's."""

from __future__ import annotations

import math
import os
import random
from dataclasses import replace

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import constants as C  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index_scan import ROW_BYTES  # noqa: E402
from repo_format.repository import Repository  # noqa: E402

from kdist.check import Checker  # noqa: E402
from kdist.gc.clock_guard import StorageClock  # noqa: E402
from kdist.gc.content_gc import execute_content_gc, plan_content_gc, reach_snapshots  # noqa: E402
from kdist.gc.reachable import ReachableKeys  # noqa: E402
from kdist.snapshot import TYPE_DIR, TYPE_FILE, Entry, Snapshot, Source, encode_directory, read_directory  # noqa: E402

PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096)
TINY = 40 * ROW_BYTES  # 20 entries a key range, 150 reached keys a spilled run


@pytest.fixture
def world(virtual_time, memory_repository):
    return memory_repository(PARAMS), virtual_time


def _open(storage) -> Repository:
    return Repository.open(storage, "pw", heartbeat_thread=False)


def _random_repository(storage, t, seed: int) -> float:
    """Snapshots sharing files and a subdirectory, big files (chunk lists), garbage old and new,
    a forgotten snapshot, and reached contents marked deleted. Returns a content age that
    splits the packs into old and young."""
    rng = random.Random(seed)
    pool = [rng.randbytes(rng.choice([300, 900, 9000])) for _ in range(60)]
    repo = _open(storage)
    shared = repo.objects.write_bytes(encode_directory(
        [Entry(name=f"s{i}", type=TYPE_FILE, size=len(pool[i]), oid=repo.objects.write_bytes(pool[i]))
         for i in range(5)]), metadata=True)
    ids = []
    for s in range(4):
        subdirs = [Entry(name="shared", type=TYPE_DIR, oid=shared)]
        for d in range(3):
            files = [Entry(name=f"f{i}", type=TYPE_FILE, size=len(pool[i]), oid=repo.objects.write_bytes(pool[i]))
                     for i in rng.sample(range(len(pool)), 8)]
            subdirs.append(Entry(name=f"d{d}", type=TYPE_DIR,
                                 oid=repo.objects.write_bytes(encode_directory(files), metadata=True)))
        root = repo.objects.write_bytes(encode_directory(subdirs), metadata=True)
        repo.flush()
        snap = Snapshot(source=Source("h", "u", f"/s{s}"), root=root, start=0, end=t[0])
        ids.append(repo.manifests.put(snap.labels(), snap.payload()).id)
    for _ in range(30):  # old garbage
        repo.contents.write(rng.randbytes(200))
    repo.flush()
    t[0] += 1000
    for _ in range(10):  # young garbage
        repo.contents.write(rng.randbytes(200))
    repo.flush()
    # reached contents that an earlier run marked deleted (they must be undeleted)
    reached = [cid for cid, _ in repo.objects.chunks(repo.objects.write_bytes(pool[0]))]
    repo.contents.epochs.write_index([replace(repo.contents.lookup(c), deleted=True,
                                              timestamp_us=repo.contents.lookup(c).timestamp_us + 1) for c in reached])
    repo.manifests.delete([ids[0]])
    repo.close()
    t[0] += 10
    return 500.0


def _reference_plan(repo: Repository, index, now: float, age: float):
    """The plan as the whole index in memory makes it: every winner, every reached id."""
    reached: set[bytes] = set()

    def object_ids(oid):
        ids = [cid for cid, _ in repo.objects.chunks(oid)]
        return ids + ([bytes.fromhex(oid[1:])] if oid.startswith(C.INDIRECT_OBJECT_PREFIX) else [])

    def walk(oid):
        reached.update(object_ids(oid))
        for e in read_directory(repo.objects, oid):
            if e.type == TYPE_DIR:
                walk(e.oid)
            elif e.type == TYPE_FILE:
                reached.update(object_ids(e.oid))

    for rec in repo.manifests.find(type="snapshot"):
        walk(Snapshot.from_record(rec).root)
    written = {m.name: m.timestamp for p in C.PACK_PREFIXES for m in repo.storage.list(p)}
    winners = list(index)
    marks = {e for e in winners if not e.deleted and e.content_id not in reached
             and now - written.get(e.pack, math.nan) >= age}
    undeletes = {e for e in winners if e.deleted and e.content_id in reached}
    return reached, marks, undeletes


@pytest.mark.parametrize("seed", range(4))
def test_partitioned_plan_equals_in_memory_plan(world, seed):
    storage, t = world
    age = _random_repository(storage, t, seed)
    repo = _open(storage)
    index = repo.contents.epochs.load_index()
    reached, marks, undeletes = _reference_plan(repo, index, t[0], age)
    plan = plan_content_gc(repo, index, t[0], age, memory_limit=TINY)
    assert plan.key_ranges > 5 and plan.spilled_runs > 1  # the memory limit split the work
    got_marks, got_undeletes = plan.entries()
    assert len(got_marks) == len(set(got_marks))
    assert set(got_marks) == marks and marks
    assert set(got_undeletes) == undeletes and undeletes
    assert plan.live == len(reached)
    assert plan.too_young == sum(1 for e in index if not e.deleted and e.content_id not in reached) - len(marks) > 0
    roomy = plan_content_gc(repo, index, t[0], age)  # one range, nothing spilled before the end
    assert roomy.key_ranges == 1 and set(roomy.entries()[0]) == marks
    plan.close()
    roomy.close()


def test_execution_revalidates_each_range_against_a_fresh_index(world):
    storage, t = world
    age = _random_repository(storage, t, 7)
    repo = _open(storage)
    plan = plan_content_gc(repo, repo.contents.epochs.load_index(), t[0], age, memory_limit=TINY)
    marks, _ = plan.entries()
    moved = marks[len(marks) // 2]  # a writer replaces this entry after the plan was made
    newer = replace(moved, offset=moved.offset, timestamp_us=moved.timestamp_us + 10)
    repo.contents.epochs.write_index([newer])
    t[0] += 1
    execute_content_gc(repo, plan, StorageClock(storage, repo.session, 900.0))
    after = _open(storage).contents.epochs.load_index()
    assert after.lookup(moved.content_id) == newer  # not marked: it was not the winner any more
    for e in marks:
        if e.content_id != moved.content_id:
            got = after.lookup(e.content_id)
            assert got.deleted and got.timestamp_us > e.timestamp_us and got.pack == e.pack
    assert plan.spill is None or not os.path.exists(plan.spill.name)  # the spilled plan is removed


def test_gc_reaches_what_check_reaches(world):
    storage, t = world
    _random_repository(storage, t, 3)
    repo = _open(storage)
    checker = Checker(storage, repo.format)
    checker.run()
    with ReachableKeys(buffer_bytes=64) as reach:
        walked = reach_snapshots(repo, reach)
        gc_keys = set(reach.between(0, 2**64).tolist())
    assert walked == 3
    assert gc_keys == {int.from_bytes(c[:8], "big") for c in checker.reached()}
    assert len(gc_keys) > 50


def test_reached_keys_spill_to_sorted_runs():
    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(1000)]
    with ReachableKeys(buffer_bytes=800) as reach:
        for c in ids + ids[:300]:  # duplicates across runs
            reach.add(c)
        assert reach.runs > 10
        keys = sorted({int.from_bytes(c[:8], "big") for c in ids})
        assert reach.between(0, 2**64).tolist() == keys
        lo, hi = keys[100], keys[400]
        assert reach.between(lo, hi).tolist() == keys[100:400]


def test_a_split_walk_hands_out_each_shared_subtree_once_and_reaches_the_same(world):
    from kdist.tree import TreeWalker, directory_contents, reached_contents

    storage, t = world
    _random_repository(storage, t, 11)
    repo = _open(storage)
    roots = [Snapshot.from_record(r).root for r in repo.manifests.find(type="snapshot")]
    driver = TreeWalker.over(repo.objects, max_depth=None)
    read, waiting = driver.split(roots, width=2)
    assert {d.oid for d in read} >= set(roots)  # every root read by the driver
    assert len(waiting) == len(set(waiting)) and not {d.oid for d in read} & set(waiting)
    reached = {c for d in read for c in directory_contents(repo.objects, d)}
    for i in range(2):  # two "actors", each with its own walker
        actor = TreeWalker.over(repo.objects, max_depth=None)
        reached |= {c for oid in waiting[i::2] for c in reached_contents(actor, repo.objects, oid)}
    with ReachableKeys() as reach:
        reach_snapshots(repo, reach)
        assert {int.from_bytes(c[:8], "big") for c in reached} == set(reach.between(0, 2**64).tolist())


def test_the_walkers_policies():
    from repo_format.errors import CorruptionError, StorageUnreachable
    from kdist.tree import Directory, TooDeep, TreeWalker

    sub = "ab" * 32
    tree = {"cd" * 32: [Entry(name="a", type=TYPE_DIR, oid=sub), Entry(name="b", type=TYPE_DIR, oid=sub),
                        Entry(name="bad", type=TYPE_DIR, oid="zz")], sub: []}

    def read(d):
        if d.oid == "ef" * 32:
            raise StorageUnreachable("down")
        return tree[d.oid]

    report = TreeWalker(read, errors="report")
    seen = {d.path: d for d in report.walk("cd" * 32)}
    assert sorted([seen["a"].repeat, seen["b"].repeat]) == [False, True]  # a shared subtree once
    assert [seen[p].entries for p in "ab" if not seen[p].repeat] == [[]]
    assert isinstance(seen["bad"].error, CorruptionError)  # a malformed id is damage, reported
    with pytest.raises(CorruptionError):
        list(TreeWalker(read, errors="raise").walk("cd" * 32))
    shallow = TreeWalker(read, max_depth=0, errors="report", once=False)
    assert [type(d.error) for d in shallow.walk("cd" * 32)][1:] == [TooDeep] * 3
    with pytest.raises(StorageUnreachable):  # an outage stops even a reporting walk
        report.read(Directory("", "ef" * 32, 0, None))


def test_an_unlisted_pack_is_missing_unless_a_fresh_raw_blob_names_it(memory_repository, virtual_time):
    """Content GC's pack ages: a listed pack by its storage time; one the listing does not show
    is taken for missing (as old as can be), unless a raw index blob stored less than
    ``listing_settle`` ago names it (the listing may lag behind such a fresh pack: never old)."""
    import secrets

    from kdist.gc.content_gc import _named_by_young_blobs, pack_times
    from repo_format.index import IndexEntry, MergedIndex
    from repo_format.safety import SAFETY_FULL

    storage = memory_repository(RepositoryParameters(extra={"safety": SAFETY_FULL.to_dict()}))
    repo = Repository.open(storage, "pw", heartbeat_thread=False)
    stored = f"{C.DATA_PACK_PREFIX}{secrets.token_hex(16)}-{repo.session}"
    storage.put(stored, b"a pack")
    gone, fresh = (f"{C.DATA_PACK_PREFIX}{secrets.token_hex(16)}-{repo.session}" for _ in range(2))
    repo.contents.epochs.write_index([IndexEntry(os.urandom(32), gone, 0, 10, 10, 0, 1)])  # an older blob
    virtual_time[0] += SAFETY_FULL.listing_settle + 1
    repo.contents.epochs.write_index([IndexEntry(os.urandom(32), fresh, 0, 10, 10, 0, 1)])
    # a fresh blob naming ``gone`` too keeps nothing young: the older one proves it would be listed
    repo.contents.epochs.write_index([IndexEntry(os.urandom(32), gone, 0, 10, 10, 0, 1)])
    index = repo.contents.refresh_index()
    now = virtual_time[0]
    maybe = _named_by_young_blobs(repo, index, now)
    assert maybe == {fresh}
    times = pack_times(storage, [stored, gone, fresh], maybe)
    assert times[0] == storage.stat(stored).timestamp and times[1] == -math.inf and math.isnan(times[2])
    # without the blobs' names (an index no assembly made) every unlisted pack is spared
    assert _named_by_young_blobs(repo, MergedIndex(index._blobs), now) is None
    assert all(math.isnan(t) for t in pack_times(storage, [gone, fresh], None))
