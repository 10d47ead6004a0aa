"""What signed manifests cost (format version 2 against 1): `python -m benchmarks.manifest_signing [N]`.

Writes N snapshot records one blob each into a repository in memory, then times a cold `find`
(a new reader: every signature checked once) and a warm one; then the same after a manifest
compaction, whose signed blob vouches for its records. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.manifest import ManifestStore  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402


def _reader(storage, repo) -> ManifestStore:
    return ManifestStore(storage, repo.format.keys.manifest_aead(), "0" * 16, identity=repo.format.identity,
                         unique_id=repo.format.unique_id)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int) -> None:
    for compacted in (False, True):
        for version in (1, 2):
            storage = MemoryStorage()
            repo = Repository.create(storage, "pw", kdf=KdfParams.weak_for_tests(), version=version)
            labels = {"type": "snapshot", "host": "h", "user": "u", "checkpoint": "0"}
            write = _timed(lambda: [repo.manifests.put({**labels, "path": f"/p{i % 50}"}, os.urandom(300))
                                    for i in range(n)])
            if compacted:  # the second run deletes what the first one's blob covers
                repo.manifests.compact(now=time.time() + 10, settle=0.0)
                repo.manifests.compact(now=time.time() + 20, settle=0.0)
            reader = _reader(storage, repo)
            cold = _timed(lambda: reader.find(type="snapshot"))
            warm = _timed(lambda: reader.find(type="snapshot"))
            what = "after compaction" if compacted else f"write {write:.2f} s ({write / n * 1e6:.0f} us a record)"
            print(f"version {version}, {n} records: {what}; cold find {cold:.2f} s, warm find {warm:.2f} s")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
