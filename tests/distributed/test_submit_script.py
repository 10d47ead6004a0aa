"""``cluster/backup.py`` as ``ray submit`` runs it: a separate process on a machine where a Ray
head was started with ``ray start --head``, calling ``ray.init()`` with no address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from kdist_trees import PASSWORD, build_tree, tree_state
from repo_format.crypto import KdfParams
from repo_format.repository import Repository
from repo_format.storage import open_storage

from kdist.cli import exit_codes
from kdist.restore import Restorer
from kdist.snapshot import resolve_snapshot

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "backup.py")
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, forget_ray_address):
    """A Ray head in its own process group (``--block`` keeps it in the foreground), stopped by
    its process id: never ``ray stop``, which would stop every Ray on the machine."""
    port = _free_port()
    # token authentication off for the head, `ray status` and the script alike: Ray 2.60 refuses
    # clients whose RAY_AUTH_MODE differs from the head's (cluster/README.md)
    env = {**os.environ, "KDIST_PASSWORD": PASSWORD, "KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # bounded polling until `ray start` says it is done: only then does `ray.init()` on this
        # machine find the new head (before, it would find the address of an earlier one)
        for _ in range(TIMEOUT * 4):
            if "Ray runtime started" in (tmp_path / "head.log").read_text(errors="replace"):
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text(errors="replace")[-2000:]
            threading.Event().wait(0.25)
        else:
            pytest.fail(f"the Ray head on port {port} never answered; see {tmp_path / 'head.log'}")
        yield port, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        forget_ray_address(f"127.0.0.1:{port}")


def test_backup_script_on_a_ray_head(ray_head, tmp_path):
    port, env = ray_head
    repo_dir, tree = tmp_path / "repo", tmp_path / "tree"
    Repository.create(open_storage(str(repo_dir), create=True), PASSWORD, kdf=KdfParams.weak_for_tests()).close()
    build_tree(tree)

    r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "shard", "--path", str(tree),
                        "--tag", "nightly", "--json"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "ok" and summary["cluster"]["address"].endswith(f":{port}")  # joined the head
    assert PASSWORD not in r.stdout + r.stderr
    repo = Repository.open(open_storage(str(repo_dir)), PASSWORD)
    snap = resolve_snapshot(repo.manifests, summary["snapshots"][0]["id"])
    assert "nightly" in snap.tags
    Restorer(repo).restore(snap, str(tmp_path / "out"))
    assert tree_state(tmp_path / "out") == tree_state(tree)

    # a node that cannot back up its path fails, and the script says so with its exit code
    r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "fleet",
                        "--path", str(tmp_path / "missing")], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == exit_codes.DISTRIBUTED_FAILED, r.stdout + r.stderr
    assert "failed" in r.stdout and "missing" in r.stdout

    # no password on the nodes: a clear failure, not a traceback
    r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "fleet", "--path", str(tree),
                        "--password-env", "KDIST_NO_SUCH_VARIABLE"], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == exit_codes.DISTRIBUTED_FAILED and "KDIST_NO_SUCH_VARIABLE is not set" in r.stdout
    assert "Traceback" not in r.stderr
