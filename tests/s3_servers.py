"""moto's S3 server in a subprocess, for the fixtures of every test directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

MOTO_START_TIMEOUT = 30.0


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


# moto 5.2's IAM check re-signs a request from its decoded query string, so every listing with
# Delimiter="/" (all of kdist's) fails with SignatureDoesNotMatch. With ``iam=True`` the server
# skips only that comparison: access keys are still looked up, and every action is still
# authorised against the policies of the key's user.
_MOTO_WITH_IAM = (
    "import sys; from moto.iam import access_control as a; "
    "a.IAMRequestBase.check_signature = lambda self: None; "
    "from moto.server import main; sys.exit(main(sys.argv[1:]))"
)


@contextlib.contextmanager
def running_moto(log_dir, extra_env: dict | None = None, iam: bool = False):
    """A moto server in a subprocess on a free loopback port; yields its URL."""
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(str(log_dir), "server.log")
    with open(log_path, "wb") as log:
        launch = ["-c", _MOTO_WITH_IAM] if iam else ["-m", "moto.server"]
        proc = subprocess.Popen([sys.executable, *launch, "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})})
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


# ---- moto with IAM enforced, under kdist's policies (tests/conftest.py's iam_s3) ----------------
POLICIES = Path(__file__).resolve().parents[1] / "cluster" / "policies"
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}]}


IAM_PREFIXES = ("fleet", "ray")  # the repositories the IAM-enforced tests create in the bucket


def policy(name: str, bucket: str, prefixes: tuple[str, ...] = IAM_PREFIXES) -> str:
    """A policy of cluster/policies (what SECURITY.md tells operators to apply) for ``bucket``;
    a resource naming the repository's ``PREFIX`` is repeated for each of ``prefixes``."""
    doc = json.loads((POLICIES / f"{name}.json").read_text().replace("BUCKET", bucket))
    for statement in doc["Statement"]:
        resources = statement.get("Resource")
        if resources is None:
            continue
        listed = resources if isinstance(resources, list) else [resources]
        expanded = [r.replace("PREFIX", p) for r in listed for p in (prefixes if "PREFIX" in r else ("",))]
        statement["Resource"] = expanded if isinstance(resources, list) or len(expanded) > 1 else expanded[0]
    return json.dumps(doc)


@dataclass
class IamS3:
    endpoint: str
    bucket: str
    credentials: dict  # role -> {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}

    def client(self, role: str):
        import boto3

        c = self.credentials[role]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=c["AWS_ACCESS_KEY_ID"], aws_secret_access_key=c["AWS_SECRET_ACCESS_KEY"])

    def env(self, monkeypatch, role: str) -> None:
        """Run the next in-process kdist commands as ``role``."""
        from repo_format.storage import s3

        for k, v in self.credentials[role].items():
            monkeypatch.setenv(k, v)
        # kdist shares one boto3 session per process, which keeps the credentials it found first
        monkeypatch.setattr(s3, "_session", None)


@contextlib.contextmanager
def iam_moto(log_dir):
    """moto with IAM enforced: users ``admin`` (s3:*), ``host`` and ``maintenance`` (the policies
    of cluster/policies), each with its own access key, and one bucket."""
    import boto3

    fake = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    with running_moto(log_dir, iam=True) as url:
        bucket = f"kdist-iam-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=url, **fake).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", endpoint_url=url, **fake)
        credentials = {}
        for role, doc in (("admin", json.dumps(ADMIN_POLICY)), ("host", policy("host-policy", bucket)),
                          ("maintenance", policy("maintenance-policy", bucket))):
            iam.create_user(UserName=f"kdist-{role}")
            iam.put_user_policy(UserName=f"kdist-{role}", PolicyName="kdist", PolicyDocument=doc)
            key = iam.create_access_key(UserName=f"kdist-{role}")["AccessKey"]
            credentials[role] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                                 "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        # from now on every request is authenticated and authorised
        req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).close()
        yield IamS3(url, bucket, credentials)
