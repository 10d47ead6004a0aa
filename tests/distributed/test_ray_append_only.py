"""Fleet and shard mode under a host's storage credentials, on an S3 that enforces IAM.

Every node of this cluster (a head without CPUs and two 1-CPU nodes) holds the host policy of
cluster/policies (no s3:DeleteObject, no retention changes) and nothing else: whatever a fleet
or sharded backup needs from the storage, those credentials must be enough, and no request of
theirs may be a delete. The driver runs here under the same credentials. The repository is a
format 3 one, the format for fleets whose hosts are kept apart.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kdist_trees import PASSWORD, build_tree, tree_state  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.session import unended_sessions  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402

from kdist.distributed.driver import run_fleet, run_shard  # noqa: E402
from kdist.access import RepositorySpec  # noqa: E402
from kdist.distributed.workers import FleetRequest  # noqa: E402
from kdist.restore import Restorer  # noqa: E402
from kdist.snapshot import list_snapshots  # noqa: E402
from kdist.uploader import BackupOptions  # noqa: E402

HOSTS = ("node-a", "node-b")
LABEL = {"kdist-role": "backup"}
WAIT = 120
PARAMS = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024,
                              chunk_avg=16 * 1024, chunk_min=4 * 1024, chunk_max=64 * 1024)


@pytest.fixture(scope="module")
def host_cluster(iam_s3, tmp_path_factory, forget_ray_address):
    base = tmp_path_factory.mktemp("host-nodes")
    env = {"KDIST_PASSWORD": PASSWORD, "KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1", **iam_s3.credentials["host"]}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env})
    address = c.address
    for host in HOSTS:
        c.add_node(num_cpus=1, labels={**LABEL, "kdist-host": host},
                   env_vars={**env, "KDIST_NODE_CONFIG": str(base / f"{host}.json")})
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes(timeout=WAIT)
    try:
        yield {"base": base}
    finally:
        ray.shutdown()
        c.shutdown()
        forget_ray_address(address)


def test_fleet_and_shard_backups_need_no_delete_right(host_cluster, iam_s3, monkeypatch, tmp_path):
    location, endpoint = f"s3://{iam_s3.bucket}/ray", iam_s3.endpoint
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    iam_s3.env(monkeypatch, "admin")
    # format 3 (the fleet's: per-host trees and sealed records; test_ray_backup.py runs format 2)
    Repository.create(open_storage(location, endpoint_url=endpoint, create=True), PASSWORD, PARAMS,
                      KdfParams.weak_for_tests(), version=3).close()
    roots = {}
    for host in HOSTS:
        roots[host] = tmp_path / f"src-{host}"
        build_tree(roots[host], big_size=64 * 1024)
        with open(host_cluster["base"] / f"{host}.json", "w") as f:
            json.dump({"host": host, "paths": [str(roots[host])]}, f)
    shared = tmp_path / "shared"
    build_tree(shared, big_size=200 * 1024)
    for i in range(12):
        (shared / f"dir{i % 3}").mkdir(exist_ok=True)
        (shared / f"dir{i % 3}" / f"f{i}").write_bytes(os.urandom(20_000))

    iam_s3.env(monkeypatch, "host")  # the driver too
    fleet = run_fleet(RepositorySpec(location, endpoint), FleetRequest(), LABEL, None, 1, False)
    assert fleet.status == "ok", fleet
    shard = run_shard(RepositorySpec(location, endpoint), str(shared), BackupOptions(workers=2), "shared-host",
                      2, 1, False)
    assert shard.status == "ok", shard
    for n in fleet.nodes + shard.nodes:  # every request the nodes made: none a delete
        assert n["requests"].get("PUT", 0) > 0 and n["requests"].get("DELETE", 0) == 0, n

    repo = Repository.open(open_storage(location, endpoint_url=endpoint), PASSWORD, heartbeat_thread=False)
    assert not unended_sessions(repo.storage)  # every session ended with an end blob, none deleted
    snaps = {s.source.host: s for s in list_snapshots(repo.manifests)}
    assert set(snaps) == {*HOSTS, "shared-host"} and repo.format.version == 3
    for host, root in [*roots.items(), ("shared-host", shared)]:
        Restorer(repo).restore(snaps[host], str(tmp_path / f"out-{host}"))
        assert tree_state(tmp_path / f"out-{host}") == tree_state(root)
