"""How long `kdist gc run` takes, and how many storage requests it makes, on a big repository.

    python -m benchmarks.gc_scale --contents 100000 [--repo DIR]

Builds a filesystem repository with N small contents (half reachable from one snapshot of
N/2 files in N/200 directories, half garbage), then runs `kdist gc run --json` in a subprocess
and prints its wall time and request counts. Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.filesystem import FilesystemStorage  # noqa: E402

from kdist.snapshot import TYPE_DIR, TYPE_FILE, Entry, Snapshot, Source, encode_directory  # noqa: E402


def build(path: str, n: int) -> None:
    repo = Repository.create(FilesystemStorage(path, create=True), "bench", kdf=KdfParams.weak_for_tests())
    dirs, per_dir = [], 100
    live = n // 2
    for d in range(0, live, per_dir):
        entries = []
        for i in range(d, min(d + per_dir, live)):
            data = i.to_bytes(8, "big") + os.urandom(1016)
            entries.append(Entry(name=f"f{i}", type=TYPE_FILE, size=len(data), oid=repo.objects.write_bytes(data)))
        dirs.append(Entry(name=f"d{d}", type=TYPE_DIR, oid=repo.objects.write_bytes(encode_directory(entries), metadata=True)))
    root = repo.objects.write_bytes(encode_directory(dirs), metadata=True)
    for i in range(live, n):  # garbage: written, never referenced
        repo.contents.write(i.to_bytes(8, "big") + os.urandom(1016))
    repo.flush()
    snap = Snapshot(source=Source("bench", "bench", "/bench"), root=root, start=0, end=time.time())
    repo.manifests.put(snap.labels(), snap.payload())
    repo.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contents", type=int, default=100_000)
    ap.add_argument("--repo", default=None)
    args = ap.parse_args()
    path = args.repo or os.path.join(tempfile.mkdtemp(prefix="kdist-gc-bench-"), "repo")
    t0 = time.monotonic()
    build(path, args.contents)
    built = time.monotonic() - t0
    env = dict(os.environ, KDIST_PASSWORD="bench")
    t1 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "kdist.cli.main", "gc", "run", "--repo", path, "--json"],
                       env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - t1
    if p.returncode != 0:
        print(p.stderr)
        return 1
    out = json.loads(p.stdout)
    print(json.dumps({"contents": args.contents, "build_seconds": round(built, 1), "gc_seconds": round(elapsed, 1),
                      "steps": out["steps"], "requests": out["requests"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
