"""`kdist key`, roles and `kdist repo upgrade` through the CLI, on a directory repository."""

from __future__ import annotations

import json

import pytest

from kdist.cli import exit_codes
from kdist_trees import PASSWORD, build_tree, cli_env, run_cli, tree_state
from repo_format import constants as C
from repo_format.crypto import KdfParams
from repo_format.repository import Repository
from repo_format.storage import open_storage

from kdist.snapshot import list_snapshots


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    s.mkdir()
    build_tree(str(s), big_size=30_000)
    return s


def as_key(monkeypatch, password: str, key_id: str | None) -> None:
    monkeypatch.setenv("KDIST_PASSWORD", password)
    if key_id:
        monkeypatch.setenv("KDIST_KEY_ID", key_id)
    else:
        monkeypatch.delenv("KDIST_KEY_ID", raising=False)


def add_key(repo, monkeypatch, role: str, password: str, host: str = "") -> str:
    monkeypatch.setenv("KDIST_NEW_PASSWORD", password)
    out = run_cli("key", "add", *repo, "--role", role, *(["--host", host] if host else []), "--json").stdout
    return json.loads(out)["key_id"]


def test_roles_through_the_cli(env, monkeypatch, tmp_path, src):
    repo = ["--repo", tmp_path / "repo"]
    run_cli("repo", "create", *repo)
    monkeypatch.setenv("KDIST_NEW_PASSWORD", "web1-pw")
    added = run_cli("key", "add", *repo, "--role", "host", "--host", "web1", "--json")
    web1 = json.loads(added.stdout)["key_id"]
    assert "every key can read every host's backups" in added.stderr  # format 2: said when it matters
    maint = add_key(repo, monkeypatch, "maintenance", "maint-pw")
    listed = json.loads(run_cli("key", "list", *repo, "--json").stdout)
    assert {(k["key_id"], k["role"], k["host"], k["state"]) for k in listed} == {
        (web1, "host", "web1", "active"), (maint, "maintenance", "", "active")}

    run_cli("snapshot", "create", *repo, src)  # the admin's own snapshot, as this machine
    as_key(monkeypatch, "web1-pw", web1)
    made = json.loads(run_cli("snapshot", "create", *repo, src, "--json").stdout)[0]
    assert made["source"]["host"] == "web1"  # a host key backs up as its host
    run_cli("snapshot", "create", *repo, src, "--host", "db1", code=exit_codes.PERMISSION)
    shown = json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)
    assert [s["id"] for s in shown] == [made["id"]]  # only its own host's
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst")
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))
    for cmd in (["snapshot", "forget", "--keep-last", "1"], ["gc", "run"], ["maintenance", "run"],
                ["key", "add", "--role", "host", "--host", "x"], ["key", "list"], ["repo", "repair"]):
        result = run_cli(*cmd[:2], *repo, *cmd[2:], code=exit_codes.PERMISSION)
        assert "host key may not" in result.output

    as_key(monkeypatch, "maint-pw", maint)
    run_cli("snapshot", "create", *repo, src, code=exit_codes.PERMISSION)
    run_cli("snapshot", "forget", *repo, "--keep-last", "1")  # per source: both snapshots stay
    run_cli("gc", "run", *repo)
    run_cli("repo", "check", *repo)
    assert len(json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)) == 2

    as_key(monkeypatch, "web1-pw", "00000000")
    run_cli("snapshot", "list", *repo, code=exit_codes.WRONG_PASSWORD)
    as_key(monkeypatch, "web1-pw", None)  # without the key id every slot is tried
    run_cli("snapshot", "list", *repo)

    as_key(monkeypatch, PASSWORD, None)
    run_cli("key", "remove", *repo, web1)
    listed = {k["key_id"]: k["state"] for k in json.loads(run_cli("key", "list", *repo, "--json").stdout)}
    assert listed[web1] == "removed"
    assert len(json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)) == 2  # its snapshot stays
    as_key(monkeypatch, "web1-pw", web1)
    run_cli("snapshot", "list", *repo, code=exit_codes.WRONG_PASSWORD)  # its password opens nothing now


def test_upgrade_keeps_every_snapshot_and_enables_keys(env, monkeypatch, tmp_path, src):
    storage = open_storage(str(tmp_path / "repo"), create=True)
    Repository.create(storage, PASSWORD, kdf=KdfParams.weak_for_tests(), version=1).close()
    repo = ["--repo", tmp_path / "repo"]
    first = json.loads(run_cli("snapshot", "create", *repo, src, "--json").stdout)[0]
    run_cli("snapshot", "forget", *repo, "--id", first["id"])
    second = json.loads(run_cli("snapshot", "create", *repo, src, "--json").stdout)[0]
    monkeypatch.setenv("KDIST_NEW_PASSWORD", "h-pw")
    run_cli("key", "add", *repo, "--role", "host", "--host", "h", code=exit_codes.USAGE)  # no slots before
    out = run_cli("repo", "upgrade", *repo).output
    assert "upgraded" in out
    assert Repository.open(storage, PASSWORD).format.version == C.FORMAT_VERSION
    assert [s["id"] for s in json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)] == [second["id"]]
    run_cli("repo", "check", *repo)  # the old unsigned records are superseded by signed copies
    host = add_key(repo, monkeypatch, "host", "h-pw", "h")
    as_key(monkeypatch, "h-pw", host)
    run_cli("snapshot", "create", *repo, src)
    as_key(monkeypatch, PASSWORD, None)
    run_cli("repo", "upgrade", *repo, code=exit_codes.USAGE)  # once is enough


def test_a_second_admin_key_is_an_admin_and_can_be_removed(env, monkeypatch, tmp_path, src):
    repo = ["--repo", tmp_path / "repo"]
    run_cli("repo", "create", *repo)
    second = add_key(repo, monkeypatch, "admin", "second-admin-pw")
    as_key(monkeypatch, "second-admin-pw", second)
    status = json.loads(run_cli("repo", "status", *repo, "--json").stdout)
    assert status["key"] == {"role": "admin", "id": second, "host": None}
    host = add_key(repo, monkeypatch, "host", "h-pw", "h")  # an admin key adds keys
    run_cli("key", "remove", *repo, second, code=exit_codes.USAGE)  # not the key in use
    run_cli("snapshot", "forget", *repo, "--keep-last", "1")
    as_key(monkeypatch, PASSWORD, None)
    run_cli("key", "remove", *repo, second)
    as_key(monkeypatch, "second-admin-pw", second)
    run_cli("snapshot", "list", *repo, code=exit_codes.WRONG_PASSWORD)
    as_key(monkeypatch, "h-pw", host)
    run_cli("snapshot", "create", *repo, src)  # keys the removed admin added stay


@pytest.mark.parametrize("junk", ["random", "future-version"])
def test_a_hosts_unreadable_raw_index_blob_stops_no_restore_or_backup(env, monkeypatch, tmp_path, src, junk,
                                                                      caplog):
    """A host puts a raw index blob that does not open (random bytes) or does not decode (a
    version from the future, sealed with the index key every host holds). Before, every
    restore and backup of the fleet stopped on it. Listing, restoring and backing up pass over
    it with a warning naming it; maintenance and check stay strict (what maintenance does not
    see it might take for unreferenced) and name it, until an admin deletes it."""
    import os
    import secrets
    import subprocess
    import sys

    from repo_format.index import seal_index

    repo = ["--repo", tmp_path / "repo"]
    run_cli("repo", "create", *repo)
    web1 = add_key(repo, monkeypatch, "host", "web1-pw", "web1")
    web2 = add_key(repo, monkeypatch, "host", "web2-pw", "web2")
    as_key(monkeypatch, "web2-pw", web2)
    run_cli("snapshot", "create", *repo, src)

    as_key(monkeypatch, "web1-pw", web1)  # web1 attacks
    storage = open_storage(str(tmp_path / "repo"))
    name = f"{C.INDEX_PREFIX}0_{secrets.token_hex(16)}-{secrets.token_hex(8)}"
    if junk == "random":
        body = os.urandom(300)
    else:
        attacker = Repository.open(storage, "web1-pw", key_id=web1, heartbeat_thread=False)
        body = seal_index(attacker.contents.epochs._aead, name, C.INDEX_HEADER.pack(C.INDEX_MAGIC, 99, 0, 0, 0, 0))
    storage.put(name, body)

    as_key(monkeypatch, "web2-pw", web2)
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst")
    assert tree_state(str(tmp_path / "dst")) == tree_state(str(src))
    assert [r for r in caplog.records if name in r.getMessage() and "passed over" in r.getMessage()]
    (src / "new-file").write_bytes(b"written after the attack")
    run_cli("snapshot", "create", *repo, src)
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "dst2")
    assert tree_state(str(tmp_path / "dst2")) == tree_state(str(src))
    (src / "newer-file").write_bytes(b"and by forked processes")  # each opens the repository itself
    p = subprocess.run([sys.executable, "-m", "kdist.cli.main", "snapshot", "create", *map(str, repo), str(src),
                        "--processes", "2"], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr

    as_key(monkeypatch, PASSWORD, None)
    stopped = run_cli("maintenance", "run", *repo,
                      code=exit_codes.CORRUPTION if junk == "random" else exit_codes.UNSUPPORTED_VERSION)
    assert name in stopped.output + stopped.stderr
    checked = run_cli("repo", "check", *repo, "--json", code=exit_codes.CORRUPTION)
    assert name in checked.stdout
    repaired = json.loads(run_cli("repo", "repair", *repo, "--json").stdout)
    assert repaired["unreadable_index_blobs_deleted"] == [name] and repaired["healthy"]
    assert name not in {m.name for m in storage.list(C.INDEX_PREFIX)}
    run_cli("maintenance", "run", *repo)
    run_cli("repo", "check", *repo)


def test_a_format_3_fleet_through_the_cli(env, monkeypatch, tmp_path, src):
    """`repo create --format-version 3`: each host key backs up, lists and restores its own
    host's snapshots only, and cannot restore another's by id; maintenance sees and keeps both;
    the admin's check finds the repository healthy."""
    repo = ["--repo", tmp_path / "repo"]
    assert "format 3: each host key" in run_cli("repo", "create", *repo, "--format-version", "3").stdout
    assert json.loads(run_cli("repo", "status", *repo, "--json").stdout)["format_version"] == 3
    added = run_cli("key", "add", *repo, "--role", "host", "--host", "web1", "--json",
                    env={"KDIST_NEW_PASSWORD": "web1-pw"})
    assert "every key can read" not in added.stderr
    web1 = json.loads(added.stdout)["key_id"]
    db1 = add_key(repo, monkeypatch, "host", "db1-pw", "db1")
    maint = add_key(repo, monkeypatch, "maintenance", "maint-pw")
    other = tmp_path / "other"
    other.mkdir()
    (other / "db-only").write_bytes(b"db1's own file")

    made = {}
    for key, password, host, source in ((web1, "web1-pw", "web1", src), (db1, "db1-pw", "db1", other)):
        as_key(monkeypatch, password, key)
        made[host] = json.loads(run_cli("snapshot", "create", *repo, source, "--json").stdout)[0]["id"]
        assert [s["id"] for s in json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)] == [made[host]]
    run_cli("snapshot", "restore", *repo, made["web1"], tmp_path / "stolen", code=exit_codes.NOT_FOUND)
    # below kdist's own filter by host (all format 2 has): db1's key opens none of web1's records
    db1_repo = Repository.open(open_storage(str(tmp_path / "repo")), "db1-pw", key_id=db1)
    assert {s.id for s in list_snapshots(db1_repo.manifests)} == {made["db1"]}
    db1_repo.close()
    run_cli("snapshot", "restore", *repo, made["db1"], tmp_path / "db1-restored")
    assert tree_state(str(tmp_path / "db1-restored")) == tree_state(str(other))

    as_key(monkeypatch, "maint-pw", maint)
    run_cli("maintenance", "run", *repo)
    assert {s["id"] for s in json.loads(run_cli("snapshot", "list", *repo, "--json").stdout)} == set(made.values())
    as_key(monkeypatch, PASSWORD, None)
    run_cli("repo", "check", *repo)
    run_cli("snapshot", "restore", *repo, made["web1"], tmp_path / "web1-restored")
    assert tree_state(str(tmp_path / "web1-restored")) == tree_state(str(src))
