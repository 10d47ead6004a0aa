"""S3 Object Lock: what maintenance keeps stays locked, what it collects comes free and goes.

The maintenance cycles run on a memory storage that behaves as a bucket with Object Lock, on the
virtual clock (retentions pass in seconds); the S3 parts (the bucket's default retention, HEAD
then version delete, retention puts, the IAM policy without s3:DeleteObject) run against moto.
Each rule has a mutation check: without it a test here fails.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from kdist_trees import build_tree, cli_env, run_cli, tree_state  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import BlobLocked, StorageError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.safety import SAFETY_FULL  # noqa: E402
from repo_format.storage import base as storage_base  # noqa: E402
from repo_format.storage.base import Retention  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402
from repo_format.storage.s3 import S3Storage  # noqa: E402
from repo_format.storage.wrappers import AppendOnlyStorage  # noqa: E402

from kdist.cli import exit_codes  # noqa: E402
from kdist.gc import object_lock  # noqa: E402
from kdist.gc import run as gc_run  # noqa: E402
from kdist.gc.clock_guard import StorageClock  # noqa: E402
from kdist.gc.run import MaintenanceOptions, maintenance_steps, run_maintenance  # noqa: E402
from kdist.restore import Restorer  # noqa: E402
from kdist.snapshot import list_snapshots  # noqa: E402
from kdist.tree import TreeWalker, reached_contents  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402

SAFETY = SAFETY_FULL.scaled(1 / 3600)  # pack age 24 s, drop margin 4 s, ...
LOCK = 200.0  # seconds: about three GC cycles
PARAMS = RepositoryParameters(pack_size=64 * 1024, metadata_pack_size=64 * 1024, chunk_avg=1024, chunk_min=256,
                              chunk_max=4096, extra={"safety": SAFETY.to_dict()})
CYCLE = 3 * SAFETY.pack_age + SAFETY.drop_margin
POLICIES = Path(__file__).resolve().parents[2] / "cluster" / "policies"


class LockedRepo:
    """A repository on a memory bucket with Object Lock: a snapshot forgotten, so that
    maintenance finds garbage, and one that must stay whole and locked; a score of small
    backups besides, so that manifest compaction has blobs to cover and delete."""

    def __init__(self, tmp_path, t):
        self.t, self.tmp = t, tmp_path
        self.storage = MemoryStorage(clock=lambda: t[0], retention=Retention("GOVERNANCE", LOCK))
        Repository.create(self.storage, "pw", PARAMS, KdfParams.weak_for_tests()).close()
        self.src = tmp_path / "src"
        self.src.mkdir()
        build_tree(str(self.src), big_size=150_000)
        first = self.backup()
        for p in self.src.rglob("*.bin"):
            p.write_bytes(secrets.token_bytes(150_000))  # the first snapshot's big file becomes garbage
        self.kept = self.backup()
        for _ in range(18):
            self.backup()  # unchanged: a manifest blob each
        repo = self.open()
        repo.manifests.delete([first.id])
        repo.close()
        self.reports: list[dict] = []
        self.garbage: list[tuple[float, set]] = []  # (when, what a run judged collectable)

    def open(self, append_only: bool = False) -> Repository:
        storage = AppendOnlyStorage(self.storage) if append_only else self.storage
        return Repository.open(storage, "pw", heartbeat_thread=False)

    def backup(self):
        repo = self.open(append_only=True)
        snap = Uploader(repo, BackupOptions()).backup(str(self.src))
        repo.close()
        self.t[0] += 10
        return snap

    def cycle(self) -> dict:
        self.t[0] += CYCLE
        repo = self.open()
        seen = {}

        def spy(storage, now, garbage):
            seen["garbage"] = set(garbage)
            return real_extend(storage, now, garbage)

        real_extend = gc_run.extend_locks
        gc_run.extend_locks = spy
        try:
            report = run_maintenance(repo, MaintenanceOptions(full=True))
        finally:
            gc_run.extend_locks = real_extend
        repo.close()
        self.reports.append(report.steps)
        self.garbage.append((self.t[0], seen["garbage"]))
        return report.steps

    def needed_packs(self) -> set[str]:
        """The packs holding what the kept snapshot reaches, as readers find them now."""
        repo = self.open()
        walker = TreeWalker.over(repo.objects)
        packs = {repo.contents.lookup(c).pack for c in reached_contents(walker, repo.objects, self.kept.root)}
        repo.close()
        return packs

    def assert_restores(self) -> None:
        repo = self.open()
        target = self.tmp / f"restore-{secrets.token_hex(4)}"
        Restorer(repo).restore(next(s for s in list_snapshots(repo.manifests) if s.id == self.kept.id), str(target))
        repo.close()
        assert tree_state(str(target)) == tree_state(str(self.src))


@pytest.fixture
def locked(tmp_path, ticking_time):
    return LockedRepo(tmp_path, ticking_time)


def lifecycle(r: LockedRepo, cycles: int = 7) -> None:
    """GC cycles over more than twice the lock. After each: every blob maintenance keeps (all
    but what the run judged collectable, session markers and probes) is locked for at least half
    the period, so longer than until the next run; no collectable blob was extended by the run
    that judged it so. By the end: every pack not needed is gone, and every other blob judged
    collectable more than a period (plus a cycle) before; the kept snapshot restores byte for
    byte; deletes were refused on the way and manifest compaction deleted covered blobs."""
    s = r.storage
    for _ in range(cycles):
        before = {m.name: s.locked_until(m.name) for m in s.list()}
        r.cycle()
        now, garbage = r.garbage[-1]
        kept = [m.name for m in s.list() if m.name not in garbage and not m.name.startswith(("s", "xt"))]
        unlocked = {n: s.locked_until(n) - now for n in kept if s.locked_until(n) < now + LOCK / 2}
        assert not unlocked, f"kept blobs unlocked too soon: {unlocked}"
        extended = [n for n in garbage if n in before and s.locked_until(n) > before[n]]
        assert not extended, f"collectable blobs extended: {extended}"
    packs = {m.name for p in C.PACK_PREFIXES for m in s.list(p)}
    assert packs == r.needed_packs(), "collectable packs are still there after their locks ended"
    end = r.t[0]
    stale = {n for when, g in r.garbage if when < end - LOCK - CYCLE for n in g
             if not n.startswith(C.PACK_PREFIXES) and s.exists(n)}
    assert not stale, f"collectable blobs still there after their locks ended: {stale}"
    assert any(st.get("blob_gc", {}).get("kept_locked") for st in r.reports), "no delete was ever refused"
    assert any(st.get("object_lock", {}).get("extended") for st in r.reports)
    assert any(st.get("manifests_merged") for st in r.reports), "manifest compaction never deleted a blob"
    r.assert_restores()


def test_maintenance_keeps_live_blobs_locked_and_collects_the_rest_once_free(locked):
    lifecycle(locked)


# ---- mutation checks: each rule switched off fails the lifecycle --------------------------
def _extend_garbage_too(monkeypatch):
    real = object_lock.plan_extensions
    monkeypatch.setattr(object_lock, "plan_extensions",
                        lambda listing, now, retention, garbage: real(listing, now, retention, set()))


def _never_extend(monkeypatch):
    monkeypatch.setattr(object_lock, "plan_extensions", lambda listing, now, retention, garbage: [])


def _locked_delete_fails_the_run(monkeypatch):
    def delete(self, name, written_at=None):
        self.storage.delete(name)  # asks, and lets the refusal through
        return True

    monkeypatch.setattr(object_lock.Deletions, "__call__", delete)


RULES = {"collectable blobs are never extended": (_extend_garbage_too, AssertionError, "collectable blobs extended"),
         "kept blobs are extended": (_never_extend, AssertionError, "kept blobs unlocked too soon"),
         "a locked delete is left for a later run": (_locked_delete_fails_the_run, BlobLocked, "is locked")}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_lock_rule_is_needed(locked, monkeypatch, rule):
    switch_off, error, message = RULES[rule]
    switch_off(monkeypatch)
    with pytest.raises(error, match=message):
        lifecycle(locked)


def test_a_removed_keys_slot_under_a_lock_goes_once_the_lock_ends(ticking_time, caplog):
    from kdist.keys import add_key, list_keys, remove_key
    from repo_format.keyslots import HOST, slot_name

    storage = MemoryStorage(clock=lambda: ticking_time[0], retention=Retention("GOVERNANCE", LOCK))
    admin = Repository.create(storage, "pw", PARAMS, KdfParams.weak_for_tests())
    key = add_key(admin, "host-pw", HOST, "web1", kdf=KdfParams.weak_for_tests()).slot
    ticking_time[0] += 1
    remove_key(admin, key)
    assert storage.exists(slot_name(key)) and "Object Lock keeps the slot" in caplog.text
    assert [k.state for k in list_keys(admin) if k.key_id == key] == ["removed"]
    admin.close()
    ticking_time[0] += LOCK / 2
    run_maintenance(Repository.open(storage, "pw", heartbeat_thread=False), MaintenanceOptions(full=True))
    assert storage.exists(slot_name(key)) and storage.locked_until(slot_name(key)) < ticking_time[0] + LOCK / 2
    ticking_time[0] += LOCK / 2 + 1  # not extended: its lock from its put ends
    run_maintenance(Repository.open(storage, "pw", heartbeat_thread=False), MaintenanceOptions(full=True))
    assert not storage.exists(slot_name(key))


def test_memory_lock_refuses_deletes_and_only_lengthens(virtual_time):
    s = MemoryStorage(clock=lambda: virtual_time[0], retention=Retention("COMPLIANCE", 100.0))
    s.put("blob", b"x")
    with pytest.raises(BlobLocked) as refused:
        s.delete("blob")
    assert refused.value.until == virtual_time[0] + 100.0 and s.get("blob") == b"x"
    assert not storage_base.delete_unless_locked(s, "blob")
    s.extend_retention("blob", virtual_time[0] + 300.0)
    s.extend_retention("blob", virtual_time[0] + 150.0)  # never shortens
    virtual_time[0] += 299.0
    assert not storage_base.delete_unless_locked(s, "blob")
    virtual_time[0] += 1.0
    assert not storage_base.delete_unless_locked(s, "blob")  # the instant it ends: still locked, as on S3
    virtual_time[0] += 0.5
    assert storage_base.delete_unless_locked(s, "blob") and not s.exists("blob")
    with pytest.raises(Exception, match="append-only"):
        AppendOnlyStorage(s).extend_retention("other", 0.0)  # a host cannot keep garbage locked


# ---- on S3 (moto) --------------------------------------------------------------------------
def _lock_bucket(endpoint: str, days: int | None = 1) -> str:
    import boto3

    bucket = f"kdist-lock-{uuid.uuid4().hex[:12]}"
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    c.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    if days:
        c.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": days}}})
    return bucket


def _versions(endpoint: str, bucket: str) -> tuple[list, list]:
    import boto3

    out = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_object_versions(Bucket=bucket)
    return out.get("Versions", []), out.get("DeleteMarkers", [])


def test_s3_delete_of_a_locked_blob_is_refused_and_a_free_one_goes_for_good(moto_server):
    import boto3

    bucket = _lock_bucket(moto_server)
    s = S3Storage(bucket, "r", endpoint_url=moto_server)
    assert s.retention() == Retention("GOVERNANCE", 86400.0)
    s.put("blob", b"x")
    put = s.stat("blob").timestamp
    with pytest.raises(BlobLocked) as refused:
        s.delete("blob")
    assert put + 86400 - 2 <= refused.value.until <= put + 86400 + 2
    assert s.get("blob") == b"x" and _versions(moto_server, bucket)[1] == []  # no delete marker either
    s.extend_retention("blob", put + 3 * 86400)
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    assert c.head_object(Bucket=bucket, Key="r/blob")["ObjectLockRetainUntilDate"].timestamp() >= put + 3 * 86400 - 1
    # the lock ends (the test, as the bucket's owner, bypasses governance): the delete removes the version
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    c.put_object_retention(Bucket=bucket, Key="r/blob", BypassGovernanceRetention=True,
                           Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past})
    s.delete("blob")
    assert not s.exists("blob") and _versions(moto_server, bucket) == ([], [])


def test_s3_without_object_lock_deletes_as_before(moto_server):
    import boto3

    bucket = f"kdist-plain-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    s = S3Storage(bucket, "", endpoint_url=moto_server)
    assert s.retention() is None
    s.put("blob", b"x")
    s.delete("blob")
    assert not s.exists("blob")
    with pytest.raises(StorageError, match="has no Object Lock"):
        s.configure_retention(7, "GOVERNANCE")


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


def test_repo_create_sets_the_buckets_default_retention(moto_server, env, tmp_path):
    import boto3

    bucket = _lock_bucket(moto_server, days=None)
    repo = ["--repo", f"s3://{bucket}/r", "--endpoint-url", moto_server]
    out = run_cli("repo", "create", *repo, "--object-lock-days", "3", "--object-lock-mode", "compliance").stdout
    assert "every 1.5 days" in out
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    rule = c.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]
    assert (rule["Mode"], rule["Days"]) == ("COMPLIANCE", 3)
    head = c.head_object(Bucket=bucket, Key="r/kdist.repository")  # the first blob is locked already
    assert head["ObjectLockMode"] == "COMPLIANCE"
    status = json.loads(run_cli("repo", "status", *repo, "--json").stdout)
    assert status["object_lock"] == {"days": 3, "mode": "COMPLIANCE"}
    # another repository in that bucket must agree with its lock, or be refused before it writes
    other = ["--repo", f"s3://{bucket}/other", "--endpoint-url", moto_server]
    err = run_cli("repo", "create", *other, "--object-lock-days", "5", code=exit_codes.STORAGE).output
    assert "already locks every object for 3 days" in err
    assert not S3Storage(bucket, "other", endpoint_url=moto_server).exists("kdist.repository")


def test_repo_create_with_object_lock_refuses_what_cannot_lock(moto_server, env, tmp_path):
    import boto3

    plain = f"kdist-plain-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=plain)
    err = run_cli("repo", "create", "--repo", f"s3://{plain}/r", "--endpoint-url", moto_server,
                  "--object-lock-days", "7", code=exit_codes.STORAGE).output
    assert "has no Object Lock" in err and "--object-lock-enabled-for-bucket" in err
    assert not S3Storage(plain, "r", endpoint_url=moto_server).exists("kdist.repository")
    # an existing repository: refused before the bucket's retention changes under it
    unlocked = _lock_bucket(moto_server, days=None)
    existing = ["--repo", f"s3://{unlocked}/r", "--endpoint-url", moto_server]
    run_cli("repo", "create", *existing)
    run_cli("repo", "create", *existing, "--object-lock-days", "7", code=exit_codes.REPO_EXISTS)
    assert S3Storage(unlocked, "r", endpoint_url=moto_server).retention() is None
    err = run_cli("repo", "create", "--repo", tmp_path / "fs", "--object-lock-days", "7",
                  code=exit_codes.STORAGE).output
    assert "has no Object Lock" in err
    assert not (tmp_path / "fs" / "_kdist.repository").exists()


class _ShiftedClock(StorageClock):
    """The storage's clock, ``shift`` seconds on: maintenance judges ages as it will then."""

    def __init__(self, storage, session, max_pause, shift):
        self.shift = shift
        super().__init__(storage, session, max_pause)

    def now(self) -> float:
        return super().now() + self.shift


def test_on_s3_maintenance_extends_what_it_keeps_and_never_deletes_a_locked_blob(moto_server, env, tmp_path):
    """On a bucket with a 1-day lock: the extension puts a day's retention from ``now`` on every
    blob older than half a day except the collectable and the short-lived; a full maintenance
    run as it would run 18 hours on extends, and each delete it plans (its probes' at least) is
    left with the version in place and no delete marker."""
    import boto3

    bucket = _lock_bucket(moto_server)
    repo_args = ["--repo", f"s3://{bucket}/r", "--endpoint-url", moto_server]
    run_cli("repo", "create", *repo_args, "--gc-margin-scale", "0.0001")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(secrets.token_bytes(200_000))
    run_cli("snapshot", "create", *repo_args, src)
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")

    def retain():
        return {o["Key"][2:]: c.head_object(Bucket=bucket, Key=o["Key"])["ObjectLockRetainUntilDate"].timestamp()
                for o in c.list_objects_v2(Bucket=bucket, Prefix="r/")["Contents"]}

    before = retain()
    storage = S3Storage(bucket, "r", endpoint_url=moto_server)
    collectable = next(n for n in before if n.startswith(C.DATA_PACK_PREFIX))
    now = max(storage.stat(n).timestamp for n in before) + 0.75 * 86400
    done = object_lock.extend_locks(storage, now, {collectable})
    after = retain()
    assert done["extended"] == len([n for n in before if n != collectable and not n.startswith(("s", "xt"))]) > 3
    for name, until in after.items():
        if name == collectable or name.startswith(C.SESSION_PREFIX):
            assert until == before[name], name
        else:
            assert abs(until - (now + 86400)) <= 1, name

    repo = Repository.open(storage, os.environ["KDIST_PASSWORD"], heartbeat_thread=False)
    clock_ = _ShiftedClock(storage, repo.session, SAFETY_FULL.max_pause, 0.75 * 86400)
    steps = maintenance_steps(repo, MaintenanceOptions(full=True), clock=clock_)
    try:
        while True:
            next(steps)
    except StopIteration as finished:
        report = finished.value
    repo.close()
    assert report.steps["object_lock"]["extended"] > 0
    versions, markers = _versions(moto_server, bucket)
    assert not markers and {v["Key"][2:] for v in versions} >= set(before)  # nothing deleted: all locked
    assert len([v for v in versions if v["Key"].startswith("r/xt")]) >= 2  # each clock probe stays, locked


def test_maintenance_under_the_object_lock_policy(tmp_path_factory, tmp_path, monkeypatch):
    """On an IAM-enforcing S3, the maintenance policy for Object Lock buckets (no s3:DeleteObject,
    so no delete marker can hide a blob) is enough for full maintenance runs; its deletes of
    locked blobs are left for later; a version delete of a locked blob is refused by S3 itself."""
    import boto3
    import urllib.request
    from botocore.exceptions import ClientError

    from s3_servers import running_moto

    cli_env(monkeypatch)
    fake = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    with running_moto(tmp_path_factory.mktemp("moto-lock-iam"), iam=True) as url:
        bucket = _lock_bucket(url)
        iam = boto3.client("iam", endpoint_url=url, **fake)
        doc = json.loads((POLICIES / "maintenance-object-lock-policy.json").read_text().replace("BUCKET", bucket))
        keys = {}
        for user in ("maint",):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="kdist", PolicyDocument=json.dumps(doc))
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        repo = ["--repo", f"s3://{bucket}/r", "--endpoint-url", url]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        run_cli("repo", "create", *repo, "--gc-margin-scale", "0.0001", "--object-lock-days", "1")
        src = tmp_path / "src"
        src.mkdir()
        build_tree(str(src), big_size=20_000)
        run_cli("snapshot", "create", *repo, src)
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10).close()
        from repo_format.storage import s3

        key = keys["maint"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setattr(s3, "_session", None)
        for _ in range(2):
            out = json.loads(run_cli("maintenance", "run", *repo, "--json").stdout)
            assert out["steps"]["object_lock"]["mode"] == "GOVERNANCE"  # it could read the bucket's lock
        c = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                         aws_secret_access_key=key["SecretAccessKey"])
        probes = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="r/xt").get("Contents", [])]
        assert len(probes) >= 2, "each run's clock probe stays, locked, until a later run can delete it"
        version = c.head_object(Bucket=bucket, Key=probes[0])["VersionId"]
        with pytest.raises(ClientError, match="AccessDenied"):  # S3 itself refuses: the version is locked
            c.delete_object(Bucket=bucket, Key=probes[0], VersionId=version)
        with pytest.raises(ClientError, match="AccessDenied"):  # the policy: no delete marker may hide a blob
            c.delete_object(Bucket=bucket, Key=probes[0])
        monkeypatch.setattr(s3, "_session", None)
        run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst")
        assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))


def test_s3_lock_check_is_needed(moto_server, monkeypatch):
    """The mutation: S3Storage deletes without reading the retention first; S3 refuses the
    version delete and the run would fail instead of leaving the blob for later."""
    bucket = _lock_bucket(moto_server)
    s = S3Storage(bucket, "r", endpoint_url=moto_server)
    s.put("blob", b"x")
    monkeypatch.setattr(S3Storage, "_server_time", lambda self, response: float("inf"))
    with pytest.raises(StorageError) as failed:
        storage_base.delete_unless_locked(s, "blob")
    assert not isinstance(failed.value, BlobLocked)


def test_s3_delete_removes_every_version_of_a_name(moto_server):
    """A put that landed twice (a retried put) leaves two versions: the delete removes both,
    so the blob is gone when it returns, and refuses while any version is locked."""
    import boto3

    bucket = _lock_bucket(moto_server)
    s = S3Storage(bucket, "r", endpoint_url=moto_server)
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s.put("twice", b"x")
    s.put("twice", b"x")
    assert len(_versions(moto_server, bucket)[0]) == 2
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    for v in _versions(moto_server, bucket)[0]:
        c.put_object_retention(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"], BypassGovernanceRetention=True,
                               Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past})
    s.delete("twice")
    assert not s.exists("twice") and _versions(moto_server, bucket) == ([], [])
    s.put("kept", b"old")  # locked
    s.put("kept", b"new")  # a second version, freed below
    (current,) = [v for v in _versions(moto_server, bucket)[0] if v["IsLatest"]]
    c.put_object_retention(Bucket=bucket, Key=current["Key"], VersionId=current["VersionId"],
                           BypassGovernanceRetention=True, Retention={"Mode": "GOVERNANCE", "RetainUntilDate": past})
    with pytest.raises(BlobLocked):
        s.delete("kept")  # the newest went; the older one is locked, and says so
    assert s.get("kept") == b"old"


def test_a_put_refused_for_want_of_a_checksum_is_sent_again_with_one(moto_server, monkeypatch):
    """AWS answers InvalidRequest (moto a code of its own) when a put into a bucket with Object
    Lock has no checksum, which botocore adds only for AWS's own endpoints: the put is sent again
    with a CRC32, and so is every later one. Another InvalidRequest is an error, not a retry."""
    from repo_format.storage import s3

    s = S3Storage(_lock_bucket(moto_server), "r", endpoint_url=moto_server)
    sent = []
    real = S3Storage._upload_once

    def upload_once(self, name, key, data, conditions, accept):
        sent.append(dict(self._checksum))
        if not self._checksum:
            raise s3._Refused("InvalidRequest", "Content-MD5 OR x-amz-checksum- HTTP header is required for "
                                                "Put Object requests with Object Lock parameters")
        return real(self, name, key, data, conditions, accept)

    monkeypatch.setattr(S3Storage, "_upload_once", upload_once)
    s.put("a", b"x")
    s.put("b", b"y")
    assert sent == [{}, {"ChecksumAlgorithm": "CRC32"}, {"ChecksumAlgorithm": "CRC32"}] and s.get("a") == b"x"
    other = S3Storage(_lock_bucket(moto_server), "r", endpoint_url=moto_server)
    monkeypatch.setattr(S3Storage, "_upload_once", lambda *a: (_ for _ in ()).throw(
        s3._Refused("InvalidRequest", "Invalid storage class")))
    with pytest.raises(StorageError, match="Invalid storage class"):
        other.put("c", b"z")


def test_maintenance_refuses_a_copy_in_a_bucket_without_the_lock(moto_server, env, tmp_path):
    """The repository asks for Object Lock (it was created with it) and its bucket has none (a
    copy moved elsewhere; or credentials that may not read the configuration): deletes would be
    plain DELETEs, delete markers over locked data. Maintenance refuses before its first request
    that writes, saying why."""
    import boto3

    bucket = _lock_bucket(moto_server, days=None)
    run_cli("repo", "create", "--repo", f"s3://{bucket}/r", "--endpoint-url", moto_server, "--object-lock-days", "1")
    c = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    plain = f"kdist-plain-{uuid.uuid4().hex[:12]}"
    c.create_bucket(Bucket=plain)
    for o in c.list_objects_v2(Bucket=bucket)["Contents"]:
        c.copy_object(Bucket=plain, Key=o["Key"], CopySource={"Bucket": bucket, "Key": o["Key"]})
    before = {o["Key"] for o in c.list_objects_v2(Bucket=plain)["Contents"]}
    err = run_cli("maintenance", "run", "--repo", f"s3://{plain}/r", "--endpoint-url", moto_server,
                  code=exit_codes.STORAGE).output
    assert "created with Object Lock, but its bucket has no default retention" in err
    assert {o["Key"] for o in c.list_objects_v2(Bucket=plain)["Contents"]} == before  # not even a clock probe


def test_deletions_skip_what_is_known_to_be_locked_without_asking(virtual_time):
    """A blob put less than a retention ago is locked: not asked about. One whose lock was
    extended (while maintenance kept it) is asked once; its refusal goes into the run's record,
    and the next run, knowing it, does not ask again until that time. Session markers and
    probes never go into the record (their put time says all)."""
    s = MemoryStorage(clock=lambda: virtual_time[0], retention=Retention("GOVERNANCE", 100.0))
    asked = []
    real = s.delete
    s.delete = lambda name: (asked.append(name), real(name))[1]
    s.put("fresh", b"x")
    s.put("extended", b"x")
    s.put("s" + "ab" * 8 + "-bextended", b"x")
    for name in ("extended", "s" + "ab" * 8 + "-bextended"):
        s.extend_retention(name, virtual_time[0] + 500.0)
    virtual_time[0] += 150.0  # past every put's own lock
    s.put("young", b"x")
    put_at = {m.name: m.timestamp for m in s.list()}
    first = object_lock.Deletions(s, virtual_time[0])
    assert not first("young", put_at["young"]) and asked == []  # its put says it is locked
    assert first("fresh", put_at["fresh"]) and asked == ["fresh"]
    assert not first("extended", put_at["extended"]) and asked[-1] == "extended"
    assert not first("s" + "ab" * 8 + "-bextended", put_at["s" + "ab" * 8 + "-bextended"])
    assert first.record() == [["extended", virtual_time[0] + 350.0]]
    from kdist.gc import history

    known = history.known_locks([history.RunRecord(start=0.0, end=1.0, locked=first.record())], virtual_time[0])
    asked.clear()
    virtual_time[0] += 100.0
    second = object_lock.Deletions(s, virtual_time[0], known)
    assert not second("extended", put_at["extended"]) and asked == []  # known: not asked again
    virtual_time[0] += 300.0
    third = object_lock.Deletions(s, virtual_time[0], history.known_locks(
        [history.RunRecord(start=0.0, end=1.0, locked=first.record())], virtual_time[0]))
    assert third("extended", put_at["extended"]) and asked == ["extended"] and not s.exists("extended")


def test_a_malformed_signed_marker_is_no_marker_and_stops_no_reader(ticking_time):
    """A host's marker of any shape (wrong types, a list where bytes belong, not msgpack, too
    big) is ignored by every reader, and `repo check` names it."""
    from kdist.check import check_repository

    storage = MemoryStorage(clock=lambda: ticking_time[0])
    repo = Repository.create(storage, "pw", PARAMS, KdfParams.weak_for_tests())
    import msgpack

    bodies = [msgpack.packb({"k": "x", "s": b"", "c": b"", "cs": []}), msgpack.packb({"k": ["root"], "s": b"s"}),
              msgpack.packb([1, 2]), b"\xc1not msgpack", msgpack.packb({"k": "root", "s": b"x" * 64}),
              msgpack.packb({"k": "abcd1234", "s": b"s", "c": {"a": 1}, "cs": b""}), os.urandom(2000)]
    names = [f"{C.EPOCH_MARKER_PREFIX}{7 + i}_{secrets.token_hex(8)}" for i in range(len(bodies))]
    for name, body in zip(names, bodies):
        storage.put(name, body)
    for _ in range(2):  # and again, from what this reader remembers
        assert repo.contents.epochs.refresh().current == 0
    problems = [p.message for p in check_repository(storage, repo.format).problems if p.kind == "forgery"]
    assert all(any(n in p for p in problems) for n in names), problems
