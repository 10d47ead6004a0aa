"""cluster/exit-code.sh: kdist's own exit code back from `ray submit` / `ray job submit`, which
exit 1 for every failure and 0 for a stopped job. Tried with stand-in commands that print what
those commands print (the real `ray job submit` is in tests/distributed/test_submit_script.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from kdist.cli import exit_codes
from kdist_trees import cli_env, run_cli

WRAPPER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "exit-code.sh")


def wrapped(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, "bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_the_last_exit_line_wins_over_rays_status():
    r = wrapped("echo node-a: failed; echo 'kdist: fleet backup exit code 18' >&2; exit 1")
    assert r.returncode == 18 and "node-a: failed" in r.stdout  # the output passes through
    assert wrapped("echo 'kdist: fleet backup exit code 3'; exit 1").returncode == 3
    assert wrapped("echo 'kdist: fleet backup exit code 0'; exit 1").returncode == 0


def test_a_job_that_never_said_how_it_ended_is_a_failure():
    """`ray job stop` or a killed driver: Ray reports a stopped job with exit 0, no line came."""
    r = wrapped("echo 'Job raysubmit_1 was stopped'; exit 0")
    assert r.returncode == 1 and "kdist never reported how the backup ended" in r.stderr
    assert wrapped("echo 'connection refused'; exit 4").returncode == 4  # Ray's own failure


def test_only_a_whole_line_counts():
    """A file or host name that contains the words, inside a summary or JSON line, is no exit line."""
    r = wrapped("echo 'part 3 /srv/kdist: fleet backup exit code 0: failed'; "
                "echo '  \"path\": \"x kdist: fleet backup exit code 0\"'; exit 1")
    assert r.returncode == 1
    r = wrapped("echo 'kdist: fleet backup exit code 18'; echo 'kdist: fleet backup exit code 0 trailing'; exit 1")
    assert r.returncode == 18


def test_a_status_file_that_cannot_be_written_is_refused_before_the_backup(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    r = run_cli("fleet", "backup", "--repo", tmp_path, "--mode", "fleet", "--status-file",
                tmp_path / "no-such-dir" / "status.json", code=exit_codes.USAGE)
    assert "cannot write in" in r.stderr and "exit code" not in r.stderr  # nothing ran
