"""Smoke test of the maintenance scale benchmark (``python -m benchmarks.gc_scale``): it works end to end.

Runs it on a tiny repository (20,000 synthetic contents) and checks what its runs reported, not
how fast they were: the gc run marked exactly the garbage half and its walk reached every
reachable content and directory; the maintenance run right after it had nothing left to mark;
after one more day a maintenance run reached the day's contents too and compacted the epoch the
day wrote into, and the bytes it wrote are counted. No timing assertion: benchmarks report numbers, the test suite does
not judge them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from repo_format import constants as C

REPO_ROOT = Path(__file__).resolve().parents[2]
N = 20_000


def test_gc_scale_on_a_tiny_repository(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gc_scale", "--contents", str(N), "--json", "--repo-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 1
    r = rows[0]

    for key in ("contents", "build_seconds", "gc_seconds", "gc_peak_rss_mib", "maintenance_seconds",
                "maintenance_peak_rss_mib", "compaction_rewritten_bytes", "gc_requests", "gc_get_calls",
                "gc_get_bytes", "gc_put_bytes", "maintenance_requests", "compaction_ratio"):
        assert key in r, key
    assert r["contents"] == N
    # half the contents reachable (those in even-numbered packs), the other half garbage
    assert r["reachable_contents"] + r["garbage_contents"] == N
    assert 0.35 * N < r["garbage_contents"] < 0.65 * N
    # the gc run marked the garbage, all of it (its packs are two days old), and nothing else
    gc = r["gc_steps"]["content_gc"]
    assert gc["marked"] == r["garbage_contents"] and gc["undeleted"] == 0
    # its walk reached every reachable content and every directory object, of all 3 snapshots
    assert gc["live"] == r["expected_live"] == r["reachable_contents"] + r["directory_objects"]
    assert r["directory_objects"] > r["leaf_directories"] >= r["reachable_contents"] // 100
    # the runs did what a production run does at this point: no index work yet, no pack deleted
    # or rewritten (the placeholder packs are never read)
    for phase in ("gc", "maintenance", "compaction"):
        steps = r[f"{phase}_steps"]
        assert steps["blob_gc"]["deleted_packs"] == 0 and steps["pack_rewrite"]["moved"] == 0, phase
        assert r[f"{phase}_samples"] > 0 and r[f"{phase}_peak_rss_mib"] > 0, phase
        assert r[f"{phase}_list_calls"] > 0, phase
    assert r["gc_steps"]["index"]["compacted"] == [] and r["gc_steps"]["index"]["range"] is None
    assert r["gc_get_bytes"] >= r["index_bytes"]  # the whole index, read once (cold cache)
    assert r["gc_put_bytes"] > r["garbage_contents"] * C.INDEX_ENTRY.size  # the marks: an index entry each
    again = r["maintenance_steps"]["content_gc"]
    assert (again["marked"], again["undeleted"], again["live"]) == (0, 0, r["expected_live"])
    # one more day: its contents reachable from a 4th snapshot; the epoch the day wrote into has
    # settled, and the run compacted it (whether it also merged a range is kdist's policy)
    day = r["compaction_steps"]
    assert day["content_gc"]["marked"] == 0
    assert day["content_gc"]["live"] == r["expected_live"] + r["day_entries"] + r["day_directory_objects"]
    assert r["day_epoch"] in day["index"]["compacted"]
    if day["index"]["range"] is not None:  # a merge keeps every winner: nothing is old enough to drop
        assert day["index"]["range"]["dropped"] == 0 and day["index"]["range"]["entries"] >= N + r["day_entries"]
    assert r["compaction_xs_blobs"] >= 1 and r["compaction_xn_blobs"] == 0
    assert r["compaction_rewritten_bytes"] == r["compaction_xs_bytes"] + r["compaction_xr_bytes"] > 0
    assert r["compaction_ratio"] == round(r["compaction_rewritten_bytes"] / r["day_new_bytes"], 1) > 1
    assert not any(tmp_path.iterdir()), "the repository, cache and logs were not cleaned up"
