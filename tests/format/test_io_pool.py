"""The shared read pool: order kept, and reads still done when the interpreter's pools refuse
work (a daemon heartbeat thread reloading the index while the interpreter exits printed
"cannot schedule new futures after shutdown" at the end of a test run)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from repo_format import io_pool


def test_order_is_kept_and_a_pool_that_refuses_work_reads_alone(monkeypatch):
    assert io_pool.parallel_map(lambda x: x * x, range(50)) == [x * x for x in range(50)]
    closed = ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    monkeypatch.setattr(io_pool, "_pool", closed)
    assert io_pool.parallel_map(lambda x: x + 1, range(20)) == list(range(1, 21))
