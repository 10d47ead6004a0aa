"""``--limit-upload`` / ``--limit-download``: the bytes a process moves per second, on a fake clock
(no wall-clock timing decides a test)."""

from __future__ import annotations

import pytest

from kdist import access
from repo_format.storage import MemoryStorage
from repo_format.storage.wrappers import ThrottledStorage, throttled_storage

MB = 1_000_000


class FakeTime:
    def __init__(self):
        self.t = 0.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds


def test_uploads_average_the_limit_after_a_one_second_burst():
    clock = FakeTime()
    storage = ThrottledStorage(MemoryStorage(), upload=2 * MB, monotonic=clock.monotonic, sleep=clock.sleep)
    for i in range(100):
        storage.put(f"b{i}", b"x" * MB)
    # the first second's worth (2 MB) goes at once, the other 98 MB at 2 MB/s
    assert clock.slept == pytest.approx(49.0)
    assert 100 * MB / clock.t == pytest.approx(2 * MB, rel=0.05)
    assert clock.t == clock.slept  # it only ever waited for the limit


def test_downloads_are_limited_by_what_came_back_and_idle_time_earns_no_more_than_a_burst():
    clock = FakeTime()
    inner = MemoryStorage()
    inner.put("big", b"y" * (4 * MB))
    storage = ThrottledStorage(inner, download=1 * MB, monotonic=clock.monotonic, sleep=clock.sleep)
    assert storage.get("big", 0, MB) == b"y" * MB  # 1 MB: within the first second's credit
    assert clock.slept == 0
    storage.get("big")  # 4 MB with no credit left: 4 s to pay back
    assert clock.slept == pytest.approx(4.0)
    clock.t += 3600  # an hour idle earns one second's worth, not an hour's
    storage.get("big")
    assert clock.slept == pytest.approx(4.0 + 3.0)
    storage.put("p", b"z" * (10 * MB))  # uploads are not limited here
    assert clock.slept == pytest.approx(7.0)


def test_a_multi_process_backup_shares_the_limit():
    clock = FakeTime()
    storage = ThrottledStorage(MemoryStorage(), upload=8 * MB, monotonic=clock.monotonic, sleep=clock.sleep)
    storage.share(4)
    assert storage.upload.rate == 2 * MB and storage.download is None


def test_the_options_and_variables_reach_every_storage_stack(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    assert throttled_storage(access.make_storage(str(tmp_path / "r"), None)) is None  # no limit: no wrapper
    access.set_limit("upload", 2.5)
    monkeypatch.setenv("KDIST_LIMIT_DOWNLOAD", "0.5")
    t = throttled_storage(access.make_storage(str(tmp_path / "r"), None))
    assert t.upload.rate == 2.5 * MB and t.download.rate == 0.5 * MB
    spec = access.RepositorySpec(str(tmp_path / "r"))  # what a Ray actor gets: the driver's limits
    assert spec.limits == (2.5 * MB, 0.5 * MB)
    monkeypatch.setenv("KDIST_LIMIT_DOWNLOAD", "fast")
    with pytest.raises(access.AccessError, match="KDIST_LIMIT_DOWNLOAD must be a number of MB/s"):
        access.transfer_limits()


def test_small_requests_never_wait_and_the_next_big_one_pays_for_them():
    """A session heartbeat must not wait behind the packs' debt (its session would lapse)."""
    clock = FakeTime()
    storage = ThrottledStorage(MemoryStorage(), upload=1 * MB, monotonic=clock.monotonic, sleep=clock.sleep)
    storage.put("pack", b"p" * (3 * MB))  # 2 s of debt after the second of credit
    assert clock.slept == pytest.approx(2.0)
    for i in range(10):
        storage.put(f"heartbeat{i}", b"h" * 1000)  # no wait at all
    assert clock.slept == pytest.approx(2.0)
    storage.put("pack2", b"p" * MB)  # pays for itself and the 10 kB before it
    assert clock.slept == pytest.approx(2.0 + 1.01)


def test_small_requests_alone_still_keep_to_the_limit_past_a_bounded_debt():
    clock = FakeTime()
    storage = ThrottledStorage(MemoryStorage(), upload=1 * MB, monotonic=clock.monotonic, sleep=clock.sleep)
    for i in range(400):  # 400 x 60 kB = 24 MB, each under the small size
        storage.put(f"s{i}", b"s" * 60_000)
    # they ran up at most MAX_DEBT seconds of debt, then waited: ~24 s of data over ~13-14 s
    assert 24 - 1 - storage.upload.MAX_DEBT - 0.1 <= clock.slept <= 24
