"""``python -m benchmarks.sparse_metadata [--files N]``: what issue 17's metadata work costs and
saves, on a filesystem repository in a temporary directory.

1. A 1 GiB sparse image holding 4 KiB of data: backup and restore time, bytes read, and the
   restored file's disk use (holes are found with SEEK_DATA and restored as holes).
2. N small files (default 20,000, 1 KiB each): first backup with the extended attributes read
   (one listxattr per file and directory) and with that call skipped, alternating, five times each:
   the per-file cost of recording attributes.
3. As many names, half of them hard links of the others: restore time with links made as links,
   beside the restore of as many separate files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import open_storage  # noqa: E402

import kdist.uploader as uploader  # noqa: E402
from kdist.restore import Restorer  # noqa: E402
from kdist.uploader import BackupOptions, Uploader  # noqa: E402


ROUNDS = 10  # first backups, alternately with and without reading attributes


def fresh_repo(where: str) -> Repository:
    shutil.rmtree(where, ignore_errors=True)
    return Repository.create(open_storage(where, create=True), "bench", kdf=KdfParams.weak_for_tests())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def sparse(base: str) -> None:
    src = os.path.join(base, "sparse-src")
    os.makedirs(src)
    with open(os.path.join(src, "disk.img"), "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(os.urandom(4096))
    repo = fresh_repo(os.path.join(base, "repo-sparse"))
    up = Uploader(repo, BackupOptions())
    t_backup, snap = timed(lambda: up.backup(src))
    t_restore, _ = timed(lambda: Restorer(repo).restore(snap, os.path.join(base, "sparse-dst")))
    st = os.stat(os.path.join(base, "sparse-dst", "disk.img"))
    print(f"sparse 1 GiB image, 4 KiB of data: backup {t_backup:.2f} s reading {up.stats.bytes_read} B; "
          f"restore {t_restore:.2f} s, {st.st_blocks * 512} B on disk")
    repo.close()


def write_small_files(src: str, n: int) -> None:
    """``n`` files of 1 KiB of random bytes, a thousand to a directory."""
    for i in range(n):
        d = os.path.join(src, f"d{i // 1000:03}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:06}"), "wb") as f:
            f.write(os.urandom(1024))


def small_files(base: str, n: int) -> None:
    src = os.path.join(base, "small-src")
    write_small_files(src, n)
    real = uploader.read_xattrs
    rows = {"attributes read": [], "attributes skipped": []}
    for round_ in range(ROUNDS):  # alternate, so disk state and caches weigh on both alike
        skip = round_ % 2 == 1
        uploader.read_xattrs = (lambda *a, **k: []) if skip else real
        repo = fresh_repo(os.path.join(base, "repo-small"))
        try:
            seconds, _ = timed(lambda: Uploader(repo, BackupOptions()).backup(src))
        finally:
            uploader.read_xattrs = real
            repo.close()
        rows["attributes skipped" if skip else "attributes read"].append(seconds)
    for what, times in rows.items():
        print(f"{n} files of 1 KiB, first backup, {what}: {min(times):.2f} s best of {len(times)} "
              f"({min(times) / n * 1e6:.0f} us a file)")
    links = os.path.join(base, "links-src")
    os.makedirs(links)
    for i in range(n // 2):
        p = os.path.join(links, f"f{i:06}")
        with open(p, "wb") as f:
            f.write(os.urandom(1024))
        os.link(p, os.path.join(links, f"g{i:06}"))
    repo = fresh_repo(os.path.join(base, "repo-links"))
    linked = Uploader(repo, BackupOptions()).backup(links)
    plain = Uploader(repo, BackupOptions()).backup(src)  # as many names, none linked
    times = {"linked": [], "plain": []}
    for round_ in range(4):  # alternate: restores right after deletions run slower on ext4
        what, snap = ("linked", linked) if round_ % 2 == 0 else ("plain", plain)
        dst = os.path.join(base, "restored")
        shutil.rmtree(dst, ignore_errors=True)
        seconds, stats = timed(lambda: Restorer(repo).restore(snap, dst))
        times[what].append((seconds, stats.hardlinks))
    (t_linked, made), (t_plain, _) = min(times["linked"]), min(times["plain"])
    print(f"restore of {n} names: {n // 2} hard-link pairs {t_linked:.2f} s ({made} made as links), "
          f"{n} separate files {t_plain:.2f} s (best of 2 each, alternating)")
    repo.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="kdist-bench-")
    try:
        sparse(base)
        small_files(base, args.files)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
