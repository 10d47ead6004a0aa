"""Text output of names: a file name holding a newline, an escape sequence or a backslash prints
as one unambiguous line, never two entries or terminal control; host names are never cut."""

from __future__ import annotations

import json

import pytest

from kdist.cli.text import printable
from kdist.snapshot import Source
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import PASSWORD, cli_env, run_cli
from repo_format.repository import Repository
from repo_format.storage import open_storage

NAMES = ["two\nlines", "red\x1b[31mtext", "back\\slash", "bell\x07", "tab\there", "c1\x9bcsi", "plain"]


@pytest.fixture
def repo_with_odd_names(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(NAMES):
        (src / name).write_text(f"file {i}\n")
    (src / "link").symlink_to("to\nsomewhere")
    repo = tmp_path / "repo"
    run_cli("repo", "create", "--repo", repo)
    run_cli("snapshot", "create", "--repo", repo, src)
    (src / "two\nlines").unlink()
    (src / "new\rone").write_text("x")
    run_cli("snapshot", "create", "--repo", repo, src)
    return repo


def test_printable_escapes_every_control_character_and_keeps_the_rest():
    assert printable("two\nlines") == "two\\nlines"
    assert printable("back\\slash") == "back\\\\slash"  # so "a\\nb" and "a<newline>b" differ
    assert printable("a\\nb") != printable("a\nb")
    assert printable("red\x1b[31m") == "red\\x1b[31m" and printable("del\x7f") == "del\\x7f"
    assert printable("c1\x9b") == "c1\\x9b" and printable("raw\udc9bbyte") == "raw\\x9bbyte"
    assert printable("café 日本 \udce9") == "café 日本 \udce9"  # printable text, and other raw bytes, as they are
    assert printable("invoice\u202egpj.exe") == "invoice\\u202egpj.exe"  # a right-to-left override
    assert printable("one\u2028two") == "one\\u2028two"
    assert all(ord(c) >= 0x20 and not 0x7f <= ord(c) <= 0x9f for n in NAMES for c in printable(n))


def test_ls_and_diff_print_one_line_per_entry(repo_with_odd_names):
    out = run_cli("snapshot", "ls", "--repo", repo_with_odd_names, "latest", "-r").stdout
    lines = out.splitlines()
    assert len(lines) == len(NAMES) + 1  # the six remaining names, the new one and the link
    assert not any(c in out for c in "\x1b\x07\r\x9b")
    assert any(line.endswith("  back\\\\slash") for line in lines) and any("new\\rone" in line for line in lines)
    assert any(line.endswith("link -> to\\nsomewhere") for line in lines)

    listed = json.loads(run_cli("snapshot", "list", "--repo", repo_with_odd_names, "--json").stdout)
    out = run_cli("snapshot", "diff", "--repo", repo_with_odd_names, listed[0]["id"], listed[1]["id"]).stdout
    assert out.splitlines()[:2] == ["+ new\\rone", "- two\\nlines"] and len(out.splitlines()) == 3

    as_json = json.loads(run_cli("snapshot", "ls", "--repo", repo_with_odd_names, "latest", "--json").stdout)
    assert {e["path"] for e in as_json} >= {"new\rone", "red\x1b[31mtext"}  # JSON keeps the real names


def test_list_shows_whole_host_names(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    run_cli("repo", "create", "--repo", tmp_path / "repo")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    repo = Repository.open(open_storage(str(tmp_path / "repo")), PASSWORD)
    hosts = ["backup-node-eu-west-1a-0017.example.internal", "backup-node-eu-west-1a-0018.example.internal",
             "evil\x1b]0;pwned\x07"]
    for host in hosts:
        Uploader(repo, BackupOptions()).backup(str(tmp_path / "src"), Source(host, "root", str(tmp_path / "src")))
    repo.close()
    out = run_cli("snapshot", "list", "--repo", tmp_path / "repo").stdout
    assert hosts[0] in out and hosts[1] in out  # the 15-character cut made these two the same
    assert printable(hosts[2]) in out and "\x1b" not in out and "\x07" not in out
