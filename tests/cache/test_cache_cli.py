"""The cache from the command line: where it lives, --no-cache, two processes sharing one,
``kdist cache status`` and ``kdist cache clear``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kdist_trees import PASSWORD, cli_env, run_cli

KDIST = [sys.executable, "-c", "from kdist.cli.main import main; main()"]


def _tree(root, files: int, tag: str):
    for d in range(3):
        os.makedirs(root / f"d{d}", exist_ok=True)
        for i in range(files):
            (root / f"d{d}" / f"f{i}.txt").write_text(f"{tag} {d} {i}\n" * 40)
    return root


def _repo_id(repo) -> str:
    from repo_format.format_blob import read_unique_id
    from repo_format.storage import open_storage

    return read_unique_id(open_storage(str(repo))).hex()


def test_the_cache_follows_xdg_and_no_cache_writes_none(tmp_path, monkeypatch):
    cli_env(monkeypatch)
    monkeypatch.delenv("KDIST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    repo, src = tmp_path / "repo", _tree(tmp_path / "src", 5, "x")
    run_cli("repo", "create", "--repo", repo)
    run_cli("snapshot", "create", "--repo", repo, "--no-cache", src)
    assert not (tmp_path / "xdg" / "kdist").exists()
    run_cli("snapshot", "create", "--repo", repo, src)
    cache = tmp_path / "xdg" / "kdist" / _repo_id(repo)
    assert os.listdir(cache / "index") and os.listdir(cache / "contents")
    assert (tmp_path / "xdg" / "kdist" / "CACHEDIR.TAG").exists()
    assert oct(cache.stat().st_mode & 0o777) == "0o700"


def test_status_reports_and_clear_removes(tmp_path, monkeypatch):
    cli_env(monkeypatch)
    monkeypatch.setenv("KDIST_CACHE_DIR", str(tmp_path / "caches"))
    repos = [tmp_path / "a", tmp_path / "b"]
    src = _tree(tmp_path / "src", 4, "y")
    for r in repos:
        run_cli("repo", "create", "--repo", r)
        run_cli("snapshot", "create", "--repo", r, src)
    out = json.loads(run_cli("cache", "status", "--json").output)
    assert sorted(c["repository_id"] for c in out["caches"]) == sorted(_repo_id(r) for r in repos)
    assert all(c["index_files"] >= 1 and c["total_bytes"] > 0 for c in out["caches"])
    text = run_cli("cache", "status", "--repo", repos[0], "--cache-limit", "1KiB").output
    assert _repo_id(repos[0]) in text and _repo_id(repos[1]) not in text and "OVER LIMIT" in text
    assert "cleared 1 cache(s)" in run_cli("cache", "clear", "--repo", repos[0]).output
    left = json.loads(run_cli("cache", "status", "--json").output)["caches"]
    assert [c["repository_id"] for c in left] == [_repo_id(repos[1])]
    run_cli("cache", "status", "--cache-limit", "lots", code=2)
    # a cleared cache costs requests, nothing else
    run_cli("snapshot", "restore", "--repo", repos[0], "latest", tmp_path / "out")
    assert (tmp_path / "out" / "d2" / "f3.txt").read_text() == "y 2 3\n" * 40


def test_two_processes_sharing_a_cache_both_publish(tmp_path, monkeypatch):
    cli_env(monkeypatch)
    cache = tmp_path / "shared-cache"
    env = dict(os.environ, KDIST_PASSWORD=PASSWORD, KDIST_CACHE_DIR=str(cache))
    repo = tmp_path / "repo"
    run_cli("repo", "create", "--repo", repo)
    trees = [_tree(tmp_path / f"src{i}", 60, f"host {i}") for i in range(2)]
    for _round in range(2):  # cold, then warm: both share the same files
        procs = [subprocess.Popen(KDIST + ["snapshot", "create", "--repo", str(repo), str(t)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, t in enumerate(trees)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
    listed = json.loads(run_cli("snapshot", "list", "--repo", repo, "--json").output)
    assert sorted(s["source"]["path"] for s in listed) == sorted(str(t) for t in trees + trees)
    for snap in listed:
        i = int(snap["source"]["path"][-1])
        out = tmp_path / f"out-{snap['id']}"
        run_cli("snapshot", "restore", "--repo", repo, snap["id"], out)
        assert (out / "d1" / "f59.txt").read_text() == f"host {i} 1 59\n" * 40


def test_verify_reads_the_repository_not_the_cached_directories(tmp_path, monkeypatch):
    cli_env(monkeypatch)
    monkeypatch.setenv("KDIST_CACHE_DIR", str(tmp_path / "caches"))
    repo, src = tmp_path / "repo", _tree(tmp_path / "src", 3, "z")
    run_cli("repo", "create", "--repo", repo)
    run_cli("snapshot", "create", "--repo", repo, src)
    run_cli("snapshot", "verify", "--repo", repo, "latest")
    from repo_format import constants as C
    from repo_format.storage import open_storage

    storage = open_storage(str(repo))
    for m in list(storage.list(C.METADATA_PACK_PREFIX)):  # every directory object is lost
        storage.delete(m.name)
    out = run_cli("snapshot", "verify", "--repo", repo, "latest", code=13)
    assert "damaged" in out.output or "problem" in out.output


def test_kdist_raises_its_open_file_limit_for_mapped_index_files():
    """Each mapped index file holds a descriptor (before Python 3.13): a kdist process lifts its
    soft limit to the hard one, so a large index cannot starve it of descriptors."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    code = ("import resource; from kdist.allocator import tune_process; tune_process(); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=low_limit, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["4096", "4096"]


def test_cache_settings_refuse_what_is_not_a_size_and_do_without_a_home(monkeypatch):
    import pytest

    from repo_format.local_cache import CacheSettings, InvalidCacheSetting, parse_size

    assert parse_size("10GiB") == 10 * 1024**3 and parse_size("500M") == 500 * 1024**2 and parse_size("7") == 7
    for bad in ("inf", "nan", "1e400", "-1G", "lots", "5XB"):
        with pytest.raises(InvalidCacheSetting):
            parse_size(bad)
    for var in ("HOME", "XDG_CACHE_HOME", "KDIST_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("pathlib.Path.home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert CacheSettings.from_environment(no_cache=True).enabled is False
    settings = CacheSettings.from_environment()
    assert settings.enabled is False and settings.base is None  # runs without a cache, with a warning
