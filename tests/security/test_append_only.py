"""Writers only add blobs: the append-only storage, session markers that are never replaced or
deleted, and a backup under a host's IAM policy (no s3:DeleteObject) on an IAM-enforcing S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdist.cli import exit_codes
from kdist_trees import build_tree, cli_env, run_cli, tree_state
from repo_format import constants as C
from repo_format.errors import AppendOnlyViolation
from repo_format.session import SessionMarker, live_sessions, marker_session, unended_sessions
from repo_format.storage import open_storage
from repo_format.storage.memory import MemoryStorage
from repo_format.storage.wrappers import AppendOnlyStorage, append_only


def test_append_only_storage_adds_and_refuses_everything_else():
    inner = MemoryStorage()
    s = AppendOnlyStorage(inner)
    s.put("a", b"one")
    assert s.put_if_absent("b", b"two") and not s.put_if_absent("b", b"other")
    with pytest.raises(AppendOnlyViolation, match="may only add"):
        s.put("a", b"replaced")
    with pytest.raises(AppendOnlyViolation):
        s.delete("a")
    with pytest.raises(AppendOnlyViolation):
        s.reclaim_leftovers(0.0, 0.0)
    assert inner.get("a") == b"one" and inner.get("b") == b"two"  # nothing was replaced or removed
    assert append_only(s) is s and isinstance(append_only(inner), AppendOnlyStorage)
    assert exit_codes.exit_code_for(AppendOnlyViolation("x")) == exit_codes.STORAGE


def test_session_markers_are_added_never_replaced_and_end_with_an_end_blob():
    from repo_format.crypto import Aead

    storage = AppendOnlyStorage(MemoryStorage())
    aead = Aead(C.AEAD_AES_256_GCM, b"k" * 32)
    marker = SessionMarker(storage, aead, "ab" * 8, heartbeat=0.0, expiry=3600.0, auto=False)
    marker.start()
    marker.refresh()
    marker.refresh()
    names = sorted(m.name for m in storage.list(C.SESSION_PREFIX))
    assert len(names) == 3 and {marker_session(n)[:2] for n in names} == {("ab" * 8, "b")}
    now = max(m.timestamp for m in storage.list(C.SESSION_PREFIX))
    assert live_sessions(list(storage.list(C.SESSION_PREFIX)), now, 3600.0) == {"ab" * 8}
    assert not live_sessions(list(storage.list(C.SESSION_PREFIX)), now + 3600.0, 3600.0)  # every beat expired
    marker.stop()
    assert {marker_session(m.name)[1] for m in storage.list(C.SESSION_PREFIX)} == {"b", "e"}
    assert not live_sessions(list(storage.list(C.SESSION_PREFIX)), now, 3600.0)  # ended: not live however fresh
    assert not unended_sessions(storage)
    marker.stop()  # a second stop adds nothing (and is no replacement of the end blob)
    assert len(list(storage.list(C.SESSION_PREFIX))) == 4
    with pytest.raises(Exception, match="has ended"):
        marker.start()


def test_no_one_else_can_end_a_session_or_take_its_next_markers_name():
    """A hostile host sees every marker name: an end blob it makes up does not end the session
    (the secret's hash must be the heartbeats' commitment), and it cannot guess the name of the
    session's next heartbeat to put it first (create-only puts would then fail)."""
    from repo_format.crypto import Aead

    storage = MemoryStorage()
    marker = SessionMarker(storage, Aead(C.AEAD_AES_256_GCM, b"k" * 32), "cd" * 8, heartbeat=0.0, expiry=3600.0,
                           auto=False)
    marker.start()
    first = next(m.name for m in storage.list(C.SESSION_PREFIX))
    commitment = marker_session(first)[2]
    for forged in ("end", "e" + "0" * 32, "e" + commitment, "e"):
        storage.put(f"s{'cd' * 8}-{forged}", b"")
    now = max(m.timestamp for m in storage.list(C.SESSION_PREFIX))
    assert live_sessions(list(storage.list(C.SESSION_PREFIX)), now, 3600.0) == {"cd" * 8}
    marker.refresh()
    names = [m.name for m in storage.list(C.SESSION_PREFIX) if marker_session(m.name)[1] == "b"]
    assert len(names) == 2 and names[0][:-16] != names[1][:-16]  # a random part in every beat
    marker.stop()
    assert not live_sessions(list(storage.list(C.SESSION_PREFIX)), now, 3600.0)


def test_the_commitment_is_what_keeps_a_forged_end_out(monkeypatch):
    from repo_format import session

    monkeypatch.setattr(session, "_commitment", lambda secret: "0" * session.COMMIT_HEX)  # the mutation
    with pytest.raises(AssertionError):
        test_no_one_else_can_end_a_session_or_take_its_next_markers_name()


def test_markers_of_older_kdist_still_count_as_heartbeats():
    storage = MemoryStorage()
    storage.put(C.SESSION_PREFIX + "cd" * 8, b"")
    now = storage.stat(C.SESSION_PREFIX + "cd" * 8).timestamp
    assert live_sessions(list(storage.list(C.SESSION_PREFIX)), now, 60.0) == {"cd" * 8}


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


def test_a_host_without_delete_rights_backs_up_and_maintenance_collects(iam_s3, env, monkeypatch, tmp_path):
    """On an S3 that enforces IAM, the host policy of cluster/policies (no s3:DeleteObject, no
    retention changes) is enough for backups; the host's credentials cannot delete a blob; the
    maintenance policy is enough for maintenance; what was backed up restores byte for byte."""
    from botocore.exceptions import ClientError

    repo = ["--repo", f"s3://{iam_s3.bucket}/fleet", "--endpoint-url", iam_s3.endpoint]
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    iam_s3.env(monkeypatch, "admin")
    run_cli("repo", "create", *repo)

    iam_s3.env(monkeypatch, "host")
    out = json.loads(run_cli("snapshot", "create", *repo, src, "--json").stdout)
    assert out[0]["totals"]["errors"] == 0 and out[0]["requests"]["DELETE"]["calls"] == 0
    # a multi-process backup forks before any thread starts: in a process of its own
    (src / "changed").write_bytes(os.urandom(50_000))
    p = subprocess.run([sys.executable, "-m", "kdist.cli.main", "snapshot", "create", *map(str, repo), str(src),
                        "--json", "--processes", "2"], env=dict(os.environ), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out[0]["totals"]["errors"] == 0 and out[0]["requests"]["DELETE"]["calls"] == 0
    host = iam_s3.client("host")
    listed = host.list_objects_v2(Bucket=iam_s3.bucket, Prefix="fleet/")["Contents"]
    victim = next(o["Key"] for o in listed if o["Key"].startswith("fleet/p"))
    with pytest.raises(ClientError, match="AccessDenied"):
        host.delete_object(Bucket=iam_s3.bucket, Key=victim)
    run_cli("maintenance", "run", *repo, code=exit_codes.STORAGE)  # a host cannot run maintenance's deletes
    host.head_object(Bucket=iam_s3.bucket, Key=victim)  # still there

    # a host adds only what maintenance reclaims: packs, raw index blobs, manifests, sessions
    for name in ("zzz-garbage", "xe9_" + "0" * 16, "xv_" + "0" * 16, "xs0_" + "0" * 16 + "_0of1", "ks00000000",
                 "m_" + "0" * 24 + "-" + "0" * 16, "xt" + "0" * 16, "kdist.repository2"):
        with pytest.raises(ClientError, match="AccessDenied"):
            host.put_object(Bucket=iam_s3.bucket, Key=f"fleet/{name}", Body=b"garbage")
    with pytest.raises(ClientError, match="AccessDenied"):  # nor under another prefix of the bucket
        host.put_object(Bucket=iam_s3.bucket, Key="elsewhere/p" + "0" * 32, Body=b"garbage")

    iam_s3.env(monkeypatch, "maintenance")
    run_cli("gc", "run", *repo)
    run_cli("repo", "check", *repo)
    iam_s3.env(monkeypatch, "host")
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst")
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))


def test_every_backup_opened_by_the_cli_is_append_only(env, tmp_path, monkeypatch):
    """The CLI's backup path runs through AppendOnlyStorage whatever key it holds: a delete
    slipped into it fails the backup instead of removing a blob."""
    from repo_format.storage import wrappers

    repo = ["--repo", tmp_path / "repo"]
    run_cli("repo", "create", *repo)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    seen = []
    real = wrappers.AppendOnlyStorage.delete

    def spy(self, name):
        seen.append(name)
        return real(self, name)

    monkeypatch.setattr(wrappers.AppendOnlyStorage, "delete", spy)
    from repo_format.manifest import ManifestStore

    monkeypatch.setattr(ManifestStore, "write_records",
                        lambda self, records: self.storage.delete("kdist.repository"))
    run_cli("snapshot", "create", *repo, src, code=exit_codes.STORAGE)
    assert seen == ["kdist.repository"] * 2  # the snapshot's put, then the failure record's: both refused
    assert open_storage(str(tmp_path / "repo")).exists("kdist.repository")


def test_an_unreadable_manifest_blob_stops_no_listing_restore_or_backup(env, tmp_path):
    """Any client can put a blob under a manifest name that does not open (random bytes) or,
    holding the key, one that opens and does not decode. Listing, restoring and backing up pass
    over it with a warning naming it; maintenance refuses to run (what it cannot read it would
    take for gone) and `repo check` names it."""
    from repo_format.crypto import Aead
    from repo_format.format_blob import read as read_format

    repo = ["--repo", tmp_path / "repo"]
    run_cli("repo", "create", *repo)
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src), big_size=20_000)
    run_cli("snapshot", "create", *repo, src)
    storage = open_storage(str(tmp_path / "repo"))
    keys = read_format(storage, os.environ["KDIST_PASSWORD"]).keys
    junk = f"{C.MANIFEST_PREFIX}{'ab' * 12}-{'cd' * 8}"
    storage.put(junk, os.urandom(300))
    sealed = f"{C.MANIFEST_PREFIX}{'ef' * 12}-{'cd' * 8}"
    aead: Aead = keys.manifest_aead()
    storage.put(sealed, aead.seal(b"\xc1 not msgpack", sealed.encode()))

    listed = run_cli("snapshot", "list", *repo, "--json")
    warned = listed.stderr if hasattr(listed, "stderr") else listed.output
    assert junk in warned and sealed in warned and "passed over" in warned
    assert len(json.loads(listed.stdout)) == 1
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst")
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))
    (src / "new").write_bytes(b"after the junk")
    run_cli("snapshot", "create", *repo, src)
    assert len(json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)) == 2

    refused = run_cli("maintenance", "run", *repo, code=exit_codes.CORRUPTION).output
    assert junk in refused or sealed in refused  # the one it met first
    checked = run_cli("repo", "check", *repo, code=exit_codes.CORRUPTION).output
    assert junk in checked and sealed in checked
