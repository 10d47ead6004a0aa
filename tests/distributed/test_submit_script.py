"""``cluster/backup.py`` (``kdist fleet backup``) as ``ray submit`` runs it: a separate process on a
machine where a Ray head was started with ``ray start --head``; and how it finds, or refuses, a
Ray cluster: ``--address auto``, no address beside a live or stale cluster file, an address that
never answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


@contextlib.contextmanager
def _head(tmp_path, forget_ray_address, dashboard: bool = False):
    """A Ray head in its own process group (``--block`` keeps it in the foreground), stopped by
    its process id: never ``ray stop``, which would stop every Ray on the machine. Yields (GCS
    port, dashboard port or None, environment)."""
    port = _free_port()
    dash = _free_port() if dashboard else None
    # token authentication off for the head, `ray status` and the script alike: Ray 2.60 refuses
    # clients whose RAY_AUTH_MODE differs from the head's (cluster/README.md)
    env = {**os.environ, "KDIST_PASSWORD": PASSWORD, "KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "wb")
    board = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard
             else ["--include-dashboard=false"])
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", *board, "--disable-usage-stats"],
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
        yield port, dash, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        forget_ray_address(f"127.0.0.1:{port}")


@pytest.fixture
def ray_head(tmp_path, forget_ray_address):
    with _head(tmp_path, forget_ray_address) as (port, _dash, env):
        yield port, env


def test_backup_script_on_a_ray_head(ray_head, tmp_path):
    port, env = ray_head
    repo_dir, tree = tmp_path / "repo", tmp_path / "tree"
    Repository.create(open_storage(str(repo_dir), create=True), PASSWORD, kdf=KdfParams.weak_for_tests()).close()
    build_tree(tree)

    status = tmp_path / "status.json"
    r = subprocess.run([sys.executable, SCRIPT, "--address", "auto", "--repo", str(repo_dir), "--mode", "shard",
                        "--path", str(tree), "--tag", "nightly", "--json", "--status-file", str(status)],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "ok" and summary["cluster"]["address"].endswith(f":{port}")  # joined the head
    recorded = json.loads(status.read_text())
    assert recorded["exit_code"] == 0 and recorded["status"] == "ok"
    assert recorded["snapshots"] == summary["snapshots"] and recorded["finished"] >= recorded["started"]
    assert PASSWORD not in r.stdout + r.stderr
    repo = Repository.open(open_storage(str(repo_dir)), PASSWORD)
    snap = resolve_snapshot(repo.manifests, summary["snapshots"][0]["id"])
    assert "nightly" in snap.tags
    Restorer(repo).restore(snap, str(tmp_path / "out"))
    assert tree_state(tmp_path / "out") == tree_state(tree)

    # a node that cannot back up its path fails, and the script says so with its exit code, in
    # the status file too (`ray submit` itself exits 1 for every failure)
    r = subprocess.run([sys.executable, SCRIPT, "--address", "auto", "--repo", str(repo_dir), "--mode", "fleet",
                        "--path", str(tmp_path / "missing"), "--status-file", str(status)],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == exit_codes.DISTRIBUTED_FAILED, r.stdout + r.stderr
    assert "failed" in r.stdout and "missing" in r.stdout
    recorded = json.loads(status.read_text())
    assert recorded["exit_code"] == exit_codes.DISTRIBUTED_FAILED and recorded["status"] == "failed"
    assert "missing" in recorded["nodes"][0]["error"]

    # no password on the nodes: a clear failure, not a traceback
    r = subprocess.run([sys.executable, SCRIPT, "--address", "auto", "--repo", str(repo_dir), "--mode", "fleet",
                        "--path", str(tree), "--password-env", "KDIST_NO_SUCH_VARIABLE"], env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == exit_codes.DISTRIBUTED_FAILED, r.stdout + r.stderr
    assert "no password: set KDIST_NO_SUCH_VARIABLE" in r.stdout and "Traceback" not in r.stderr

    # the head's head node offers 1 CPU: an actor asking for 2 could never start there; the node
    # is left out with the reason, not reported as dying
    r = subprocess.run([sys.executable, SCRIPT, "--address", "auto", "--repo", str(repo_dir), "--mode", "fleet",
                        "--path", str(tree), "--cpus-per-actor", "2", "--json"], env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    summary = json.loads(r.stdout)
    assert r.returncode == exit_codes.DISTRIBUTED_FAILED and summary["nodes"] == []
    assert "offers 1 CPUs to Ray and a backup actor needs 2" in summary["left_out"][0]["reason"]
    assert "no matching node can run a backup actor" in summary["error"] and "died" not in r.stdout

    # no --address and no RAY_ADDRESS beside a live head: refused, naming the head (a cron line
    # written for `ray submit` before --address must not back up one machine with exit 0)
    r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "shard", "--path", str(tree)],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == exit_codes.RAY_UNAVAILABLE, r.stdout + r.stderr
    assert "a Ray cluster runs on this machine (" in r.stderr and f":{port}, named by" in r.stderr
    assert "--address auto" in r.stderr

    # the head's cluster file gone (a tmp cleaner), another temp dir: its GCS process still counts
    elsewhere = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    try:
        r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "shard", "--path", str(tree)],
                           env={**env, "RAY_TMPDIR": elsewhere}, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == exit_codes.RAY_UNAVAILABLE, r.stdout + r.stderr
        assert "the GCS of a Ray process running here" in r.stderr
    finally:
        subprocess.run(["rm", "-rf", elsewhere])

    # --address local: a Ray of its own beside the head
    r = subprocess.run([sys.executable, SCRIPT, "--address", "local", "--repo", str(repo_dir), "--mode", "shard",
                        "--path", str(tree), "--json"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not json.loads(r.stdout)["cluster"]["address"].endswith(f":{port}")  # not the head's


def _kdist_fleet(*args, env_extra=None):
    env = {**os.environ, "KDIST_PASSWORD": PASSWORD, "KDIST_RAY_TIMEOUT": "2", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "kdist.cli.main", "fleet", "backup", "--repo", "/nonexistent",
                           "--mode", "fleet", "--path", "/tmp", *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_an_address_that_does_not_answer_is_a_clear_error_in_seconds(tmp_path):
    """A port that accepts connections and never speaks (a hung head, a wrong service), a port
    nobody listens on, and ``auto`` beside a stale cluster file: exit 20 naming the cause (the
    HTTP/2 check's words: the command never reached Ray's minutes of retries)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes handshakes; nothing ever reads or writes
    try:
        r = _kdist_fleet("--address", f"127.0.0.1:{silent.getsockname()[1]}",
                         "--status-file", str(tmp_path / "status.json"))
        assert r.returncode == exit_codes.RAY_UNAVAILABLE, r.stderr
        assert "accepts connections but does not answer as a Ray head" in r.stderr
        recorded = json.loads((tmp_path / "status.json").read_text())
        assert recorded["exit_code"] == exit_codes.RAY_UNAVAILABLE and "does not answer" in recorded["error"]
    finally:
        silent.close()

    r = _kdist_fleet("--address", f"127.0.0.1:{_free_port()}")
    assert r.returncode == exit_codes.RAY_UNAVAILABLE and "does not answer" in r.stderr, r.stderr

    stale_tmp = tmp_path / "raytmp"
    (stale_tmp / "ray").mkdir(parents=True)
    dead = f"127.0.0.1:{_free_port()}"
    (stale_tmp / "ray" / "ray_current_cluster").write_text(dead + "\n")
    r = _kdist_fleet("--address", "auto", env_extra={"RAY_TMPDIR": str(stale_tmp)})
    assert r.returncode == exit_codes.RAY_UNAVAILABLE, r.stderr
    assert f"names {dead}, which does not answer: a file left by a cluster that is gone" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_address_beside_a_stale_cluster_file_starts_a_ray_of_its_own(tmp_path):
    """The file of a cluster that is gone is never followed (before: minutes of GCS retries)."""
    repo_dir, tree = tmp_path / "repo", tmp_path / "tree"
    Repository.create(open_storage(str(repo_dir), create=True), PASSWORD, kdf=KdfParams.weak_for_tests()).close()
    build_tree(tree)
    stale_tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(stale_tmp, "ray"))
        with open(os.path.join(stale_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{_free_port()}\n")
        env = {**os.environ, "KDIST_PASSWORD": PASSWORD, "KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1",
               "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": stale_tmp}
        env.pop("RAY_ADDRESS", None)
        r = subprocess.run([sys.executable, SCRIPT, "--repo", str(repo_dir), "--mode", "shard", "--path", str(tree),
                            "--json"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "ok"
    finally:
        subprocess.run(["rm", "-rf", stale_tmp])


EXIT_CODE = os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "exit-code.sh")


def test_exit_codes_through_ray_job_submit(tmp_path, forget_ray_address):
    """`ray job submit` against a local head with its dashboard turns kdist's exit 18 into 1;
    cluster/exit-code.sh around it gives 18 back, and 0 for a backup that worked."""
    repo_dir, tree = tmp_path / "repo", tmp_path / "tree"
    Repository.create(open_storage(str(repo_dir), create=True), PASSWORD, kdf=KdfParams.weak_for_tests()).close()
    build_tree(tree)
    with _head(tmp_path, forget_ray_address, dashboard=True) as (_port, dash, env):
        submit = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                  sys.executable, os.path.abspath(SCRIPT), "--repo", str(repo_dir), "--mode", "fleet"]
        # the dashboard's job API comes up a little after `ray start` returns: bounded polling
        for _ in range(TIMEOUT):
            r = subprocess.run(["ray", "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=env,
                               capture_output=True, text=True, timeout=TIMEOUT)
            if r.returncode == 0:
                break
            threading.Event().wait(1)
        failing = [*submit, "--path", str(tmp_path / "missing")]
        r = subprocess.run(failing, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 1, r.stdout + r.stderr  # what Ray makes of it
        assert "kdist: fleet backup exit code 18" in r.stdout + r.stderr
        r = subprocess.run([EXIT_CODE, *failing], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == exit_codes.DISTRIBUTED_FAILED, r.stdout + r.stderr
        r = subprocess.run([EXIT_CODE, *submit, "--path", str(tree)], env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "kdist: fleet backup exit code 0" in r.stdout
    latest = resolve_snapshot(Repository.open(open_storage(str(repo_dir)), PASSWORD).manifests, "latest")
    assert latest.source.path == str(tree) and "fleet" in latest.tags  # the job's snapshot was published
