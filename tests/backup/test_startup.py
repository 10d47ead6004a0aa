"""Start-up: a kdist command imports only what it uses.

Each command runs the real CLI (``kdist.cli.main.main``) in a fresh interpreter, which then reports
the modules it imported. Ray, numpy and boto3/botocore (and moto, a test dependency) take 60 to
300 ms each to import and are needed only by maintenance, ``--ray``, large indexes and ``s3://``
repositories: a top-level ``import numpy`` in any module that ``snapshot list``, ``snapshot
restore`` or ``kdist --help`` loads fails here. ``--help`` loads every command group's module, so
it covers the top-level imports of the whole CLI; ``snapshot list`` also checks that the other
groups' modules stay unloaded (``kdist.cli.main`` imports a group only when it is named).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdist_trees import cli_env, run_cli

HEAVY = ("ray", "numpy", "boto3", "botocore", "s3transfer", "moto")

# Run ``kdist ARGS`` in this interpreter as the ``kdist`` entry point does, then write the exit
# code and the heavy modules that got imported to the file named first.
_PROBE = """
import json, sys
out, heavy, args = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
sys.argv = ["kdist", *args]
from kdist.cli.main import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "heavy": [m for m in heavy if m in sys.modules], "modules": sorted(sys.modules)}, f)
"""


def run_probe(tmp_path, *args) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, "-c", _PROBE, str(out), ",".join(HEAVY), *[str(a) for a in args]],
                       env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and out.exists(), p.stderr
    result = json.loads(out.read_text())
    out.unlink()
    assert result["code"] in (0, None), (args, result["code"], p.stdout, p.stderr)
    return result, p


@pytest.fixture
def repo(monkeypatch, tmp_path):
    cli_env(monkeypatch)  # the test password and the weak test KDF, inherited by the subprocesses
    path = tmp_path / "repo"
    run_cli("repo", "create", "--repo", path)
    return path


def test_snapshot_list_imports_no_heavy_module(repo, tmp_path):
    result, p = run_probe(tmp_path, "snapshot", "list", "--repo", repo)
    assert "no snapshots" in p.stdout
    assert result["heavy"] == []
    # only the snapshot group's module is loaded, not repo check's, maintenance's or the cache's
    loaded = set(result["modules"])
    assert "kdist.cli.snapshot" in loaded
    assert not loaded & {"kdist.cli.repo", "kdist.cli.maintenance", "kdist.cli.cache", "kdist.check",
                         "kdist.repair", "kdist.gc.run", "kdist.gc.history"}


def test_help_imports_no_heavy_module(tmp_path):
    result, p = run_probe(tmp_path, "--help")
    for group in ("cache", "gc", "index", "maintenance", "repo", "snapshot"):
        assert f"\n  {group} " in p.stdout, p.stdout
    assert {"kdist.cli.repo", "kdist.cli.snapshot", "kdist.cli.maintenance", "kdist.cli.cache"} <= set(result["modules"])
    assert result["heavy"] == []


def test_snapshot_create_imports_no_heavy_module(repo, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    result, p = run_probe(tmp_path, "snapshot", "create", "--repo", repo, src)
    assert p.stdout.startswith("snapshot ")
    assert result["heavy"] == []


def test_snapshot_restore_imports_no_heavy_module(repo, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.txt").write_text("world")
    run_cli("snapshot", "create", "--repo", repo, src)
    result, p = run_probe(tmp_path, "snapshot", "restore", "--repo", repo, "latest", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "b.txt").read_text() == "world"
    assert result["heavy"] == []
