"""``python -m benchmarks.dedup_guard [--files N] [--mib M] [--rounds R]``: what deduplicating
only against vouched places (``repo_format/vouched.py``, SECURITY.md item 12) costs, on a
filesystem repository in a temporary directory, the guard on and off alternately.

1. First backup of N small files (default 20,000 of 1 KiB): every record is the writer's own,
   so the guard's cost is one ``stat`` per pack and one row per content in ``vouched.sqlite``.
2. A changed large file (default 256 MiB, 1 MiB rewritten in the middle): the incremental
   backup deduplicates every unchanged chunk against the previous run's records, which the local
   cache remembers (a lookup each, no read), and, without the local cache, reads each back once.
3. A second host backing up the same large file for the first time: every chunk is another
   writer's, read back once (then remembered).
4. A copy of the small files under another path of the same host: every file deduplicated
   against the host's own packs, each vouched for by the local cache's row of its pack.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.local_cache import CacheSettings  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402

from kdist.uploader import BackupOptions, Uploader  # noqa: E402

from benchmarks.sparse_metadata import write_small_files  # noqa: E402


def open_repo(where: str, cache: str | None, guard: bool) -> Repository:
    settings = CacheSettings(base=Path(cache)) if cache else CacheSettings(enabled=False)
    repo = Repository.open(open_storage(where), "bench", cache=settings)
    repo.contents.guard.enabled = guard
    return repo


def backup(where: str, cache: str | None, guard: bool, src: str, host: str = "a") -> tuple[float, dict]:
    repo = open_repo(where, cache, guard)
    start = time.perf_counter()
    Uploader(repo, BackupOptions(host=host)).backup(src)
    repo.close()
    took = time.perf_counter() - start
    s = repo.contents.guard.stats
    return took, {"read": s.read, "remembered": s.remembered, "written": repo.contents.stats.contents_written}


def fresh(base: str, name: str) -> str:
    where = os.path.join(base, name)
    shutil.rmtree(where, ignore_errors=True)
    Repository.create(open_storage(where, create=True), "bench", kdf=KdfParams.weak_for_tests()).close()
    return where


def small_files(base: str, n: int, rounds: int) -> None:
    src = os.path.join(base, "small")
    write_small_files(src, n)
    times = {True: [], False: []}
    for r in range(rounds):
        for guard in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
            cache = os.path.join(base, "cache-small")
            shutil.rmtree(cache, ignore_errors=True)
            took, _ = backup(fresh(base, "repo-small"), cache, guard, src)
            times[guard].append(took)
    on, off = min(times[True]), min(times[False])
    print(f"first backup of {n} files of 1 KiB, best of {rounds}: guard on {on:.2f} s, off {off:.2f} s "
          f"({(on - off) / n * 1e6:+.1f} us per file)")


def copied_small_files(base: str, n: int, rounds: int) -> None:
    """A copy of the small files under another path of the same host: no previous snapshot, so
    every file's content is deduplicated against the host's own packs (remembered in the local
    cache, one row per pack)."""
    src, copy = os.path.join(base, "small"), os.path.join(base, "small-copy")
    if not os.path.isdir(copy):
        shutil.copytree(src, copy)
    times = {True: [], False: []}
    for r in range(rounds):
        for guard in (r % 2 == 0, r % 2 == 1):
            where = fresh(base, "repo-copy")
            cache = os.path.join(base, "cache-copy")
            shutil.rmtree(cache, ignore_errors=True)
            backup(where, cache, guard, src)
            took, stats = backup(where, cache, guard, copy)
            times[guard].append((took, stats))
    (on, s_on), (off, _s) = min(times[True], key=lambda x: x[0]), min(times[False], key=lambda x: x[0])
    print(f"backup of a copy of the {n} files under another path, best of {rounds}: guard on {on:.2f} s "
          f"({s_on['remembered']} remembered, {s_on['read']} read back), off {off:.2f} s "
          f"({(on - off) / n * 1e6:+.1f} us per file)")


def large_file(base: str, mib: int, rounds: int) -> None:
    src = os.path.join(base, "large")
    os.makedirs(src)
    path = os.path.join(src, "disk.img")
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    results: dict[str, list] = {"cache": [], "no cache": [], "off": []}
    for r in range(rounds):
        for mode in ("cache", "no cache", "off")[r % 3:] + ("cache", "no cache", "off")[:r % 3]:
            where = fresh(base, "repo-large")
            cache = os.path.join(base, f"cache-large-{r}-{mode}")
            backup(where, cache, True, src)  # the first backup, remembered in the cache
            with open(path, "r+b") as f:  # a changed middle, a new mtime
                f.seek(mib // 2 << 20)
                f.write(os.urandom(1 << 20))
            took, stats = backup(where, cache if mode == "cache" else None, mode != "off", src)
            results[mode].append((took, stats))
            shutil.rmtree(cache, ignore_errors=True)
    for mode, runs in results.items():
        took, stats = min(runs, key=lambda x: x[0])
        print(f"incremental backup of a {mib} MiB file, 1 MiB changed, guard {'on, ' + mode if mode != 'off' else 'off'}: "
              f"{took:.2f} s (places read back {stats['read']}, remembered {stats['remembered']}, "
              f"contents written {stats['written']})")
    times = {True: [], False: []}
    for r in range(rounds):
        for guard in (r % 2 == 0, r % 2 == 1):
            where = fresh(base, "repo-large")
            backup(where, None, True, src, host="a")
            took, stats = backup(where, os.path.join(base, f"cache-b-{r}-{guard}"), guard, src, host="b")
            times[guard].append((took, stats))
    (on, s_on), (off, _s) = min(times[True], key=lambda x: x[0]), min(times[False], key=lambda x: x[0])
    print(f"a second host's first backup of the same {mib} MiB: guard on {on:.2f} s (read back {s_on['read']} "
          f"places), off {off:.2f} s")


def size_arguments() -> argparse.Namespace:
    """``--files``, ``--mib`` and ``--rounds``, as this benchmark and ``format3_records`` take them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args()


def main() -> None:
    args = size_arguments()
    base = tempfile.mkdtemp(prefix="kdist-bench-guard-")
    try:
        small_files(base, args.files, args.rounds)
        copied_small_files(base, args.files, args.rounds)
        large_file(base, args.mib, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
