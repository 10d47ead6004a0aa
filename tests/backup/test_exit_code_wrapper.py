"""cluster/exit-code.sh: kdist's own exit code back from `ray submit` / `ray job submit`, which
exit 1 for every failure and 0 for a stopped job. Tried with stand-in commands that print what
those commands print (the real `ray job submit` is in tests/distributed/test_submit_script.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from kdist.cli import exit_codes
from kdist_trees import cli_env, run_cli

WRAPPER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "exit-code.sh")


def wrapped(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, "bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_the_last_exit_line_wins_over_rays_status():
    r = wrapped("echo node-a: failed; echo 'kdist: fleet backup exit code 18' >&2; exit 1")
    assert r.returncode == 18 and "node-a: failed" in r.stdout  # the output passes through
    assert wrapped("echo 'kdist: fleet backup exit code 3'; exit 1").returncode == 3
    assert wrapped("echo 'kdist: fleet backup exit code 0'; exit 1").returncode == 0


def test_a_job_that_never_said_how_it_ended_is_a_failure():
    """`ray job stop` or a killed driver: Ray reports a stopped job with exit 0, no line came."""
    r = wrapped("echo 'Job raysubmit_1 was stopped'; exit 0")
    assert r.returncode == 1 and "kdist never reported how the backup ended" in r.stderr
    assert wrapped("echo 'connection refused'; exit 4").returncode == 4  # Ray's own failure


def test_only_a_whole_line_counts():
    """A file or host name that contains the words, inside a summary or JSON line, is no exit line."""
    r = wrapped("echo 'part 3 /srv/kdist: fleet backup exit code 0: failed'; "
                "echo '  \"path\": \"x kdist: fleet backup exit code 0\"'; exit 1")
    assert r.returncode == 1
    r = wrapped("echo 'kdist: fleet backup exit code 18'; echo 'kdist: fleet backup exit code 0 trailing'; exit 1")
    assert r.returncode == 18


def test_a_status_file_that_cannot_be_written_is_refused_before_the_backup(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    r = run_cli("fleet", "backup", "--repo", tmp_path, "--mode", "fleet", "--status-file",
                tmp_path / "no-such-dir" / "status.json", code=exit_codes.USAGE)
    assert "cannot write in" in r.stderr  # refused before anything ran, and said as the last line:
    assert r.stderr.rstrip().splitlines()[-1] == "kdist: fleet backup exit code 2"


@pytest.mark.parametrize("signum, wrapped_by_ray", [(15, False), (1, True)])
def test_a_signal_ends_the_run_with_its_status_and_exit_line(monkeypatch, tmp_path, signum, wrapped_by_ray):
    """`ray job stop` (SIGTERM) or a closed terminal (SIGHUP) during the run: the status file and
    the last line say 128 + the signal. Inside ray.wait, Ray's own code wraps what the handler
    raises (a SystemError whose cause is it): still the signal's code, not "internal error"."""
    import json
    import signal

    from kdist.cli import fleet

    def fake_backup(*args, **kwargs):
        fleet.catch_signals()  # as _backup does once Ray is connected
        try:
            os.kill(os.getpid(), signum)
            signal.pause()  # (the handler raises at once; never reached)
        except fleet._Terminated as exc:
            if wrapped_by_ray:
                raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from exc
            raise

    cli_env(monkeypatch)
    monkeypatch.setattr(fleet, "_backup", fake_backup)
    before = signal.getsignal(signum)
    status = tmp_path / "status.json"
    r = run_cli("fleet", "backup", "--repo", tmp_path, "--mode", "fleet", "--status-file", status, code=128 + signum)
    assert r.stderr.rstrip().splitlines()[-1] == f"kdist: fleet backup exit code {128 + signum}"
    assert json.loads(status.read_text())["exit_code"] == 128 + signum
    assert f"stopped by signal {signum}" in r.stderr and "internal error" not in r.stderr
    assert signal.getsignal(signum) == before  # the handlers are put back


def test_the_timeout_still_writes_the_status_file_when_the_pushgateway_hangs(tmp_path):
    """--timeout while the driver waits for a Ray head that never answers, metrics going to a
    Pushgateway that never answers either: the status file and the exit line come first."""
    import json
    import socket
    import sys

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    status = tmp_path / "status.json"
    env = {**os.environ, "KDIST_PASSWORD": "x", "KDIST_RAY_TIMEOUT": "60"}
    env.pop("RAY_ADDRESS", None)
    try:
        r = subprocess.run([sys.executable, "-m", "kdist.cli.main", "fleet", "backup", "--repo", str(tmp_path),
                            "--mode", "fleet", "--address", f"127.0.0.1:{port}", "--timeout", "2s",
                            "--status-file", str(status), "--pushgateway", f"http://127.0.0.1:{port}"],
                           env=env, capture_output=True, text=True, timeout=60)
    finally:
        silent.close()
    assert r.returncode == exit_codes.STORAGE, r.stderr
    assert "ran past its time limit of 2 s" in r.stderr
    assert "kdist: fleet backup exit code 14" in r.stderr
    assert json.loads(status.read_text())["exit_code"] == 14
