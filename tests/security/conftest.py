"""An S3 endpoint that enforces IAM (moto with authentication on), with kdist's policies applied."""

from __future__ import annotations

import json
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3_servers import running_moto

POLICIES = Path(__file__).resolve().parents[2] / "cluster" / "policies"
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}]}


def policy(name: str, bucket: str) -> str:
    """A policy of cluster/policies (what SECURITY.md tells operators to apply) for ``bucket``."""
    return (POLICIES / f"{name}.json").read_text().replace("BUCKET", bucket)


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


@pytest.fixture
def ticking_time(virtual_time):
    """``virtual_time``, with a monotonic clock that also ticks 0.1 ms at every reading (so that
    durations measured inside one virtual instant are not zero)."""
    from repo_format import clock

    ticks = [0.0]

    def monotonic():
        ticks[0] += 1e-4
        return virtual_time[0] + ticks[0]

    clock.set_monotonic(monotonic)
    return virtual_time


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """moto with IAM enforced: users ``admin`` (s3:*), ``host`` and ``maintenance`` (the policies
    of cluster/policies), each with its own access key, and one bucket."""
    import boto3

    fake = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    with running_moto(tmp_path_factory.mktemp("moto-iam"), iam=True) as url:
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
