"""Timing one tool command and sizing a repository: wall time, the tool's peak RSS, du-like size.

A command runs under ``timed_child.py``, a fresh small process that spawns it and reads its
resource usage with ``os.wait4`` (ru_maxrss, KiB on Linux): the peak RSS is the tool's own, not
this harness's (see timed_child.py for why that needs a process in between). Output goes to log
files, never through pipes, so a chatty tool cannot block and nothing is read while the clock runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timed_child.py")


@dataclass
class Measured:
    wall_s: float
    peak_rss_kib: int
    exit_code: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict[str, str], log_prefix: str, cwd: str | None = None) -> Measured:
    result_path = log_prefix + ".result.json"
    with open(log_prefix + ".out", "wb") as out, open(log_prefix + ".err", "wb") as err:
        launcher = subprocess.run([sys.executable, "-S", LAUNCHER, result_path, *cmd], env=env, cwd=cwd,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    with open(log_prefix + ".out", errors="replace") as f:
        stdout = f.read()
    with open(log_prefix + ".err", errors="replace") as f:
        stderr = f.read()
    if launcher.returncode != 0 or not os.path.exists(result_path):
        return Measured(0.0, 0, launcher.returncode or 127, stdout, stderr)
    with open(result_path) as f:
        result = json.load(f)
    return Measured(result["wall_s"], result["peak_rss_kib"], result["exit_code"], stdout, stderr)


def run_quiet(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """An unmeasured helper command (init, version), its output captured."""
    return subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated on disk, apparent bytes) of a tree, each inode once, like ``du -s``."""
    seen: set[tuple[int, int]] = set()
    on_disk = apparent = 0
    for dirpath, dirs, names in os.walk(path):
        for name in dirs + names:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            on_disk += st.st_blocks * 512
            apparent += st.st_size
    return on_disk, apparent


def settle() -> None:
    """Flush earlier runs' dirty pages so their writeback does not land in the next measurement."""
    os.sync()
