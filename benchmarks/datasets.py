"""The seeded data sets of the side-by-side benchmark, generated once and cached on disk.

*large*: N files of fio-like data: 4 KiB blocks, each 40% random bytes and 60% zeros (so ~60%
compressible), 40% of the blocks repeating an earlier block of the same file.
*nightly*: the large set after a night: a few percent of its files had some blocks rewritten in
place (same size) and one file was added; only the changed and the added files are stored.
*small*: many 1 KiB random files in nested directories.

Each set lives in a directory named by its parameters; ``.params.json``, written last, marks a
complete set and records what a restore must reproduce (sizes and SHA-256 of sample files).
A set whose marker does not match (another generator version, an interrupted run) is made anew.
This module makes and checks trees; it never runs a backup tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

GENERATOR_VERSION = 1
BLOCK = 4096
RANDOM_BYTES = int(BLOCK * 0.4)  # the rest of each block is zeros: ~60% compressible
DUP_SHARE = 0.4  # share of blocks that repeat an earlier block
NIGHTLY_FILE_SHARE = 0.05  # share of files changed overnight (at least one)
NIGHTLY_BLOCK_SHARE = 0.03  # share of a changed file's blocks rewritten in place
SMALL_FILE_BYTES = 1024
STAMP = ".bench-stamp"  # written last into a working copy: see _stamp
MARKER = ".params.json"
ADDED_NAME = "d0/added.bin"  # the nightly set's new file


@dataclass(frozen=True)
class Sizes:
    large_files: int
    large_mib: int
    small_files: int


SIZES = {
    "full": Sizes(20, 200, 100_000),
    "quick": Sizes(4, 16, 3_000),
    "tiny": Sizes(3, 1, 100),  # for the smoke test
}


@dataclass
class DataSet:
    """A generated tree: ``files`` are relative paths; ``hashes`` SHA-256 of a few sample files."""

    path: str
    files: list[str]
    total_bytes: int
    hashes: dict[str, str] = field(default_factory=dict)


def _large_name(i: int) -> str:
    return f"d{i % 4}/f{i:03d}.bin"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _random_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    blocks = np.zeros((n, BLOCK), dtype=np.uint8)
    blocks[:, :RANDOM_BYTES] = np.frombuffer(rng.bytes(n * RANDOM_BYTES), dtype=np.uint8).reshape(n, RANDOM_BYTES)
    return blocks


def large_file_blocks(seed: int, index: int, mib: int) -> np.ndarray:
    """The blocks of large file ``index``: unique ones, and 40% copies of an earlier block."""
    rng = _rng(seed, 1, index)
    n = mib * (1 << 20) // BLOCK
    source = np.arange(n)
    dup = rng.random(n) < DUP_SHARE
    dup[0] = False
    source[dup] = (rng.random(int(dup.sum())) * np.flatnonzero(dup)).astype(np.int64)  # an index below i
    while True:  # follow copies of copies back to a unique block
        nxt = source[source]
        if np.array_equal(nxt, source):
            break
        source = nxt
    blocks = np.empty((n, BLOCK), dtype=np.uint8)
    blocks[~dup] = _random_blocks(rng, n - int(dup.sum()))
    blocks[dup] = blocks[source[dup]]
    return blocks


def _write(path: str, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb", buffering=0) as f:
        f.write(memoryview(data).cast("B"))
    return hashlib.sha256(data).hexdigest()


def _cached(path: str, params: dict) -> DataSet | None:
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = None
    if marker and marker.get("params") == params:
        return DataSet(path, marker["files"], marker["total_bytes"], marker["hashes"])
    shutil.rmtree(path, ignore_errors=True)
    return None


def _seal(ds: DataSet, params: dict) -> DataSet:
    with open(os.path.join(ds.path, MARKER), "w") as f:
        json.dump({"params": params, "files": ds.files, "total_bytes": ds.total_bytes, "hashes": ds.hashes}, f)
    return ds


def ensure_large(root: str, seed: int, files: int, mib: int) -> DataSet:
    params = {"kind": "large", "version": GENERATOR_VERSION, "seed": seed, "files": files, "mib": mib}
    path = os.path.join(root, f"large-{files}x{mib}M-s{seed}")
    if (ds := _cached(path, params)) is not None:
        return ds
    names = [_large_name(i) for i in range(files)]
    hashes = {}
    for i, name in enumerate(names):
        digest = _write(os.path.join(path, name), large_file_blocks(seed, i, mib))
        if i in (0, files - 1):
            hashes[name] = digest
    return _seal(DataSet(path, names, files * mib << 20, hashes), params)


def nightly_changed(seed: int, files: int) -> list[int]:
    count = max(1, round(files * NIGHTLY_FILE_SHARE))
    return sorted(_rng(seed, 2).choice(files, size=count, replace=False).tolist())


def ensure_nightly(root: str, seed: int, files: int, mib: int) -> DataSet:
    """Only the changed and the added files; ``apply_nightly`` lays them over a copy of the large set."""
    params = {"kind": "nightly", "version": GENERATOR_VERSION, "seed": seed, "files": files, "mib": mib}
    path = os.path.join(root, f"nightly-{files}x{mib}M-s{seed}")
    if (ds := _cached(path, params)) is not None:
        return ds
    names, hashes = [], {}
    for i in nightly_changed(seed, files):
        blocks = large_file_blocks(seed, i, mib)
        rng = _rng(seed, 3, i)
        where = rng.choice(len(blocks), size=max(1, int(len(blocks) * NIGHTLY_BLOCK_SHARE)), replace=False)
        blocks[where] = _random_blocks(rng, len(where))
        names.append(_large_name(i))
        hashes[names[-1]] = _write(os.path.join(path, names[-1]), blocks)
    names.append(ADDED_NAME)
    hashes[ADDED_NAME] = _write(os.path.join(path, ADDED_NAME), large_file_blocks(seed, files, mib))
    return _seal(DataSet(path, names, len(names) * mib << 20, hashes), params)


def small_name(i: int) -> str:
    return f"a{i // 1000:03d}/b{(i // 100) % 10}/f{i:06d}"


def ensure_small(root: str, seed: int, files: int) -> DataSet:
    params = {"kind": "small", "version": GENERATOR_VERSION, "seed": seed, "files": files}
    path = os.path.join(root, f"small-{files}-s{seed}")
    if (ds := _cached(path, params)) is not None:
        return ds
    rng = _rng(seed, 4)
    data = memoryview(rng.bytes(files * SMALL_FILE_BYTES))
    names = [small_name(i) for i in range(files)]
    sample = set(rng.choice(files, size=min(5, files), replace=False).tolist())
    hashes = {}
    for i, name in enumerate(names):
        full = os.path.join(path, name)
        if i % 100 == 0:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb", buffering=0) as f:
            f.write(data[i * SMALL_FILE_BYTES:(i + 1) * SMALL_FILE_BYTES])
        if i in sample:
            hashes[name] = hashlib.sha256(data[i * SMALL_FILE_BYTES:(i + 1) * SMALL_FILE_BYTES]).hexdigest()
    return _seal(DataSet(path, names, files * SMALL_FILE_BYTES, hashes), params)


def make_working_copy(target: str, base: DataSet) -> None:
    """A copy of ``base`` for the tools to back up (the cached set itself is never touched)."""
    shutil.rmtree(target, ignore_errors=True)
    for name in base.files:
        dst = os.path.join(target, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(base.path, name), dst)
    _stamp(target, "base")


def apply_nightly(target: str, nightly: DataSet) -> None:
    """Turn a working copy of the large set into the nightly one: the changed files are rewritten
    in place (same inode, new mtime and ctime), the added one is created."""
    for name in nightly.files:
        shutil.copyfile(os.path.join(nightly.path, name), os.path.join(target, name))
    _stamp(target, "nightly")


def undo_nightly(target: str, base: DataSet, nightly: DataSet) -> None:
    """Put the working copy back to the large set, for the next tool."""
    present = set(base.files)
    for name in nightly.files:
        dst = os.path.join(target, name)
        if name in present:
            shutil.copyfile(os.path.join(base.path, name), dst)
        elif os.path.exists(dst):
            os.unlink(dst)
    _stamp(target, "base")


def _stamp(target: str, text: str) -> None:
    """Write a tiny file last, so it is the newest of the tree: borg does not trust its files cache
    for the newest file of a backup and would otherwise re-read a large file every time."""
    with open(os.path.join(target, STAMP), "w") as f:
        f.write(text + "\n")


def warm(path: str) -> None:
    """Read every file once so the measured run starts with the page cache warm."""
    buf = bytearray(8 << 20)
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def tree_stats(path: str) -> tuple[int, int]:
    """(regular files, their total bytes) below ``path``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            size += st.st_size
    return files, size


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verify_tree(root: str, files: int, total_bytes: int, hashes: dict[str, str]) -> tuple[bool, str]:
    """Check a restored tree: its file count, total size and the sample files' hashes."""
    if not os.path.isdir(root):
        return False, f"{root} is missing"
    got_files, got_bytes = tree_stats(root)
    if (got_files, got_bytes) != (files, total_bytes):
        return False, f"{got_files} files, {got_bytes} bytes; expected {files} files, {total_bytes} bytes"
    for name, digest in sorted(hashes.items()):
        path = os.path.join(root, name)
        if not os.path.isfile(path) or sha256_file(path) != digest:
            return False, f"{name} differs from the source"
    return True, f"{files} files, {total_bytes} bytes, {len(hashes)} sample hashes match"
