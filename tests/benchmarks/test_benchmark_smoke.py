"""Smoke test of the side-by-side benchmark (``python -m benchmarks run``): it works end to end.

Runs the harness's quick mode on tiny data sets with kdist only (restic and borg may be missing),
locally and on the moto S3 server, and checks the shape of its JSON and that every restore was
verified: the restore into a never-used directory and, locally, the one into the same path after
that restore was deleted (``restore-reused``). ``--kdist-processes`` gets its own run once
``kdist snapshot create`` has ``--processes`` (skipped before). Never a timing assertion: benchmarks
report numbers, the test suite does not judge them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is not an installed package; tests/ has no __init__.py

from benchmarks import report  # noqa: E402
from benchmarks.compare import build_parser  # noqa: E402
from benchmarks.datasets import ensure_large, make_working_copy, tree_stats, verify_tree  # noqa: E402
from benchmarks.peers import Kdist  # noqa: E402

S3_PHASES = {
    ("large", "first"), ("large", "second"), ("large", "nightly"), ("large", "restore"),
    ("small", "first"), ("small", "second"), ("small", "restore"),
}
EXPECTED_PHASES = {"local": S3_PHASES | {("large", "restore-reused"), ("small", "restore-reused")}, "s3": S3_PHASES}


def _run_harness(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "benchmarks", "run", "--quick", "--size", "tiny", "--weak-kdf-for-tests",
           "--data-dir", str(tmp_path / "data"), "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| data set | phase | tool |" in result.stdout
    return result, json.loads(out.read_text())["runs"]


def test_quick_mode_on_tiny_data_with_kdist(tmp_path):
    result, runs = _run_harness(tmp_path, "--tools", "kdist", "--s3")
    for backend in ("local", "s3"):
        mine = [r for r in runs if r["backend"] == backend]
        assert {(r["dataset"], r["phase"]) for r in mine} == EXPECTED_PHASES[backend], backend
        assert all(r["ok"] and r["tool"] == "kdist" and r["exit_code"] == 0 for r in mine)
        restores = [r for r in mine if r["phase"].startswith("restore")]
        assert len(restores) == len([p for p in EXPECTED_PHASES[backend] if p[1].startswith("restore")])
        assert all(r["verify"]["ok"] for r in restores), restores
        for r in restores:  # the fresh restore's target was never used before
            if r["phase"] == "restore":
                assert not r["target"]["existed"] and r["target"]["files"] == 0, r
    assert all(r["server_requests"]["PUT"]["calls"] > 0 for r in runs if r["backend"] == "s3" and r["phase"] == "first")

    # restore-reused: the same path as the fresh restore of the same case, which held that whole
    # verified restore (every file of the source) until it was deleted right before.
    local = {(r["dataset"], r["phase"]): r for r in runs if r["backend"] == "local"}
    for dataset in ("large", "small"):
        fresh, reused = local[(dataset, "restore")], local[(dataset, "restore-reused")]
        assert reused["target"]["path"] == fresh["target"]["path"]
        assert reused["target"]["existed"]
        assert (reused["target"]["files"], reused["target"]["bytes"]) == (fresh["source_files"], fresh["source_bytes"])
        assert reused["verify"]["ok"] and reused["verify"]["detail"] == fresh["verify"]["detail"]
        assert f"| {dataset} | restore-reused | kdist |" in result.stdout
        assert "restore check: ok" in next(line for line in result.stdout.splitlines()
                                           if f"{dataset} kdist" in line and "restore-reused" in line)


def _has_processes_option() -> bool:
    if shutil.which("kdist") is None:
        return False
    usage = subprocess.run(["kdist", "snapshot", "create", "--help"], capture_output=True, text=True)
    return usage.returncode == 0 and "--processes" in usage.stdout


def test_kdist_processes_option_makes_the_backup_commands():
    """Without running kdist: the option's parsing, and the commands and names of the kdist-pN rows."""
    args = build_parser().parse_args(["run", "--kdist-processes", "1, 2,4,2"])
    assert args.kdist_processes == [1, 2, 4]
    for bad in ("0", "two", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--kdist-processes", bad])
    assert build_parser().parse_args(["run"]).kdist_processes == []

    p2, default = Kdist(processes=2), Kdist()
    assert (p2.name, p2.variant_of, default.name, default.variant_of) == ("kdist-p2", "kdist", "kdist", None)
    cmd = p2.backup("/r", "/src", "first")
    assert cmd[:3] == ["kdist", "snapshot", "create"] and cmd[cmd.index("--processes") + 1] == "2"
    assert "--processes" not in default.backup("/r", "/src", "first")

    info = {"tools": {"kdist": {"label": "kdist", "variant_of": None, "processes": None, "notes": []},
                      "kdist-p2": {"label": "kdist-p2", "variant_of": "kdist", "processes": 2, "notes": []}}}
    runs = [{"dataset": "small", "phase": "first", "tool": tool, "backend": "local", "ok": True, "wall_s": wall,
             "files_per_s": 100 / wall, "mb_per_s": 0.1 / wall, "peak_rss_kib": 1024, "repo_bytes": 1 << 20,
             "requests": None} for tool, wall in (("kdist", 1.0), ("kdist-p2", 0.5))]
    table = "\n".join(report.results_table(runs, info, 1) + report.processes_table(runs, info))
    assert "| small | first | kdist-p2 |" in table and "| first | kdist-p2 | 2 |" in table


@pytest.mark.skipif(not _has_processes_option(), reason="`kdist snapshot create` has no --processes option yet")
def test_kdist_processes_rows_on_tiny_data(tmp_path):
    result, runs = _run_harness(tmp_path, "--tools", "kdist", "--kdist-processes", "1,2")
    for name, n in (("kdist-p1", 1), ("kdist-p2", 2)):
        mine = [r for r in runs if r["tool"] == name]
        assert {(r["dataset"], r["phase"]) for r in mine} == {("small", "first"), ("small", "second")}, name
        assert all(r["ok"] and r["exit_code"] == 0 and r["processes"] == n for r in mine), mine
        assert f"| small | first | {name} |" in result.stdout
    assert "kdist backup scaling with processes" in result.stdout


def test_restore_check_catches_a_changed_byte(tmp_path):
    ds = ensure_large(str(tmp_path / "sets"), seed=1, files=2, mib=1)
    copy = str(tmp_path / "copy")
    make_working_copy(copy, ds)
    files, size = tree_stats(copy)
    assert verify_tree(copy, files, size, ds.hashes)[0]
    victim = os.path.join(copy, sorted(ds.hashes)[0])
    with open(victim, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    ok, detail = verify_tree(copy, files, size, ds.hashes)
    assert not ok and "differs" in detail
