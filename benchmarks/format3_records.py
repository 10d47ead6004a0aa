"""``python -m benchmarks.format3_records [--files N] [--mib M] [--rounds R]``: what format 3's
convergent content records (SPEC.md section 4a) cost against format 2's, on
filesystem repositories in a temporary directory, the two formats alternately.

1. Sealing alone, per content: 1 KiB and 1 MiB of random bytes (what a new content costs), and
   what identifying a content costs (format 2 hashes its plaintext; format 3 must seal it).
2. First backup of N small files (default 20,000 of 1 KiB).
3. First backup of a large file (default 256 MiB of random bytes).
4. A second host's first backup of the same large file: every chunk deduplicated against the
   first host's records (format 3 seals each chunk to learn its id).
5. The first host's backup of the large file with 1 MiB in its middle changed: format 3 finds
   the unchanged chunks by the seeds of the previous version's references.
6. Restore of the large file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams, RepositoryKeys  # noqa: E402
from repo_format.local_cache import CacheSettings  # noqa: E402
from repo_format.records import records_for  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402

from kdist.restore import Restorer  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402

from benchmarks.dedup_guard import size_arguments  # noqa: E402
from benchmarks.sparse_metadata import write_small_files  # noqa: E402

VERSIONS = (2, 3)


def sealing(rounds: int) -> None:
    keys = RepositoryKeys.generate()
    for size, count in ((1024, 20_000), (1 << 20, 200)):
        data = [os.urandom(size) for _ in range(count)]
        for what in ("seal", "identify"):
            best = {}
            for r in range(rounds):
                for version in VERSIONS[r % 2:] + VERSIONS[:r % 2]:
                    records = records_for(keys, version)
                    call = records.seal if what == "seal" else records.identify
                    start = time.perf_counter()
                    for d in data:
                        call(d, 3)
                    took = (time.perf_counter() - start) / count
                    best[version] = min(best.get(version, took), took)
            print(f"{what} a content of {size} bytes: format 2 {best[2] * 1e6:.1f} us, format 3 {best[3] * 1e6:.1f} us")


def fresh(base: str, version: int) -> str:
    where = os.path.join(base, f"repo-{version}")
    shutil.rmtree(where, ignore_errors=True)
    Repository.create(open_storage(where, create=True), "bench", kdf=KdfParams.weak_for_tests(), version=version).close()
    return where


def backup(where: str, src: str, host: str) -> float:
    repo = Repository.open(open_storage(where), "bench", cache=CacheSettings(enabled=False))
    start = time.perf_counter()
    Uploader(repo, BackupOptions(host=host)).backup(src)
    repo.close()
    return time.perf_counter() - start


def restore(where: str, target: str) -> float:
    from kdist.snapshot import list_snapshots

    shutil.rmtree(target, ignore_errors=True)
    repo = Repository.open(open_storage(where), "bench", cache=CacheSettings(enabled=False))
    snap = list_snapshots(repo.manifests)[0]
    start = time.perf_counter()
    Restorer(repo).restore(snap, target)
    took = time.perf_counter() - start
    repo.close()
    return took


def backups(base: str, files: int, mib: int, rounds: int) -> None:
    small, large = os.path.join(base, "small"), os.path.join(base, "large")
    write_small_files(small, files)
    os.makedirs(large)
    with open(os.path.join(large, "disk.img"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    rows: dict[str, dict[int, float]] = {}

    def best(what: str, version: int, took: float) -> None:
        row = rows.setdefault(what, {})
        row[version] = min(row.get(version, took), took)

    for r in range(rounds):
        for version in VERSIONS[r % 2:] + VERSIONS[:r % 2]:
            best(f"first backup of {files} files of 1 KiB", version, backup(fresh(base, version), small, "a"))
            where = fresh(base, version)
            best(f"first backup of {mib} MiB", version, backup(where, large, "a"))
            best(f"a second host's first backup of the same {mib} MiB", version, backup(where, large, "b"))
            best(f"restore of the {mib} MiB", version, restore(where, os.path.join(base, "restored")))
            with open(os.path.join(large, "disk.img"), "r+b") as f:  # a changed middle, a new mtime
                f.seek(mib // 2 << 20)
                f.write(os.urandom(1 << 20))
            best(f"the first host's backup of the {mib} MiB, 1 MiB changed", version, backup(where, large, "a"))
    for what, by in rows.items():
        print(f"{what}, best of {rounds}: format 2 {by[2]:.2f} s, format 3 {by[3]:.2f} s")


def main() -> None:
    args = size_arguments()
    sealing(args.rounds)
    base = tempfile.mkdtemp(prefix="kdist-bench-format3-")
    try:
        backups(base, args.files, args.mib, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
