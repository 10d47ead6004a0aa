"""Host-aware commands (restic's semantics): ``--host``, ``--path``, ``--tag`` select snapshots for
list, restore, ls, cat, diff and verify, and ``latest`` is the newest of those selected, not the
fleet's; ``forget`` decides only among the selected, per ``--group-by``, with ``--keep-within``,
and says why it keeps each one."""

from __future__ import annotations

import json

import pytest

from kdist.cli import exit_codes
from kdist.snapshot import Source
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import PASSWORD, cli_env, run_cli
from repo_format import clock
from repo_format.repository import Repository
from repo_format.storage import open_storage

DAY = 86400.0


@pytest.fixture
def fleet(monkeypatch, tmp_path):
    """Snapshots of two hosts and two paths, a day apart, oldest first: (host, path, tags, day).
    Each holds a file ``who`` naming its host, path and day."""
    cli_env(monkeypatch)
    repo_dir = tmp_path / "repo"
    run_cli("repo", "create", "--repo", repo_dir)
    plan = [("web1", "/srv", ["nightly"], 0), ("web1", "/etc", ["nightly", "config"], 1),
            ("db1", "/srv", ["nightly"], 2), ("web1", "/srv", ["weekly"], 3), ("db1", "/srv", ["nightly"], 4),
            ("web1", "/srv", ["nightly"], 5)]
    t = [1_790_000_000.0]
    clock.set_clock(lambda: t[0])
    try:
        repo = Repository.open(open_storage(str(repo_dir)), PASSWORD)
        made = []
        for host, path, tags, day in plan:
            t[0] = 1_790_000_000.0 + day * DAY
            src = tmp_path / f"src-{host}-{path.strip('/')}-{day}"
            src.mkdir()
            (src / "who").write_text(f"{host} {path} day {day}\n")
            snap = Uploader(repo, BackupOptions(tags=tags)).backup(str(src), Source(host, "root", path))
            made.append(snap)
        repo.close()
    finally:
        clock.set_clock(None)
    return ["--repo", str(repo_dir)], made


def ids(result) -> list[str]:
    return [s["id"] for s in json.loads(result.stdout)]


def test_list_filters(fleet):
    repo, made = fleet
    assert ids(run_cli("snapshot", "list", *repo, "--host", "web1", "--json")) == [made[i].id for i in (0, 1, 3, 5)]
    assert ids(run_cli("snapshot", "list", *repo, "--host", "web1", "--host", "db1", "--json")) == [s.id for s in made]
    assert ids(run_cli("snapshot", "list", *repo, "--path", "/etc", "--json")) == [made[1].id]
    assert ids(run_cli("snapshot", "list", *repo, "--path", "/srv/", "--host", "db1", "--json")) == [made[2].id,
                                                                                                    made[4].id]
    both = run_cli("snapshot", "list", *repo, "--tag", "nightly,config", "--json")  # all of a list
    assert ids(both) == [made[1].id]
    either = run_cli("snapshot", "list", *repo, "--tag", "config", "--tag", "weekly", "--json")  # any of the lists
    assert ids(either) == [made[1].id, made[3].id]


def test_latest_is_the_newest_of_the_selected(fleet, tmp_path):
    repo, made = fleet
    out = run_cli("snapshot", "cat", *repo, "latest", "who").stdout
    assert out == "web1 /srv day 5\n"  # the fleet's newest
    assert run_cli("snapshot", "cat", *repo, "latest", "who", "--host", "db1").stdout == "db1 /srv day 4\n"
    assert run_cli("snapshot", "cat", *repo, "latest", "who", "--path", "/etc").stdout == "web1 /etc day 1\n"
    assert run_cli("snapshot", "cat", *repo, "latest", "who", "--tag", "weekly").stdout == "web1 /srv day 3\n"
    listed = run_cli("snapshot", "ls", *repo, "latest", "--host", "db1", "--json").stdout
    assert [e["path"] for e in json.loads(listed)] == ["who"]
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "out", "--host", "web1", "--path", "/etc")
    assert (tmp_path / "out" / "who").read_text() == "web1 /etc day 1\n"
    run_cli("snapshot", "restore", *repo, "latest", tmp_path / "one", "--host", "db1", "--include", "who")
    assert (tmp_path / "one" / "who").read_text() == "db1 /srv day 4\n"
    run_cli("snapshot", "verify", *repo, "latest", "--host", "db1")
    diff = run_cli("snapshot", "diff", *repo, made[2].id, "latest", "--host", "db1").stdout
    assert diff.splitlines()[0] == "M who"
    r = run_cli("snapshot", "cat", *repo, "latest", "who", "--host", "nobody", code=exit_codes.NOT_FOUND)
    assert "no snapshots of host nobody" in r.stderr
    for option in ("--host", "--path", "--tag"):  # an unset variable must not select every snapshot
        r = run_cli("snapshot", "restore", *repo, "latest", tmp_path / "x", option, "", code=exit_codes.USAGE)
        assert f"{option} was given an empty value" in r.stderr


def test_forget_decides_among_the_selected_only_and_says_why(fleet):
    repo, made = fleet
    r = run_cli("snapshot", "forget", *repo, "--host", "web1", "--path", "/srv", "--keep-last", "1", "--dry-run")
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:3]] == ["keep", "forget", "forget"]
    assert lines[0].startswith(f"keep    {made[5].short_id}") and lines[0].endswith("(last)")
    plan = json.loads(run_cli("snapshot", "forget", *repo, "--host", "web1", "--path", "/srv", "--keep-last", "1",
                              "--json").stdout)
    assert sorted(plan["forget"]) == sorted([made[0].id, made[3].id])
    assert ids(run_cli("snapshot", "list", *repo, "--json")) == [made[i].id for i in (1, 2, 4, 5)]  # db1, /etc kept


def test_forget_keep_within_and_group_by(fleet):
    repo, made = fleet
    # within 36 h of each group's newest: web1:/srv keeps day 5 (not 3), web1:/etc day 1, db1 day 4 (not 2)
    plan = json.loads(run_cli("snapshot", "forget", *repo, "--keep-within", "36h", "--dry-run", "--json").stdout)
    assert plan["reasons"] == {made[5].id: ["within"], made[4].id: ["within"], made[1].id: ["within"]}
    assert sorted(plan["forget"]) == sorted([made[0].id, made[2].id, made[3].id])
    # 2d 12h: db1's day 2 is within 2.5 days of its day 4
    plan = json.loads(run_cli("snapshot", "forget", *repo, "--keep-within", "2d12h", "--dry-run", "--json").stdout)
    assert made[2].id in plan["keep"] and made[0].id in plan["forget"]
    # one group per host: web1's /etc and /srv compete for one --keep-last
    plan = json.loads(run_cli("snapshot", "forget", *repo, "--keep-last", "1", "--group-by", "host", "--dry-run",
                              "--json").stdout)
    assert sorted(plan["keep"]) == sorted([made[5].id, made[4].id])
    r = run_cli("snapshot", "forget", *repo, "--keep-last", "1", "--group-by", "host,colour", code=exit_codes.USAGE)
    assert "comma-separated list of host, user, path, tags" in r.stderr
    run_cli("snapshot", "forget", *repo, "--keep-within", "soon", code=exit_codes.USAGE)
    r = run_cli("snapshot", "forget", *repo, "--id", made[0].id, "--host", "web1", code=exit_codes.USAGE)
    assert "--id names snapshots itself" in r.stderr


def test_group_by_without_host_is_refused_once_hosts_have_keys(fleet, tmp_path, monkeypatch):
    repo, made = fleet
    plan = json.loads(run_cli("snapshot", "forget", *repo, "--keep-last", "1", "--group-by", "path", "--dry-run",
                              "--json").stdout)
    assert sorted(plan["keep"]) == sorted([made[5].id, made[1].id])  # no host keys: allowed
    pw = tmp_path / "hostpw"
    pw.write_text("host-password\n")
    run_cli("key", "add", *repo, "--role", "host", "--host", "web1", "--new-password-file", pw)
    r = run_cli("snapshot", "forget", *repo, "--keep-last", "1", "--group-by", "path", "--dry-run",
                code=exit_codes.USAGE)
    assert "--group-by must include host" in r.stderr


def _at(seconds_after_day0: float):
    t = 1_790_000_000.0 + seconds_after_day0
    clock.set_clock(lambda: t)


@pytest.fixture
def restore_clock():
    yield
    clock.set_clock(None)


def test_fleet_status_lists_every_source_and_exits_22_on_stale_ones(fleet, tmp_path, restore_clock):
    repo, made = fleet
    # a backup of db1:/srv started on day 5 and left only a checkpoint (it died)
    r = Repository.open(open_storage(repo[1]), PASSWORD)
    _at(5 * DAY)
    died = made[4].__class__(source=made[4].source, root=made[4].root, start=clock.now(), end=clock.now(),
                             checkpoint=True)
    r.manifests.put(died.labels(), died.payload())
    r.close()

    _at(5 * DAY + 3 * 3600)
    out = run_cli("fleet", "status", *repo, code=exit_codes.STALE)
    rows = {tuple(line.split()[:2]): line for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {("db1", "/srv"), ("web1", "/etc"), ("web1", "/srv")}
    assert rows[("web1", "/srv")].split()[4] == "3h" and rows[("web1", "/srv")].endswith("ok")
    assert "STALE" in rows[("web1", "/etc")] and "4d 3h" in rows[("web1", "/etc")]  # day 1, now day 5 + 3 h
    assert "STALE" in rows[("db1", "/srv")] and "did not finish" in rows[("db1", "/srv")]
    assert "2 of 3 stale (no snapshot within 1d 2h): db1:/srv (1d 3h), web1:/etc (4d 3h)" in out.stderr

    doc = json.loads(run_cli("fleet", "status", *repo, "--json", code=exit_codes.STALE).stdout)
    by = {(s["host"], s["path"]): s for s in doc["sources"]}
    assert by[("web1", "/srv")]["snapshot"] == made[5].id and by[("web1", "/srv")]["stale"] is False
    assert by[("db1", "/srv")]["unfinished_since"] > by[("db1", "/srv")]["time"] and doc["stale"] == 2

    run_cli("fleet", "status", *repo, "--max-age", "5d")  # nothing older than 5 days: exit 0
    run_cli("fleet", "status", *repo, "--host", "web1", "--path", "/srv")  # only that one, which is fresh

    # a host with a key and no snapshot at all is the one a fleet forgot
    pw = tmp_path / "pw"
    pw.write_text("web2-password\n")
    run_cli("key", "add", *repo, "--role", "host", "--host", "web2", "--new-password-file", pw)
    out = run_cli("fleet", "status", *repo, "--max-age", "5d", code=exit_codes.STALE)
    assert any(line.split()[:2] == ["web2", "-"] and "never" in line and "STALE" in line
               for line in out.stdout.splitlines())
    assert "1 of 4 stale" in out.stderr and "web2 (never)" in out.stderr


def test_an_id_with_a_filter_it_does_not_match_is_refused(fleet, tmp_path):
    """Before --path became a filter, `restore ID TARGET --path sub` restored only sub: now a
    filter the id does not match is an error, never the whole snapshot restored instead."""
    repo, made = fleet
    r = run_cli("snapshot", "restore", *repo, made[1].id, tmp_path / "t", "--path", "who", code=exit_codes.NOT_FOUND)
    assert "is of web1:/etc, not of path who" in r.stderr and "--include" in r.stderr
    assert not (tmp_path / "t").exists()
    run_cli("snapshot", "restore", *repo, made[1].id, tmp_path / "t", "--path", "/etc", "--host", "web1")
    assert (tmp_path / "t" / "who").read_text() == "web1 /etc day 1\n"
