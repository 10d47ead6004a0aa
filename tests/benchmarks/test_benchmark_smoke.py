"""Smoke test of the side-by-side benchmark (``python -m benchmarks run``): it works end to end.

Runs the harness's quick mode on tiny data sets with kdist only (restic and borg may be missing),
locally and on the moto S3 server, and checks the shape of its JSON and that every restore was
verified. Never a timing assertion: benchmarks report numbers, the test suite does not judge them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is not an installed package; tests/ has no __init__.py

from benchmarks.datasets import ensure_large, make_working_copy, tree_stats, verify_tree  # noqa: E402

EXPECTED_PHASES = {
    ("large", "first"), ("large", "second"), ("large", "nightly"), ("large", "restore"),
    ("small", "first"), ("small", "second"), ("small", "restore"),
}


def test_quick_mode_on_tiny_data_with_kdist(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "benchmarks", "run", "--quick", "--size", "tiny", "--tools", "kdist", "--s3",
           "--weak-kdf-for-tests", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| data set | phase | tool |" in result.stdout

    runs = json.loads(out.read_text())["runs"]
    for backend in ("local", "s3"):
        mine = [r for r in runs if r["backend"] == backend]
        assert {(r["dataset"], r["phase"]) for r in mine} == EXPECTED_PHASES, backend
        assert all(r["ok"] and r["tool"] == "kdist" and r["exit_code"] == 0 for r in mine)
        restores = [r for r in mine if r["phase"] == "restore"]
        assert len(restores) == 2 and all(r["verify"]["ok"] for r in restores), restores
    assert all(r["server_requests"]["PUT"]["calls"] > 0 for r in runs if r["backend"] == "s3" and r["phase"] == "first")


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
