"""Smoke test of the fleet scale benchmark (``python -m benchmarks.fleet_scale``): it works end to end.

Runs it on a tiny repository (20,000 synthetic contents, a tree of 200 files) and checks the shape
of its JSON and the relations that hold whatever the machine: the synthetic index holds N
entries, the cold backup fetched the whole index, the warm one far less, every command was
sampled, the restored file matches. No timing assertion: benchmarks report numbers, the test
suite does not judge them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
N = 20_000


def test_fleet_scale_on_a_tiny_repository(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.fleet_scale", "--contents", str(N), "--files", "200", "--hosts", "2",
           "--json", "--workdir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 1
    r = rows[0]

    for key in ("contents", "warm_backup_rss_mib", "warm_backup_get_bytes", "cold_backup_get_bytes"):
        assert key in r, key
    assert r["contents"] == N and r["synthetic_entries"] == N
    # several index blobs of each kind: a range set, xs sets, raw blobs, the hosts' own
    assert r["index_blobs"] > 30 and r["index_bytes"] > N * 60
    # cold: the whole index fetched once (plus manifests, markers, its own blob at the end)
    assert r["index_bytes"] <= r["cold_backup_get_bytes"] < 2 * r["index_bytes"]
    # warm: the other host's new blob, not the index again
    assert r["new_index_blobs"] >= 1 and r["new_index_bytes"] > 0
    assert r["new_index_bytes"] <= r["warm_backup_get_bytes"] < r["cold_backup_get_bytes"] / 4
    assert r["warm_backup_files_read"] == 10 and r["warm_backup_files_reused"] == 190
    for phase in ("cold_backup", "warm_backup", "list", "restore"):
        assert r[f"{phase}_samples"] > 0, phase
        assert 0 < r[f"{phase}_rss_mib"] <= r[f"{phase}_vmhwm_mib"], phase
        assert r[f"{phase}_rss_file_mib"] > 0 and r[f"{phase}_wall_s"] > 0, phase
        assert r[f"{phase}_get_calls"] > 0, phase
    assert r["snapshots_listed"] == 2 + 1 + 2  # the seeded hosts, the other host, cold and warm
    assert r["list_put_calls"] == 0 and r["restore_put_calls"] == 0
    assert r["restore_files"] == 1 and r["restore_ok"]
    assert not any(tmp_path.iterdir()), "the repository, caches and trees were not cleaned up"
