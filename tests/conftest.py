"""Fixtures shared by every test directory: an S3 endpoint (moto's server in a subprocess)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

# Every kdist this suite runs (in-process, subprocesses, Ray workers) keeps its local caches in a
# directory of the test run, never in the user's ~/.cache; tests about the cache set their own.
_CACHE_ROOT = tempfile.mkdtemp(prefix="kdist-test-caches-")
os.environ["KDIST_CACHE_DIR"] = _CACHE_ROOT
atexit.register(shutil.rmtree, _CACHE_ROOT, True)

MOTO_START_TIMEOUT = 30.0
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answering(url: str, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; log: {_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # any HTTP answer means it is up
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {url} did not answer within {MOTO_START_TIMEOUT:.0f} s; log: {_tail(log_path)}")


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-2000:]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """An S3 endpoint URL served by a moto subprocess, with fake credentials in the environment."""
    env = pytest.MonkeyPatch()
    for key, value in FAKE_AWS_ENV.items():
        env.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):  # never let tests pick up a real identity
        env.delenv(key, raising=False)
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path_factory.mktemp("moto") / "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_until_answering(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        env.undo()


@pytest.fixture(scope="session")
def moto_client(moto_server):
    """A plain boto3 S3 client on the moto server, for setting up and inspecting buckets."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server)
    yield client
    client.close()


@pytest.fixture
def s3_bucket(moto_server, moto_client):
    """A fresh, empty bucket on the moto server: ``(endpoint_url, bucket)``."""
    bucket = f"kdist-test-{uuid.uuid4().hex[:16]}"
    moto_client.create_bucket(Bucket=bucket)
    return moto_server, bucket
