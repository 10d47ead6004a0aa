"""Distributed backup on real Ray: a head and three 1-CPU nodes on this machine, one per module.

Each node gets its own environment (``KDIST_NODE_CONFIG`` naming its own config file, so each
"host" backs up its own source root, as per-host disks would be) and labels. The driver's
functions run in this process, connected to the cluster like ``ray submit`` connects a script.
"""

from __future__ import annotations

import json
import os
import signal
import random
import shutil
import threading
import uuid
from dataclasses import replace

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kdist_trees import PASSWORD, build_tree, tree_state  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format.session import unended_sessions  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.session import session_of  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402

from kdist.cli import exit_codes  # noqa: E402
from kdist.distributed.driver import run_fleet, run_shard  # noqa: E402
from kdist.access import PasswordSource, RepositorySpec  # noqa: E402
from kdist.distributed.workers import FleetRequest  # noqa: E402
from kdist.failures import read_failures  # noqa: E402
from kdist.fleet_status import fleet_status  # noqa: E402
from kdist.gc.run import run_maintenance  # noqa: E402
from kdist.restore import Restorer  # noqa: E402
from kdist.snapshot import list_snapshots  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402

HOSTS = ("node-a", "node-b", "node-c")
LABEL = {"kdist-role": "backup"}
WAIT = 120  # seconds: the bound on every wait for the cluster
PARAMS = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024,
                              chunk_avg=16 * 1024, chunk_min=4 * 1024, chunk_max=64 * 1024)
# margins of hours scaled to seconds through the format blob, so that sessions expire in a test
SHORT = replace(PARAMS, extra={"safety": SAFETY_FULL.scaled(1 / 3600).to_dict()})
# margins short enough for maintenance to act during a backup, long enough that a heartbeat
# delayed by a loaded 2-core CI machine does not lapse a session (expiry 20 s, heartbeat 100 s/60)
BRIEF = replace(PARAMS, extra={"safety": SAFETY_FULL.scaled(1 / 360).to_dict()})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_server, forget_ray_address):
    """Head (no CPU, runs nothing but the driver's helpers) and three backup nodes."""
    base = tmp_path_factory.mktemp("nodes")
    env = {"KDIST_PASSWORD": PASSWORD, "KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1"}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env})
    address = c.address  # (shutdown forgets it)
    nodes = {}
    for host in HOSTS:
        nodes[host] = _add_node(c, base, host, env)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes(timeout=WAIT)
    try:
        yield {"cluster": c, "nodes": nodes, "base": base, "env": env}
    finally:
        ray.shutdown()
        c.shutdown()
        forget_ray_address(address)


@pytest.fixture(autouse=True)
def driver_password(monkeypatch):
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)  # the driver reads it like every node does


def _add_node(c, base, host, env):
    return c.add_node(num_cpus=1, labels={**LABEL, "kdist-host": host},
                      env_vars={**env, "KDIST_NODE_CONFIG": str(base / f"{host}.json")})


def _replace_node(cluster, host: str) -> None:
    """A fresh node for the one a test killed, and wait (bounded) until Ray no longer lists the
    dead one as alive: the next fleet backup must see exactly three backup nodes."""
    cluster["nodes"][host] = _add_node(cluster["cluster"], cluster["base"], host, cluster["env"])
    ev = threading.Event()
    for _ in range(WAIT * 10):
        alive = [n for n in ray.nodes() if n["Alive"] and (n.get("Labels") or {}).get("kdist-role") == "backup"]
        if len(alive) == len(HOSTS):
            return
        ev.wait(0.1)
    raise AssertionError(f"Ray still lists {len(alive)} backup nodes after replacing {host}")


def _configure(cluster, roots: dict[str, str]) -> None:
    for host, root in roots.items():
        with open(cluster["base"] / f"{host}.json", "w") as f:
            json.dump({"host": host, "paths": [str(root)]}, f)


def _trees(tmp_path, big=64 * 1024) -> dict[str, str]:
    roots = {}
    for host in HOSTS:
        root = tmp_path / f"src-{host}"
        build_tree(root, big_size=big)
        with open(root / f"only-on-{host}", "wb") as f:
            f.write(os.urandom(100_000))
        roots[host] = str(root)
    return roots


def _create(location, endpoint=None, params=PARAMS):
    Repository.create(open_storage(location, endpoint_url=endpoint, create=True), PASSWORD, params,
                      KdfParams.weak_for_tests()).close()


def _open(location, endpoint=None) -> Repository:
    return Repository.open(open_storage(location, endpoint_url=endpoint), PASSWORD, heartbeat_thread=False)


def _restores(repo: Repository, snap, original: str, target) -> bool:
    Restorer(repo).restore(snap, str(target))
    return tree_state(target) == tree_state(original)


def _fleet(location, endpoint=None, show=False, **kw):
    return run_fleet(RepositorySpec(location, endpoint), FleetRequest(**kw), LABEL, None, 1, show)


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_fleet_backup_of_three_nodes(cluster, tmp_path, backend, s3_bucket, capsys):
    endpoint, location = None, str(tmp_path / "repo")
    if backend == "s3":
        endpoint, location = s3_bucket[0], f"s3://{s3_bucket[1]}/kdist"
    _create(location, endpoint)
    roots = _trees(tmp_path)
    _configure(cluster, roots)

    summary = _fleet(location, endpoint, show=True, tags=["nightly"])
    assert summary.status == "ok" and summary.exit_code() == 0, summary
    assert "3/3 done" in capsys.readouterr().err  # the aggregated progress line, on a terminal
    assert all(0 < n["peak_rss_mb"] < 4096 for n in summary.nodes)
    assert sorted(n["host"] for n in summary.nodes) == sorted(HOSTS)
    assert len({n["node_id"] for n in summary.nodes}) == 3  # each on its own node
    assert all(n["requests"].get("PUT", 0) > 0 for n in summary.nodes)

    repo = _open(location, endpoint)
    assert not unended_sessions(repo.storage)  # every node retired its session (an end marker each)
    snaps = list_snapshots(repo.manifests)
    assert sorted(s.source.host for s in snaps) == sorted(HOSTS)
    for s in snaps:
        assert "nightly" in s.tags and "fleet" in s.tags
        assert _restores(repo, s, roots[s.source.host], tmp_path / f"out-{s.source.host}")

    # the index is shared: a file node-a stored, copied to node-b, costs node-b nothing new
    shutil.copy(os.path.join(roots["node-a"], "only-on-node-a"), os.path.join(roots["node-b"], "copied-from-a"))
    again = {n["host"]: n for n in _fleet(location, endpoint, jitter=0.5).nodes}
    assert again["node-b"]["status"] == "ok"
    waits = [n["jitter_wait"] for n in again.values()]  # --jitter: each node waited its own random share
    assert all(0 <= w <= 0.5 for w in waits) and len(set(waits)) == 3
    assert all(n["jitter_wait"] == 0 for n in summary.nodes)
    assert again["node-b"]["bytes_read"] >= 100_000  # it did read the new file...
    assert again["node-b"]["new_bytes"] < 10_000  # ...and stored only its directory objects


def test_sharded_backup_equals_single_process(cluster, tmp_path):
    location = str(tmp_path / "repo")
    _create(location)
    root = tmp_path / "shared"
    build_tree(root, big_size=400 * 1024)
    for i in range(40):  # enough entries that the tree is split below the root
        d = root / f"dir{i % 5}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}").write_bytes(os.urandom(30_000 + 997 * i))
    opts = BackupOptions(tags=["shard"], workers=2)

    summary = run_shard(RepositorySpec(location, None), str(root), opts, "shared-host", 3, 1, False)
    assert summary.status == "ok", summary
    assert summary.totals["parts"] > 3
    # each actor fetches an index blob once, whichever part needs it: requests grow with the parts
    # (a reload per part used to read every blob published so far, the square of the parts)
    gets = [p["requests"].get("GET", 0) for p in summary.nodes]
    assert len(gets) == summary.totals["parts"] and sum(gets) <= 3 * len(gets), gets
    assert len({p["node_id"] for p in summary.nodes}) >= 2  # the parts really were spread
    repo = _open(location)
    assert not unended_sessions(repo.storage)  # the driver and every actor retired theirs (an end marker each)
    sharded = [s for s in list_snapshots(repo.manifests, include_checkpoints=True)]
    assert len(sharded) == 1 and not sharded[0].checkpoint  # the parts' checkpoints are gone

    single = Uploader(Repository.open(open_storage(location), PASSWORD), BackupOptions(reuse_previous=False)).backup(str(root))
    assert single.root == sharded[0].root == summary.snapshots[0]["root"]
    assert _restores(repo, sharded[0], str(root), tmp_path / "out")


def test_a_node_dies_during_a_sharded_backup(cluster, tmp_path):
    """The parts of the dead node's actor are queued again on the others; the one snapshot is
    still the single-process one."""
    location = str(tmp_path / "repo")
    _create(location)
    root = tmp_path / "shared"
    for i in range(1000):  # far from done when the first part is
        d = root / f"d{i % 12}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(256 * 1024))
    t, result = _in_thread(lambda: run_shard(RepositorySpec(location, None), str(root), BackupOptions(workers=1),
                                             "shared-host", 3, 1, False))
    ev = threading.Event()
    try:
        for _ in range(WAIT * 20):  # bounded: until some part has finished
            assert t.is_alive(), result
            if [r for r in _open(location).manifests.find(type="snapshot", checkpoint="1") if r.labels.get("run")]:
                break
            ev.wait(0.05)
    finally:
        summary = _kill_node_and_finish(cluster, "node-b", t, result)
    assert summary.status == "ok", summary
    assert summary.totals["requeued"] >= 1
    repo = _open(location)
    single = Uploader(Repository.open(open_storage(location), PASSWORD), BackupOptions(reuse_previous=False)).backup(str(root))
    assert single.root == summary.snapshots[0]["root"]
    assert not [s for s in list_snapshots(repo.manifests, include_checkpoints=True) if s.checkpoint]


def test_a_gc_run_during_a_fleet_backup(cluster, tmp_path):
    location = str(tmp_path / "repo")
    _create(location, params=BRIEF)
    roots = _trees(tmp_path, big=2 << 20)
    _configure(cluster, roots)
    stop = threading.Event()
    runs = []

    def gc_loop():
        while not stop.is_set():
            repo = Repository.open(open_storage(location), PASSWORD)
            try:
                runs.append(run_maintenance(repo))
            finally:
                repo.close()

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        summary = _fleet(location)
    finally:
        stop.set()
        t.join(timeout=WAIT)
    assert summary.status == "ok", [(n["host"], n["status"], n.get("error")) for n in summary.nodes]
    assert runs, "no maintenance run overlapped the backup"
    repo = _open(location)
    for s in list_snapshots(repo.manifests):
        assert _restores(repo, s, roots[s.source.host], tmp_path / f"out-{s.source.host}")


def test_a_node_dies_mid_backup(cluster, tmp_path):
    """node-c dies while it backs up a large tree: reported failed, non-zero exit; the others
    publish; node-c's last checkpoint stays reachable; its orphan packs go only once its
    session has expired."""
    location = str(tmp_path / "repo")
    _create(location, params=SHORT)
    roots = _trees(tmp_path)
    victim_root = tmp_path / "big-on-c"
    for i in range(1000):  # large enough to be far from done at its first checkpoint
        d = victim_root / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(256 * 1024))
    roots["node-c"] = str(victim_root)
    _configure(cluster, roots)
    with open(cluster["base"] / "node-c.json", "w") as f:  # it publishes under a name of its config's
        json.dump({"host": "db-c", "paths": [str(victim_root)]}, f)
    storage = open_storage(location)
    t, result = _in_thread(lambda: _fleet(location))
    try:
        victim_session = _wait_for_checkpoint_and_orphans(location, "db-c", t)
    finally:
        summary = _kill_node_and_finish(cluster, "node-c", t, result)
    by_host = {n["host"]: n for n in summary.nodes}
    assert summary.status == "failed" and summary.exit_code() == exit_codes.DISTRIBUTED_FAILED
    assert by_host["db-c"]["status"] == "failed" and "died" in by_host["db-c"]["error"]
    assert by_host["node-a"]["status"] == by_host["node-b"]["status"] == "ok"

    repo = _open(location)
    finals = {s.source.host: s for s in list_snapshots(repo.manifests)}
    assert sorted(finals) == ["node-a", "node-b"]
    for host, s in finals.items():
        assert _restores(repo, s, roots[host], tmp_path / f"out-{host}")
    checkpoint = [s for s in list_snapshots(repo.manifests, include_checkpoints=True) if s.source.host == "db-c"]
    assert checkpoint and checkpoint[-1].checkpoint
    # the driver recorded the dead node's failure, under the name it publishes as (which it
    # announced), so fleet status shows it on that host's row whatever became of the run's output
    [f] = read_failures(repo.manifests)
    assert (f.host, f.path) == ("db-c", "") and "died" in f.error and summary.unrecorded == []
    rows = {r.host: r for r in fleet_status(repo.manifests, _storage_now(storage))}
    assert set(rows) == {"node-a", "node-b", "db-c"}
    assert rows["db-c"].failing and not rows["node-a"].failing and not rows["node-b"].failing
    Restorer(repo).restore(checkpoint[-1], str(tmp_path / "out-c"))  # what it finished restores
    restored = [p for p in (tmp_path / "out-c").rglob("f*") if p.is_file()]
    assert restored and all(p.read_bytes() == (victim_root / p.relative_to(tmp_path / "out-c")).read_bytes()
                            for p in restored)

    # its orphan packs survive maintenance while its session may be live, and go after
    orphans = _orphan_packs(location, victim_session)
    assert orphans
    safety = repo.contents.safety
    deadline_live = _storage_now(storage) + safety.session_expiry
    while _storage_now(storage) < deadline_live - 0.5:
        _gc(location)
        assert set(orphans) <= _names(storage), "an orphan pack went while its session could be live"
    for _ in range(400):
        if not set(orphans) & _names(storage):
            break
        _gc(location)
        _wait_storage_time(storage, 0.5)
    assert not set(orphans) & _names(storage), "orphan packs of the dead session were never collected"
    for host, s in finals.items():  # and nothing committed was harmed
        assert _restores(_open(location), s, roots[host], tmp_path / f"again-{host}")


def _kill_node_and_finish(cluster, host: str, backup: threading.Thread, result: dict):
    """Kill ``host``'s node under the running backup, wait (bounded) for the backup to finish,
    give the cluster a fresh node in its place; return the backup's summary."""
    try:
        node = cluster["nodes"][host]
        _kill_children(node.all_processes["raylet"][0].process.pid)  # its workers die now, not once
        cluster["cluster"].remove_node(node, allow_graceful=False)  # they notice the raylet is gone
        backup.join(timeout=WAIT)
        assert not backup.is_alive(), f"the backup did not finish within {WAIT} s of {host} dying"
    finally:
        _replace_node(cluster, host)
    assert "error" not in result, result
    return result["summary"]


def _kill_children(pid: int) -> None:
    """SIGKILL every process whose parent is ``pid`` (a raylet's workers), read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile


def _in_thread(backup):
    """Run ``backup()`` in a started thread; ``result`` gets its "summary" or its "error"."""
    result = {}

    def run():
        try:
            result["summary"] = backup()
        except BaseException as exc:  # reported by the test's assertion
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _names(storage) -> set[str]:
    return {m.name for m in storage.list()}


def _gc(location) -> None:
    repo = Repository.open(open_storage(location), PASSWORD)
    try:
        run_maintenance(repo)
    finally:
        repo.close()


def _storage_now(storage) -> float:
    from repo_format.session import storage_now
    return storage_now(storage, uuid.uuid4().hex[:32])


def _wait_storage_time(storage, seconds: float) -> None:
    """Let ``seconds`` of storage time pass (gc margins are measured on the storage's clock)."""
    end = _storage_now(storage) + seconds
    ev = threading.Event()
    while _storage_now(storage) < end:
        ev.wait(0.05)


def _orphan_packs(location, session: str) -> list[str]:
    repo = _open(location)
    referenced = {e.pack for e in repo.contents.epochs.load_index().physical_entries()}
    return [m.name for p in (C.DATA_PACK_PREFIX, C.METADATA_PACK_PREFIX) for m in repo.storage.list(p)
            if session_of(m.name) == session and m.name not in referenced]


def _wait_for_checkpoint_and_orphans(location, host: str, backup: threading.Thread) -> str:
    """Block until ``host`` has published a checkpoint and has uploaded packs that no index names
    yet (so that the kill leaves orphans); return its session. Polls the repository, bounded."""
    ev = threading.Event()
    for _ in range(WAIT * 20):
        assert backup.is_alive(), "the backup finished before the node could be killed"
        repo = _open(location)
        records = repo.manifests.find(type="snapshot", host=host, checkpoint="1")
        if records:
            session = session_of(records[-1].blob)  # a manifest blob's name ends with its writer's session
            if _orphan_packs(location, session):
                return session
        ev.wait(0.05)
    raise AssertionError(f"{host} never checkpointed with unindexed packs in flight")


def _wide_tree(root, dirs: int, seed: int) -> None:
    """``dirs`` directories of a few small files under two levels: enough subtrees to share out."""
    rng = random.Random(seed)
    for d in range(dirs):
        sub = root / f"a{d % 7}" / f"b{d}"
        sub.mkdir(parents=True)
        for f in range(3):
            (sub / f"f{f}").write_bytes(rng.randbytes(rng.choice([700, 5000])))


def test_gc_on_ray_plans_what_a_single_process_plans(cluster, tmp_path):
    from kdist.gc.content_gc import plan_content_gc
    from kdist.gc.ray_pool import RayPool
    from repo_format.index_scan import ROW_BYTES

    location = str(tmp_path / "repo")
    _create(location)
    for i in range(3):  # nightly backups sharing most directories, then the first forgotten
        src = tmp_path / f"src{i}"
        _wide_tree(src, 60, seed=1)
        _wide_tree(src / "new", 5, seed=10 + i)
        repo = _open(location)
        Uploader(repo, BackupOptions()).backup(str(src))
        repo.close()
    repo = _open(location)
    repo.manifests.delete([list_snapshots(repo.manifests)[0].id])
    repo = _open(location)
    index = repo.contents.epochs.load_index()
    now = 2e9  # every pack is old enough
    tiny = 60 * ROW_BYTES * 4  # several key ranges, so several planning requests
    alone = plan_content_gc(repo, index, now, 0.0, tiny)
    pool = RayPool(RepositorySpec(location), actors=2)
    try:
        shared = plan_content_gc(repo, index, now, 0.0, tiny, pool=pool)
        walked = pool.walked
    finally:
        pool.close()
    assert alone.key_ranges >= 4 and alone.marked > 0 and alone.live > 0
    assert (shared.snapshots, shared.live, shared.marked, shared.undeleted, shared.too_young) == \
        (alone.snapshots, alone.live, alone.marked, alone.undeleted, alone.too_young)
    assert [set(x) for x in shared.entries()] == [set(x) for x in alone.entries()]
    assert len(walked) == 2 and all(w["keys"] > 0 and not w["error"] for w in walked)
    assert len({w["pid"] for w in walked}) == 2  # two actors walked, in two processes


def test_gc_run_with_ray_prints_the_same_plan(cluster, tmp_path):
    from click.testing import CliRunner

    from kdist.cli.main import cli

    location = str(tmp_path / "repo")
    _create(location)
    src = tmp_path / "src"
    _wide_tree(src, 40, seed=3)
    repo = _open(location)
    Uploader(repo, BackupOptions()).backup(str(src))
    repo.close()

    def plans(*extra):
        r = CliRunner().invoke(cli, ["gc", "run", "--repo", location, "--dry-run", "--json", *extra],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    alone, shared = plans(), plans("--ray", "--actors", "2")
    assert shared["plans"] == alone["plans"], (shared["plans"], alone["plans"])
    how = {"spilled_runs": 0, "walk_seconds": 0}  # how the plan was made, not what it is
    assert {**shared["steps"]["content_gc"], **how} == {**alone["steps"]["content_gc"], **how}
    assert shared["steps"]["ray"]["actors"] == 2 and len(shared["steps"]["ray"]["walked"]) == 2


def test_node_configs_provision_password_and_key_without_the_raylets_environment(cluster, tmp_path):
    """What a node needs to open the repository comes from its own config file, read at actor
    start, not from the environment its raylet was started with: the driver names a variable no
    node has, yet every node backs up with the password file its config names; a node whose
    config names a key id that does not exist fails for that reason alone."""
    location = str(tmp_path / "repo")
    _create(location)
    roots = _trees(tmp_path)
    secret = tmp_path / "node-password"
    secret.write_text(PASSWORD + "\n")
    missing = str(tmp_path / "not-on-node-b")
    for host, root in roots.items():
        cfg = {"host": host, "paths": [root], "password_file": str(secret)}
        if host == "node-b":
            cfg["paths"] = [missing, root]  # a path it cannot read: its other paths still back up
        if host == "node-c":
            cfg["key_id"] = "00000000deadbeef"
        with open(cluster["base"] / f"{host}.json", "w") as f:
            json.dump(cfg, f)
    spec = RepositorySpec(location, None, PasswordSource(env="KDIST_NO_SUCH_VARIABLE"))
    summary = run_fleet(spec, FleetRequest(), LABEL, None, 1, False)
    by = {n["host"]: n for n in summary.nodes}
    assert by["node-a"]["status"] == "ok", summary
    assert by["node-b"]["status"] == "failed" and missing in by["node-b"]["error"] and by["node-b"]["recorded"]
    assert by["node-c"]["status"] == "failed" and "no key 00000000deadbeef" in by["node-c"]["error"]
    repo = _open(location)
    assert sorted(s.source.host for s in list_snapshots(repo.manifests)) == ["node-a", "node-b"]
    # node-b recorded its own failure; node-c could not open the repository, nor can the driver
    # (it has no password here): node-c's failure is said to be unrecorded, not lost silently
    [f] = read_failures(repo.manifests)
    assert (f.host, f.path, f.exit_code) == ("node-b", missing, exit_codes.SOURCE_OR_TARGET) and f.run
    assert summary.unrecorded == ["node-c"]


def test_a_head_without_cpus_is_left_out_not_reported_dying(cluster, tmp_path):
    """No --node-label: every alive node is asked, the head included, which was started with
    no CPU (as `ray start --head --num-cpus 0` is): its actor could never start. It is left out
    with the reason and the run succeeds on the three others (before: exit 18 "died
    mid-backup", every night)."""
    location = str(tmp_path / "repo")
    _create(location)
    roots = _trees(tmp_path)
    _configure(cluster, roots)
    summary = run_fleet(RepositorySpec(location), FleetRequest(), {}, None, 1, False)
    assert summary.status == "ok" and summary.exit_code() == 0, summary
    assert sorted(n["host"] for n in summary.nodes) == sorted(HOSTS)
    (head,) = summary.left_out
    assert "offers 0 CPUs to Ray and a backup actor needs 1" in head["reason"]
    assert all("died" not in (n.get("error") or "") for n in summary.nodes)
