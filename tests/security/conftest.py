"""The hostile-host tests' fixtures; the IAM-enforcing S3 (``iam_s3``) is tests/conftest.py's."""

from __future__ import annotations

import pytest


@pytest.fixture
def ticking_time(virtual_time):
    """``virtual_time``, with a monotonic clock that also ticks 0.1 ms at every reading (so that
    durations measured inside one virtual instant are not zero)."""
    from repo_format import clock

    ticks = [0.0]

    def monotonic():
        ticks[0] += 1e-4
        return virtual_time[0] + ticks[0]

    clock.set_monotonic(monotonic)
    return virtual_time
