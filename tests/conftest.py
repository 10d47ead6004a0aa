"""Fixtures shared by every test directory: an S3 endpoint (moto's server in a subprocess)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

import pytest

from s3_servers import running_moto

# Every kdist this suite runs (in-process, subprocesses, Ray workers) keeps its local caches in a
# directory of the test run, never in the user's ~/.cache; tests about the cache set their own.
_CACHE_ROOT = tempfile.mkdtemp(prefix="kdist-test-caches-")
os.environ["KDIST_CACHE_DIR"] = _CACHE_ROOT
os.environ.pop("KDIST_TIMEOUT", None)  # in-process commands would arm a watchdog that exits the test run
atexit.register(shutil.rmtree, _CACHE_ROOT, True)

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def _no_request_timeout_left_behind():
    """``--request-timeout``, ``--limit-upload`` and ``--limit-download`` set process-wide values
    when parsed: an in-process CLI test must not hand them to the tests after it."""
    yield
    from kdist import access

    access.reset_process_settings()


@pytest.fixture
def virtual_time():
    """``t``: a one-item list holding the time (storage and library clocks read ``t[0]``)."""
    from repo_format import clock

    t = [1_800_000_000.0]
    clock.set_clock(lambda: t[0])
    clock.set_monotonic(lambda: t[0])
    yield t
    clock.set_clock(None)
    clock.set_monotonic(None)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """An S3 endpoint URL served by a moto subprocess, with fake credentials in the environment."""
    env = pytest.MonkeyPatch()
    for key, value in FAKE_AWS_ENV.items():
        env.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):  # never let tests pick up a real identity
        env.delenv(key, raising=False)
    try:
        with running_moto(tmp_path_factory.mktemp("moto")) as url:
            yield url
    finally:
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


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """moto with IAM enforced: users ``admin`` (s3:*), ``host`` and ``maintenance`` (the policies
    of cluster/policies), each with its own access key, and one bucket (``s3_servers.IamS3``)."""
    from s3_servers import iam_moto

    with iam_moto(tmp_path_factory.mktemp("moto-iam")) as s3:
        yield s3
