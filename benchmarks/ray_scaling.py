"""Scaling of the sharded backup on Ray: the same data backed up by 1 and by 2 actors.

    python -m benchmarks.ray_scaling [--files 24] [--mib 16] [--rounds 2] [--repo-parent /dev/shm]

Generates a seeded tree (files of 4 KiB blocks, each ~60% compressible), then, in a local Ray
with 2 CPUs, backs it up into a fresh filesystem repository for each configuration, interleaved
over rounds: 1 actor x 1 thread, 2 actors x 1 thread, 1 actor x 2 threads. Reports the median
wall time, throughput, speedup over one actor, and every actor's peak RSS; then the driver
overhead: the wall time of a sharded backup of a one-file tree. Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
os.environ.setdefault("KDIST_PASSWORD", "bench")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.filesystem import FilesystemStorage  # noqa: E402

from kdist.access import RepositorySpec  # noqa: E402
from kdist.distributed.driver import run_shard  # noqa: E402
from kdist.uploader import BackupOptions  # noqa: E402

CONFIGS = [("1 actor x 1 thread", 1, 1), ("2 actors x 1 thread", 2, 1), ("1 actor x 2 threads", 1, 2)]


def make_tree(root: str, files: int, mib: int, seed: int = 7) -> int:
    rng = np.random.default_rng(seed)
    block = 4096
    for i in range(files):
        d = os.path.join(root, f"d{i % 4}")
        os.makedirs(d, exist_ok=True)
        blocks = rng.integers(0, 256, size=(mib * 256, block), dtype=np.uint8)
        blocks[:, int(block * 0.4):] = 0  # 60% of each block compresses away
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(blocks.tobytes())
    return files * mib << 20


def one_run(tree: str, actors: int, threads: int, repo_parent: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdist-bench-repo-", dir=repo_parent) as repo_dir:
        Repository.create(FilesystemStorage(repo_dir, create=True), "bench", kdf=KdfParams.weak_for_tests()).close()
        t = time.perf_counter()
        s = run_shard(RepositorySpec(repo_dir), tree, BackupOptions(workers=threads), "bench", actors, 1, False)
        wall = time.perf_counter() - t
        assert s.status == "ok", s.error
        return {"wall": wall, "rss_mb": [round(p["peak_rss_mb"]) for p in s.nodes], "new_bytes": s.totals["new_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repo-parent", default=None, help="where the repositories go (e.g. /dev/shm: no disk)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    ray.init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="kdist-bench-tree-") as tmp:
        tree = os.path.join(tmp, "tree")
        size = make_tree(tree, args.files, args.mib)
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every configuration
            for name, actors, threads in CONFIGS:
                results[name].append(one_run(tree, actors, threads, args.repo_parent))
        tiny = os.path.join(tmp, "tiny")
        os.makedirs(tiny)
        with open(os.path.join(tiny, "one"), "wb") as f:
            f.write(b"x" * 1000)
        overhead = [one_run(tiny, 1, 1)["wall"] for _ in range(3)]
    ray.shutdown()
    base = statistics.median(r["wall"] for r in results[CONFIGS[0][0]])
    print(f"sharded backup of {args.files} x {args.mib} MiB = {size / 2**20:.0f} MiB, median of {args.rounds} rounds")
    for name, _, _ in CONFIGS:
        wall = statistics.median(r["wall"] for r in results[name])
        peak = max(max(r["rss_mb"]) for r in results[name])
        print(f"  {name:22s} {wall:6.2f} s  {size / wall / 1e6:6.1f} MB/s  speedup {base / wall:4.2f}x  "
              f"peak RSS per actor {peak} MiB")
    print(f"driver overhead (one 1 KB file, median of 3): {statistics.median(overhead):.2f} s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"size": size, "results": results, "overhead": overhead}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
