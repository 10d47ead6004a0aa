"""Pack rewrite and two-phase pack deletion, on a repository whose margins pass in virtual time.

The repository is created with the full preset scaled from hours to seconds (in its format
blob), over the in-memory storage whose timestamps come from the same virtual clock that the
library's clock reads, so a test lets margins pass by moving that clock.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import clock  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import BlobNotFound  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import IndexEntry, MergedIndex  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.storage.base import BlobMeta  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

from kdist.gc import history  # noqa: E402
from kdist.gc.clock_guard import StorageClock  # noqa: E402
from kdist.gc.pack_rewrite import SMALL_PACKS, execute_rewrite, plan_rewrite  # noqa: E402
from kdist.gc.run import MaintenanceOptions, Rules, run_maintenance  # noqa: E402
from kdist.snapshot import TYPE_FILE, Entry, Snapshot, Source, encode_directory, read_directory  # noqa: E402

SAFETY = SAFETY_FULL.scaled(1 / 3600)  # every margin in hours becomes seconds of virtual time
PACK_SIZE = 64 * 1024
PARAMS = RepositoryParameters(pack_size=PACK_SIZE, metadata_pack_size=PACK_SIZE, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})
PASSWORD = "rewrite"
STEP = 0.5  # virtual seconds between maintenance runs


class World:
    def __init__(self):
        self.t = 1_800_000_000.0
        self.storage = MemoryStorage(clock=lambda: self.t)
        clock.set_clock(lambda: self.t)
        clock.set_monotonic(lambda: self.t)
        Repository.create(self.storage, PASSWORD, PARAMS, KdfParams.weak_for_tests()).close()

    def open(self) -> Repository:
        return Repository.open(self.storage, PASSWORD, heartbeat_thread=False)

    def wait(self, seconds: float) -> None:
        self.t += seconds

    def maintain(self, **options):
        repo = self.open()
        try:
            return run_maintenance(repo, MaintenanceOptions(**options))
        finally:
            repo.close()

    def packs(self) -> dict[str, int]:
        return {m.name: m.length for p in (C.DATA_PACK_PREFIX, C.METADATA_PACK_PREFIX) for m in self.storage.list(p)}

    def backup(self, files: dict[str, bytes]) -> str:
        repo = self.open()
        entries = [Entry(name=n, type=TYPE_FILE, size=len(d), oid=repo.objects.write_bytes(d), mode=0o644)
                   for n, d in files.items()]
        root = repo.objects.write_bytes(encode_directory(entries), metadata=True)
        repo.flush()
        repo.contents.revalidate()
        snap = Snapshot(source=Source("host", "user", "/data"), root=root, start=0, end=self.t)
        rec = repo.manifests.put(snap.labels(), snap.payload())
        repo.close()
        return rec.id

    def forget(self, snapshot_id: str) -> None:
        self.open().manifests.delete([snapshot_id])


def restore(repo: Repository, snapshot_id: str) -> dict[str, bytes]:
    rec = next(r for r in repo.manifests.find(type="snapshot") if r.id == snapshot_id)
    snap = Snapshot.from_record(rec)
    return {e.name: repo.objects.read_all(e.oid) for e in read_directory(repo.objects, snap.root)}


@pytest.fixture
def world():
    w = World()
    yield w
    clock.set_clock(None)
    clock.set_monotonic(None)


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)  # incompressible, so sizes are predictable


def mostly_dead_pack(world: World):
    """Snapshot A holds a small file and a large one in one data pack; snapshot B only the small
    one (deduplicated). Forgetting A leaves that pack mostly dead."""
    keep, junk = data(1, 3000), data(2, 40_000)
    a = world.backup({"keep": keep, "junk": junk})
    world.wait(1)
    b = world.backup({"keep": keep})
    repo = world.open()
    keep_ids = [cid for cid, _ in repo.objects.chunks(repo.objects.write_bytes(keep))]
    old_pack = repo.contents.lookup(keep_ids[0]).pack
    assert {repo.contents.lookup(c).pack for c in keep_ids} == {old_pack}
    world.forget(a)
    return b, {"keep": keep}, keep_ids, old_pack


def test_mostly_dead_pack_is_rewritten_then_deleted_in_two_phases(world):
    b, expected, keep_ids, old_pack = mostly_dead_pack(world)
    reader = world.open()  # a restore that looked its contents up before any maintenance
    stale_entries = [reader.contents.lookup(c) for c in keep_ids]
    assert {e.pack for e in stale_entries} == {old_pack}
    before = sum(world.packs().values())

    moved_at = None
    runs = []
    for _ in range(200):
        world.wait(STEP)
        report = world.maintain()
        runs.append(report)
        if moved_at is None and report.steps["pack_rewrite"]["moved"]:
            moved_at = len(runs)
        if old_pack not in world.packs():
            break
    else:
        pytest.fail("the mostly dead pack was never deleted")
    assert moved_at is not None and moved_at < len(runs), "its live contents were moved before it was deleted"

    # two phases: a run that deleted it follows a run that recorded it, a confirmation margin earlier
    records = history.read_history(world.open().manifests)
    candidate_runs = [r for r in records if any(name == old_pack for name, _ in r.pack_candidates)]
    assert candidate_runs, "the pack was recorded as a candidate before it was deleted"
    assert runs[-1].start - candidate_runs[0].end >= SAFETY.cleanup_margin
    assert old_pack not in {n for n, _ in records[-1].pack_candidates}  # deleted, not recorded again

    # the live contents are in a new pack, the snapshot restores byte-for-byte, the repository shrank
    fresh = world.open()
    assert all(fresh.contents.lookup(c).pack != old_pack for c in keep_ids)
    assert restore(fresh, b) == expected
    assert sum(world.packs().values()) < before

    # that restore still reads: the pack is gone, so it reloads the index once and follows the move
    with pytest.raises(BlobNotFound):
        world.storage.get(old_pack)
    assert b"".join(reader.contents.read_entry(e, e.content_id) for e in stale_entries) == expected["keep"]


def test_a_pack_found_unreferenced_is_deleted_only_by_a_later_run(world):
    world.backup({"f": data(3, 5000)})
    orphan = f"{C.DATA_PACK_PREFIX}{'ab' * C.PACK_RANDOM_BYTES}-{'cd' * C.SESSION_ID_BYTES}"
    world.storage.put(orphan, b"an unindexed pack of a session that died")  # a crashed writer's pack
    world.wait(SAFETY.pack_age + 1)

    first = world.maintain()
    assert orphan in world.packs(), "a pack found unreferenced for the first time is not deleted"
    assert first.steps["blob_gc"]["candidates"] >= 1 and first.steps["blob_gc"]["deleted_packs"] == 0
    assert [orphan, len(b"an unindexed pack of a session that died")] in history.read_history(
        world.open().manifests)[-1].pack_candidates

    world.wait(SAFETY.cleanup_margin / 4)  # not yet a confirmation margin after the first run
    world.maintain()
    assert orphan in world.packs()

    world.wait(SAFETY.cleanup_margin)
    third = world.maintain()
    assert orphan not in world.packs()
    assert third.steps["blob_gc"]["deleted_packs"] >= 1


def test_a_pack_referenced_again_after_the_first_phase_is_kept(world):
    """The race two phases close: an entry pointing into the pack (a writer's undelete from an
    index loaded before the pack's entries were dropped) lands after the first run saw it
    unreferenced."""
    world.backup({"f": data(4, 5000)})
    orphan = f"{C.DATA_PACK_PREFIX}{'ef' * C.PACK_RANDOM_BYTES}-{'cd' * C.SESSION_ID_BYTES}"
    world.storage.put(orphan, b"x" * 100)
    world.wait(SAFETY.pack_age + 1)
    world.maintain()
    assert orphan in world.packs()

    late = IndexEntry(b"\x07" * C.CONTENT_ID_SIZE, orphan, 0, 100, 100, C.COMPRESSION_NONE, int(world.t * 1e6))
    world.open().contents.epochs.write_index([late])
    world.wait(SAFETY.cleanup_margin + 1)
    world.maintain()
    assert orphan in world.packs()


def test_single_phase_deletion_when_the_rule_is_switched_off(world):
    """The switch the simulator's mutation test uses: off, the first run deletes at once."""
    world.backup({"f": data(5, 5000)})
    orphan = f"{C.DATA_PACK_PREFIX}{'12' * C.PACK_RANDOM_BYTES}-{'cd' * C.SESSION_ID_BYTES}"
    world.storage.put(orphan, b"y" * 10)
    world.wait(SAFETY.pack_age + 1)
    world.maintain(rules=Rules(two_phase_delete=False))
    assert orphan not in world.packs()


def mark_deleted(repo: Repository, content_ids: list[bytes]) -> None:
    """What content GC writes for unreachable contents."""
    index = repo.contents.epochs.load_index()
    marks = [replace(e, deleted=True, timestamp_us=e.timestamp_us + 1) for e in map(index.lookup, content_ids)]
    repo.contents.epochs.write_index(marks)


def test_dry_run_writes_and_deletes_nothing(world):
    _b, _expected, keep_ids, old_pack = mostly_dead_pack(world)
    orphan = f"{C.DATA_PACK_PREFIX}{'34' * C.PACK_RANDOM_BYTES}-{'cd' * C.SESSION_ID_BYTES}"
    world.storage.put(orphan, b"z" * 10)
    repo = world.open()
    junk = [e.content_id for e in repo.contents.epochs.load_index()
            if e.pack == old_pack and e.content_id not in keep_ids]
    mark_deleted(repo, junk)  # content GC's marks: the pack is now mostly dead
    world.wait(SAFETY.pack_age + 1)
    # an earlier run found the orphan unreferenced, a confirmation margin ago
    history.write_record(repo.manifests, history.RunRecord(start=world.t - 3, end=world.t - 2,
                                                           pack_candidates=[[orphan, 10]]))
    world.wait(SAFETY.listing_settle)

    before = dict(world.storage._blobs)
    report = world.maintain(dry_run=True)
    assert dict(world.storage._blobs) == before
    assert report.steps["pack_rewrite"]["moved"] == len(keep_ids) and report.steps["blob_gc"]["deleted_packs"] == 1
    assert any(p.startswith(f"pack rewrite: move {len(keep_ids)} live contents") for p in report.plans)

    real = world.maintain()  # the same state, for real: it moves (content GC's marks may add some) and deletes
    assert real.steps["pack_rewrite"]["moved"] >= len(keep_ids) and orphan not in world.packs()
    assert world.open().contents.lookup(keep_ids[0]).pack != old_pack


def test_a_moved_content_that_changed_since_the_plan_is_not_moved(world):
    _b, _expected, keep_ids, old_pack = mostly_dead_pack(world)
    repo = world.open()
    epochs = repo.contents.epochs
    junk = [e.content_id for e in epochs.load_index() if e.pack == old_pack and e.content_id not in keep_ids]
    mark_deleted(repo, junk)
    world.wait(SAFETY.pack_age + 1)
    packs = [m for p in (C.DATA_PACK_PREFIX, C.METADATA_PACK_PREFIX) for m in world.storage.list(p)]
    rplan = plan_rewrite(packs, epochs.load_index(), set(), world.t, SAFETY.pack_age,
                         {False: PACK_SIZE, True: PACK_SIZE})
    assert sorted(e.content_id for e in rplan.move) == sorted(keep_ids)
    victim = rplan.move[0]  # marked deleted after the plan was made: the plan is stale for it
    mark_deleted(repo, [victim.content_id])
    done = execute_rewrite(repo.contents, rplan, StorageClock(world.storage, repo.session, SAFETY.max_pause))
    assert done["skipped"] == 1 and done["moved"] == len(rplan.move) - 1
    after = epochs.load_index()
    assert after.lookup(victim.content_id).pack == old_pack and after.lookup(victim.content_id).deleted
    assert all(after.lookup(e.content_id).pack != old_pack for e in rplan.move[1:])
    repo.close()


def _entry(cid: int, pack: str, offset: int, length: int, deleted: bool = False) -> IndexEntry:
    return IndexEntry(bytes([cid]) * C.CONTENT_ID_SIZE, pack, offset, length, length, 0, 1, deleted)


def test_the_plan_picks_mostly_dead_and_small_packs_only():
    now, age = 1000.0, 10.0
    sizes = {False: 1000, True: 1000}
    dead = BlobMeta("p" + "0" * 32 + "-" + "a" * 16, 800, 0.0)  # 100 of 800 bytes live
    full = BlobMeta("p" + "1" * 32 + "-" + "a" * 16, 800, 0.0)  # 700 live
    young = BlobMeta("p" + "2" * 32 + "-" + "a" * 16, 800, now - 1)
    live_session = BlobMeta("p" + "3" * 32 + "-" + "b" * 16, 800, 0.0)
    deleted_only = BlobMeta("p" + "4" * 32 + "-" + "a" * 16, 800, 0.0)
    index = MergedIndex()
    index.add_entries([_entry(1, dead.name, 0, 100), _entry(2, dead.name, 100, 500, deleted=True),
                       _entry(3, full.name, 0, 700), _entry(4, young.name, 0, 10), _entry(5, live_session.name, 0, 10),
                       _entry(6, deleted_only.name, 0, 10, deleted=True)])
    plan = plan_rewrite([dead, full, young, live_session, deleted_only], index, {"b" * 16}, now, age, sizes)
    assert [m.name for m in plan.packs] == [dead.name] and plan.mostly_dead == 1
    assert [e.content_id[0] for e in plan.move] == [1]  # the deleted entry stays where it is

    # small packs (under a quarter of the pack size, mostly live) are combined only when several are
    small = [BlobMeta(f"q{i:032d}-{'a' * 16}", 200, 0.0) for i in range(SMALL_PACKS)]
    index = MergedIndex()
    index.add_entries([_entry(10 + i, m.name, 0, 150) for i, m in enumerate(small)])
    assert plan_rewrite(small[:-1], index, set(), now, age, sizes).packs == []
    plan = plan_rewrite(small, index, set(), now, age, sizes)
    assert plan.small == SMALL_PACKS and len(plan.move) == SMALL_PACKS


def test_a_reader_still_fails_for_a_pack_gone_without_a_move(world):
    b = world.backup({"f": data(6, 3000)})
    reader = world.open()
    entry = next(e for e in reader.contents.committed if e.pack.startswith(C.DATA_PACK_PREFIX))
    world.storage.delete(entry.pack)
    with pytest.raises(BlobNotFound):
        restore(reader, b)
