"""Readers beside maintenance: a compaction that deletes the manifest blobs a reader just listed
makes it list again after a backoff, and see every record; a set that never stops changing is
the documented retryable exit 21, never an unexpected failure (the night a soak lost a backup to
"the manifests kept changing while they were being read", exit 1)."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.usefixtures("weak_kdf")

from kdist.cli import exit_codes
from kdist_trees import PASSWORD
from repo_format import changing, clock
from repo_format import constants as C
from repo_format.crypto import KdfParams
from repo_format.errors import BlobNotFound, ConcurrentChange
from repo_format.repository import Repository
from repo_format.storage import MemoryStorage, open_storage
from repo_format.storage.wrappers import StorageWrapper


@pytest.fixture
def weak_kdf(monkeypatch):
    monkeypatch.setenv("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")


@pytest.fixture
def slept():
    waits: list[float] = []
    clock.set_sleep(waits.append)
    yield waits
    clock.set_sleep(None)


class CompactsWhileRead(StorageWrapper):
    """Between a reader's listing of the manifest blobs and its first read of one, maintenance
    (another client on the same bucket) compacts them to the end: both phases, so the listed
    blobs are deleted."""

    def __init__(self, inner, maintenance: Repository):
        super().__init__(inner)
        self.maintenance = maintenance
        self.listed = False
        self.deleted = None
        self._hook = threading.Lock()  # the reader reads blobs from several threads

    def list(self, prefix=""):
        self.listed = self.listed or prefix == C.MANIFEST_PREFIX
        return self.inner.list(prefix)

    def get(self, name, offset=0, length=-1):
        if self.listed and name.startswith(C.MANIFEST_PREFIX):
            with self._hook:
                if self.deleted is None:
                    now = max(m.timestamp for m in self.inner.list(C.MANIFEST_PREFIX))
                    self.maintenance.manifests.compact(now + 100, settle=1.0, min_blobs=2)  # the merged blob
                    self.deleted = self.maintenance.manifests.compact(now + 200, settle=1.0, min_blobs=2)
        return self.inner.get(name, offset, length)


def test_a_reader_racing_manifest_compaction_on_s3_lists_again_and_sees_every_record(s3_bucket, slept):
    endpoint, bucket = s3_bucket
    location = f"s3://{bucket}/repo"
    Repository.create(open_storage(location, endpoint), PASSWORD, kdf=KdfParams.weak_for_tests()).close()
    writer = Repository.open(open_storage(location, endpoint), PASSWORD)
    ids = sorted(writer.manifests.put({"type": "test", "n": str(i)}, b"payload").id for i in range(12))
    writer.close()

    maintenance = Repository.open(open_storage(location, endpoint), PASSWORD)
    racing = CompactsWhileRead(open_storage(location, endpoint), maintenance)
    reader = Repository.open(racing, PASSWORD)
    found = sorted(r.id for r in reader.manifests.find(type="test"))
    assert racing.deleted >= 12  # the blobs it had listed were gone when it read them
    assert found == ids  # listed again, from the compacted blob
    assert len(slept) == 1 and changing.BASE_DELAY / 2 <= slept[0] <= changing.BASE_DELAY
    reader.close()
    maintenance.close()


class AlwaysGone(StorageWrapper):
    """Every manifest blob listed is gone by the time it is read: a set that never settles."""

    def get(self, name, offset=0, length=-1):
        if name.startswith(C.MANIFEST_PREFIX):
            raise BlobNotFound(name)
        return self.inner.get(name, offset, length)


def test_a_set_that_keeps_changing_is_the_retryable_exit_21_after_backing_off(slept):
    storage = MemoryStorage()
    repo = Repository.create(storage, PASSWORD, kdf=KdfParams.weak_for_tests())
    repo.manifests.put({"type": "test"}, b"x")
    repo.close()
    reader = Repository.open(AlwaysGone(storage), PASSWORD)
    with pytest.raises(ConcurrentChange, match="the manifest blobs kept changing .* run the command again") as exc:
        reader.manifests.find(type="test")
    assert exit_codes.exit_code_for(exc.value) == exit_codes.CONCURRENT_CHANGE == 21
    # seven waits between eight attempts, doubling up to the cap, each jittered in its upper half
    assert len(slept) == changing.ATTEMPTS - 1
    caps = [min(changing.MAX_DELAY, changing.BASE_DELAY * 2 ** i) for i in range(changing.ATTEMPTS - 1)]
    assert all(cap / 2 <= w <= cap for w, cap in zip(slept, caps)) and sum(slept) >= sum(caps) / 2
