"""The simulator in CI: thousands of schedules with every rule on, and the mutation checks.

A simulator that cannot fail proves nothing: each mutation test switches one safety rule off and
requires a violation within its budget of schedules (or in a directed scenario, for rules whose
window random schedules hit too rarely), on a schedule that passes with every rule on.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

import kdist_sim

SCHEDULES = int(os.environ.get("KDIST_SIM_SCHEDULES", "1200"))  # soaks: RELIABILITY.md
WORKERS = 2


def _run_range(args):
    start, count, lag, profile, version = args
    for seed in range(start, start + count):
        try:
            kdist_sim.run_schedule(seed, listing_lag=lag, profile=profile, format_version=version)
        except kdist_sim.Violation as exc:
            world = kdist_sim.World(seed, None, lag, profile, format_version=version)  # replay: the log
            try:
                world.run()
            except kdist_sim.Violation:
                pass
            finally:
                world.close()
            return seed, str(exc), "\n".join(world.log[-60:])
    return None


def _run_parallel(total: int, lag: float, profile: str, first_seed: int = 0,
                  version: int = kdist_sim.C.FORMAT_VERSION) -> list:
    per = -(-total // WORKERS)
    chunks = [(first_seed + i * per, min(per, total - i * per), lag, profile, version) for i in range(WORKERS)]
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:  # fork would copy held locks
        return [r for r in pool.map(_run_range, chunks) if r is not None]


def _report(failures) -> str:
    return "\n\n".join(f"seed {s}: {e}\n{log}" for s, e, log in failures)


@pytest.mark.slow
def test_schedules_without_violation():
    """Every rule on: mixed schedules, mixed with a lagging listing, churn, stalls (stalled
    backups with packs uploaded mid-backup, client clocks hours off), and churn under Object Lock
    (deletes of locked blobs left for later runs)."""
    n = SCHEDULES
    lagging, churn, stall, locked = n // 4, n // 5, 3 * n // 40, n // 20
    mixed = n - lagging - churn - stall - locked
    failures = (_run_parallel(mixed, 0.0, "mixed") + _run_parallel(lagging, 0.05, "mixed", 100_000)
                + _run_parallel(churn, 0.0, "churn", 200_000) + _run_parallel(stall, 0.0, "stall", 300_000)
                + _run_parallel(locked, 0.0, "locked", 400_000))
    assert not failures, _report(failures)


@pytest.mark.slow
def test_format_3_schedules_without_violation():
    """Format 3's content records (SPEC.md section 4a: convergent, ids that hash the record)
    under every writer and maintenance rule: merges, pack rewrite and the dedup guard certify
    records they do not open; snapshots restore through the references' seeds."""
    n = max(SCHEDULES // 25, 8)
    failures = (_run_parallel(n // 2, 0.0, "mixed", 500_000, 3) + _run_parallel(n // 4, 0.05, "mixed", 600_000, 3)
                + _run_parallel(n - n // 2 - n // 4, 0.0, "churn", 700_000, 3))
    assert not failures, _report(failures)


def test_manifest_compaction_survives_a_pause():
    """Found by the sigstop profile: a compaction stopped between reading the records and putting
    its blob used to let the next compaction delete manifests published meanwhile. Compacted
    blobs now carry the time their writer started reading, and coverage is judged by it."""
    kdist_sim.run_scenario("manifest_compaction_pause")


def test_a_set_merge_survives_a_pause_and_a_racing_merge():
    """Leveled compaction, every rule on: a run stopped for hours at its first copy's put while
    another run merges the same sets and later runs delete them; its late copies lose nothing."""
    kdist_sim.run_scenario("merge_paused_and_racing")


@pytest.mark.slow
def test_sigstop_schedules_without_violation():
    """Every rule on, maintenance runs stopped (SIGSTOP) for hours inside a storage request."""
    failures = _run_parallel(max(SCHEDULES // 20, 2), 0.0, "sigstop")
    assert not failures, _report(failures)


def _first_violation(mutation: str, budget: int, lag: float, profile: str):
    """The first seed whose schedule violates an invariant with ``mutation`` and does not with
    every rule on (a violation that every rule on also shows says nothing about the rule)."""
    for seed in range(budget):
        try:
            kdist_sim.run_schedule(seed, mutation, listing_lag=lag, profile=profile)
        except kdist_sim.Violation as exc:
            try:
                kdist_sim.run_schedule(seed, None, listing_lag=lag, profile=profile)
            except kdist_sim.Violation:
                continue
            return seed, str(exc)
    return None


# Each rule switched off alone, and the schedules that must find the violation: (budget, lag,
# profile), the budget about three times the first catching seed plus ten; or (1, 0.0,
# "scenario") for a directed scenario (kdist_sim.SCENARIOS), for a rule whose window is too
# narrow for random schedules. First catching seeds when this was written: view_staleness 0 (9
# before two-phase blob GC and pack rewrite), live_session 12, storage_clock 12.
CAUGHT = {
    # a writer that never re-checks the epoch it wrote into
    "view_staleness": (30, 0.0, "mixed"),
    # a backup publishes between a content-GC run's walk and its marks; quick runs then settle and
    # merge the marks' epoch: only the watermark (a second cycle, which walks the snapshot and
    # undeletes) keeps the merge from dropping them. (Random schedules caught this at seed 0
    # until two-phase blob GC and pack rewrite; no longer within 100 mixed schedules.)
    "two_cycle_drop": (1, 0.0, "scenario"),
    # a backup stalls (alive, heartbeat running) for longer than pack_age between uploading a
    # full pack and the flush that indexes it: only its live session keeps the pack
    "live_session": (50, 0.0, "stall"),
    # the maintenance host's clock is 3 h ahead: every session looks dead to it, and packs old
    # enough, so a stalled backup's unindexed packs go
    "storage_clock": (50, 0.0, "stall"),
    # a listing shows new blobs within listing_settle in any order: phase one of blob GC lists a
    # new backup's first pack before its session marker, phase two lists it before the index
    # blob naming it, after the backup retired its marker; only the pack age keeps it
    "pack_age": (1, 0.0, "scenario"),
    # a content-GC run stopped for hours between reading its marks' time and writing them, while
    # a backup reuses those contents and two cycles pass: the marks land older than the
    # watermark; only their withdrawal (written more than max_pause late) saves them
    "pause_revalidation": (1, 0.0, "scenario"),
    # a backup has indexed its new contents and not yet published when a full run walks the
    # snapshots: only the content age keeps them from being marked. Caught by invariant 3 (churn),
    # not by data loss: the backup undeletes them before it publishes, so for safety the rule is
    # redundant (gc/README.md, "Simulator findings")
    "content_age": (1, 0.0, "scenario"),
    # the local cache: an index load that also takes the index files in the cache that the
    # listing no longer names (an old copy of the cache restored) finds contents live that a
    # range merge dropped, and a backup deduplicates against them
    "listing_decides": (1, 0.0, "scenario"),
    # a cache file changed in place (a deletion flag flipped) after a backup mapped it: a load
    # that trusts the mapping it reuses lets the backup deduplicate against a deleted content,
    # which a merge then drops (found with caches in the simulator: random schedules showed a
    # backup refusing to publish and a maintenance run's IndexError)
    "reauthenticate_mapped": (1, 0.0, "scenario"),
    # maintenance forgets checkpoints of dead backups that a later snapshot supersedes: without
    # the liveness rule it forgets a running backup's, the only tree that protects the unchanged
    # files it reused, and those are collected before the backup publishes
    "checkpoint_session": (1, 0.0, "scenario"),
    # leveled compaction merges the xs sets of several epochs forward into the current epoch:
    # a run that crashes at its first copy's put loses nothing only because the sources go
    # after the copies exist (in a later run); the mutation deletes them first
    "merge_copies_first": (1, 0.0, "scenario"),
    # manifest compaction drops a tombstone once no listed blob holds a live record of its id:
    # dropping every tombstone lets a compaction stopped before its put bring a forgotten
    # snapshot back (invariant 1: no forgotten snapshot is listed again)
    "spent_tombstones": (1, 0.0, "scenario"),
    # maintenance forgets failure records 30 days old (kdist/failures.py): a step that chose every
    # record that old, not only failure records, would forget snapshots as old
    "failure_type": (1, 0.0, "scenario"),
    # a sharded backup's part is judged by its driver's session, not its own (retired when the
    # part finished): judged by its own, a running driver's part is forgotten and what it
    # reused is collected before the driver publishes
    "part_driver": (1, 0.0, "scenario"),
}


def test_every_rule_is_checked():
    assert set(CAUGHT) == set(kdist_sim.MUTATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(m for m in CAUGHT if CAUGHT[m][2] != "scenario"))
def test_mutation_is_caught(mutation):
    budget, lag, profile = CAUGHT[mutation]
    found = _first_violation(mutation, budget, lag, profile)
    assert found is not None, f"switching off {mutation} went unnoticed in {budget} {profile} schedules"


@pytest.mark.parametrize("mutation", sorted(m for m in CAUGHT if CAUGHT[m][2] == "scenario"))
def test_mutation_is_caught_in_its_scenario(mutation):
    assert mutation not in kdist_sim.OPEN_BUGS
    kdist_sim.run_scenario(mutation)  # every rule on: no violation
    with pytest.raises(kdist_sim.Violation):
        kdist_sim.run_scenario(mutation, mutation)


@pytest.mark.parametrize("seed, profile", [(8, "mixed"), (20, "mixed"), (20, "churn")])
def test_caches_change_nothing(seed, profile):
    """Every rule on, the local cache saves requests and changes nothing else: a schedule whose
    processes use caches, deleted, restored from old copies and damaged meanwhile, runs exactly
    as it runs without caches (the cache's choices draw from an RNG of their own)."""
    with_caches = kdist_sim.run_schedule(seed, profile=profile)
    events = [line for line in with_caches.log if " cache: " in line]
    assert {"deleted", "copied", "restored", "damaged"} <= {w for line in events for w in line.split()}
    assert [line for line in with_caches.log if " cache: " not in line] == \
        kdist_sim.run_schedule(seed, profile=profile, caches=False).log


def test_a_schedule_replays_exactly():
    a = kdist_sim.run_schedule(7)
    b = kdist_sim.run_schedule(7)
    assert a.log == b.log and a.published.keys() == b.published.keys()
    assert any("published" in line for line in a.log) and any("maintenance" in line for line in a.log)


def test_another_thread_draws_nothing_from_the_seed():
    """A session heartbeat of a repository an earlier test left open runs in its own thread
    while a schedule runs: it must not take values from the schedule's seeded randomness (it
    once changed a replayed schedule's snapshot ids in CI)."""
    import random
    import threading

    fake = kdist_sim._SeededSecrets(random.Random(1))
    other = threading.Thread(target=lambda: [fake.token_hex(16), fake.token_bytes(8)])
    other.start()
    other.join()
    assert fake.token_hex(16) == random.Random(1).randbytes(16).hex()
