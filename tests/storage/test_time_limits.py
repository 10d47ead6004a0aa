"""Time limits: a storage request waits at most ``--request-timeout`` for answers over all its
attempts, a command runs at most ``--timeout``; both end with exit 14 and say why. Tried against
a local socket that accepts connections and never answers (the hung S3 endpoint of the 3 a.m.
report: 60 s read timeout x 2 botocore attempts x 5 retries, minutes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from kdist.cli import exit_codes
from kdist_trees import PASSWORD
from repo_format.errors import RetryableStorageError, StorageUnreachable
from repo_format.storage import MemoryStorage
from repo_format.storage.wrappers import RetryingStorage


class _Flaky(MemoryStorage):
    """Fails ``failures`` gets, each taking ``took`` seconds of fake time, of which ``stalled``
    waiting for an answer that never came (0: the connection dropped while data moved)."""

    def __init__(self, now: list, failures: int, took: float, stalled: float):
        super().__init__()
        self.now, self.failures, self.took, self.stalled = now, failures, took, stalled
        self.calls = 0

    def get(self, name, offset=0, length=-1):
        self.calls += 1
        if self.calls <= self.failures:
            self.now[0] += self.took
            raise RetryableStorageError("no answer" if self.stalled else "connection reset", stalled=self.stalled)
        return super().get(name, offset, length)


def _retrying(inner, now, deadline):
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    return RetryingStorage(inner, attempts=5, base_delay=1.0, max_delay=4.0, sleep=sleep, deadline=deadline), slept


def test_attempts_that_time_out_use_up_the_deadline():
    now = [0.0]
    inner = _Flaky(now, failures=4, took=20.0, stalled=20.0)
    inner.put("b", b"x")
    storage, slept = _retrying(inner, now, deadline=30.0)
    with pytest.raises(StorageUnreachable, match="a storage request may wait 30 s, --request-timeout"):
        storage.get("b")
    assert inner.calls == 2  # 20 s, a wait, 20 s more pass 30 s: no third attempt
    assert now[0] <= 30.0 + 20.0


def test_attempts_that_fail_after_moving_data_are_retried_whatever_they_took():
    """A slow link's upload that broke after minutes is not a stall: only the attempt count
    bounds it, so it is still retried (and succeeds)."""
    now = [0.0]
    inner = _Flaky(now, failures=4, took=300.0, stalled=0.0)
    inner.put("b", b"x")
    storage, slept = _retrying(inner, now, deadline=30.0)
    assert storage.get("b") == b"x" and inner.calls == 5 and len(slept) == 4


def test_a_slow_upload_that_then_timed_out_is_charged_its_timeout_not_its_upload():
    """300 s sending a pack, then 10 s of read timeouts: charged 10 s, so it is tried again."""
    now = [0.0]
    inner = _Flaky(now, failures=2, took=310.0, stalled=10.0)
    inner.put("b", b"x")
    storage, _ = _retrying(inner, now, deadline=30.0)
    assert storage.get("b") == b"x" and inner.calls == 3


def test_no_deadline_keeps_the_attempt_count():
    now = [0.0]
    inner = _Flaky(now, failures=9, took=100.0, stalled=100.0)
    inner.put("b", b"x")
    storage, _ = _retrying(inner, now, deadline=None)
    with pytest.raises(RetryableStorageError):
        storage.get("b")
    assert inner.calls == 5


@pytest.fixture
def silent_endpoint():
    """A TCP port that accepts connections (the kernel's backlog) and never reads or answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _kdist(*args, env_extra=None, timeout=120):
    env = {**os.environ, "KDIST_PASSWORD": PASSWORD, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kdist.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_hung_endpoint_is_exit_14_within_the_request_timeout(silent_endpoint):
    r = _kdist("snapshot", "list", "--repo", "s3://bucket/repo", "--endpoint-url", silent_endpoint,
               "--request-timeout", "4s")
    assert r.returncode == exit_codes.STORAGE, r.stderr
    # read timeouts of a quarter of it per try, two tries an attempt: two attempts use it up
    assert "Read timeout" in r.stderr and "gave up after 2 attempt(s)" in r.stderr
    assert "a storage request may wait 4 s, --request-timeout" in r.stderr

    r = _kdist("snapshot", "list", "--repo", "s3://bucket/repo", "--endpoint-url", silent_endpoint,
               env_extra={"KDIST_REQUEST_TIMEOUT": "4s"})
    assert r.returncode == exit_codes.STORAGE and "a storage request may wait 4 s" in r.stderr


def test_the_command_timeout_stops_whatever_it_is_doing(silent_endpoint):
    r = _kdist("snapshot", "list", "--repo", "s3://bucket/repo", "--endpoint-url", silent_endpoint,
               "--request-timeout", "10m", "--timeout", "3s")
    assert r.returncode == exit_codes.STORAGE, r.stderr
    assert "ran past its time limit of 3 s (--timeout or KDIST_TIMEOUT)" in r.stderr
    assert "Traceback" not in r.stderr

    r = _kdist("snapshot", "list", "--repo", "s3://bucket/repo", "--timeout", "soon", env_extra={})
    assert r.returncode == exit_codes.USAGE and "not a duration" in r.stderr


def test_a_multi_process_backup_forks_beside_the_timeout_watchdog(tmp_path):
    """The watchdog thread holds nothing a child could need: ``--timeout`` does not stop
    ``--processes`` from forking (it once made such a backup fail with a traceback)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(2000))
    weak = {"KDIST_ALLOW_WEAK_KDF_FOR_TESTS": "1"}
    r = _kdist("repo", "create", "--repo", str(tmp_path / "repo"), env_extra=weak)
    assert r.returncode == 0, r.stderr
    r = _kdist("snapshot", "create", "--repo", str(tmp_path / "repo"), str(src), "--processes", "2",
               "--timeout", "1h", "--json", env_extra=weak)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and '"files": 50' in r.stdout
