"""Maintenance on Ray: content GC's walk and its plan shared out among actors (``--ray``).

The driver (the ``kdist gc run`` process) lists the snapshots and walks their trees breadth first
until enough subtrees wait for every actor to take several; the actors walk those subtrees, each
directory once per actor, and send back the sorted 64-bit keys of what they reached. For the
plan, each actor reads the same index blobs the driver's plan uses (by name, through its node's
local cache) and plans its share of the key ranges from the reached keys of those ranges and the
driver's pack listing; the driver stores the rows, then executes the plan itself. So the plan is
the one a single process makes from the same index, snapshots and listing: execution, its
re-validation and every safety check are unchanged.

Actors open the repository themselves, with a password they read on their node (an environment
variable or a file), as backup workers do: no password and no key passes through Ray. Nothing
here is imported without ``--ray``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.repository import Repository

from kdist.allocator import tune_process
from kdist.access import RepositorySpec
from kdist.distributed.connect import RayUnavailable, connect
from kdist.distributed.workers import open_on_node, peak_rss_mb
from kdist.gc.content_gc import IncompleteWalk, plan_range
from kdist.gc.reachable import KEY_BYTES
from kdist.snapshot import SNAPSHOT_LABEL, Snapshot
from kdist.tree import TreeWalker, directory_contents, reached_contents

SUBTREES_PER_ACTOR = 16  # subtrees the driver's walk hands each actor: sizes differ, so several
RANGES_PER_TASK = 4  # key ranges an actor plans per request: the driver stores each reply at once


class RaySetupError(RayUnavailable):
    """Ray cannot be reached or started, or the actors cannot open the repository."""


class MaintenanceWorker:
    """One actor: opens the repository on its node on first use."""

    def __init__(self, spec: RepositorySpec):
        tune_process()
        self._spec = spec
        self._repo: Repository | None = None
        self._walker: TreeWalker | None = None

    def _open(self) -> Repository:
        if self._repo is None:
            self._repo = open_on_node(self._spec)
            self._walker = TreeWalker.over(self._repo.objects, max_depth=None)
        return self._repo

    def open(self) -> str:
        """Open the repository and load the index now (while the driver lists and reads)."""
        try:
            self._open().contents.refresh_index()
            return ""
        except KdistError as exc:
            return f"{type(exc).__name__}: {exc}"

    def walk(self, subtrees: list[str]) -> dict:
        """The keys of every content the subtrees reach (this actor walks each directory once)."""
        try:
            repo = self._open()
            repo.contents.refresh_index()  # at least as new as the driver's, which listed the snapshots first
            started = clock.monotonic()
            raw = bytearray()  # 8 bytes a content, not a bytes object
            for oid in subtrees:
                for c in reached_contents(self._walker, repo.objects, oid):
                    raw += c[:KEY_BYTES]
            keys = np.unique(np.frombuffer(raw, dtype=">u8").astype(np.uint64))
            return {"keys": keys, "error": "", "pid": os.getpid(), "peak_rss_mb": peak_rss_mb(),
                    "subtrees": len(subtrees), "seconds": round(clock.monotonic() - started, 3)}
        except KdistError as exc:
            return {"keys": np.zeros(0, np.uint64), "error": f"{type(exc).__name__}: {exc}"}

    def plan(self, names: list[str], packs: int, memory_limit: int, ranges: list[tuple], written: np.ndarray,
             now: float, min_content_age: float) -> dict:
        """Plan ``ranges`` ((lo, hi, reached keys) each) over the index blobs ``names``."""
        try:
            repo = self._open()
            from repo_format.index_scan import IndexScan

            scan = IndexScan(repo.contents.epochs.read_blobs(names), memory_limit=memory_limit)
            if len(scan.packs) != packs:
                raise KdistError("the index blobs read here name other packs than the driver's")
            return {"ranges": [plan_range(scan.winners(lo, hi), reached, written, now, min_content_age)
                               for lo, hi, reached in ranges], "error": ""}
        except KdistError as exc:
            return {"ranges": [], "error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        repo, self._repo = self._repo, None
        if repo is not None:
            repo.close()


@dataclass
class RayPool:
    """The driver's side: ``actors`` maintenance workers on the Ray cluster at ``address``
    (``None``: ``RAY_ADDRESS``, else a new local Ray)."""

    spec: RepositorySpec
    actors: int = 2
    address: str | None = None
    cpus_per_actor: float = 1.0

    def __post_init__(self):
        import ray

        self._ray = ray
        self._started = False
        try:
            self._started = connect(self.address)
        except RayUnavailable as exc:
            raise RaySetupError(str(exc)) from None
        remote = ray.remote(num_cpus=self.cpus_per_actor)(MaintenanceWorker)
        self._workers = [remote.remote(self.spec) for _ in range(self.actors)]
        self._opened = [w.open.remote() for w in self._workers]  # meanwhile the driver loads its index
        self.walked: list[dict] = []

    # ---- the walk ------------------------------------------------------------------------------
    def reach(self, repo: Repository, reach) -> int:
        records = repo.manifests.find(type=SNAPSHOT_LABEL)
        repo.contents.refresh_index()
        walker = TreeWalker.over(repo.objects, max_depth=None)
        try:
            roots = [Snapshot.from_record(r).root for r in records]
            read, waiting = walker.split(roots, SUBTREES_PER_ACTOR * len(self._workers))
            for d in read:
                reach.update(directory_contents(repo.objects, d))
        except KdistError as exc:
            raise IncompleteWalk(f"the snapshots cannot be walked ({exc}); refusing to collect garbage") from exc
        for error in self._ray.get(self._opened):
            if error:
                raise IncompleteWalk(f"an actor could not open the repository ({error}); refusing to collect garbage")
        shares = [waiting[i::len(self._workers)] for i in range(len(self._workers))]
        refs = [w.walk.remote(share) for w, share in zip(self._workers, shares) if share]
        self.walked = []
        for out in self._ray.get(refs):
            if out["error"]:
                raise IncompleteWalk(f"an actor could not walk its subtrees ({out['error']}); "
                                     "refusing to collect garbage")
            reach.add_keys(out["keys"])
            self.walked.append({k: v for k, v in out.items() if k != "keys"} | {"keys": len(out["keys"])})
        return len(records)

    # ---- the plan ------------------------------------------------------------------------------
    def plan_ranges(self, index, scan, reach, written: np.ndarray, now: float, min_content_age: float):
        """Yield ``plan_range``'s tuples in key order; actors plan, a few ranges a request."""
        if index.names is None:
            raise KdistError("--ray needs an index assembled from the repository's listing")
        bounds = scan.bounds()
        tasks = []
        for i in range(0, len(bounds), RANGES_PER_TASK):
            chunk = [(lo, hi, reach.between(lo, hi)) for lo, hi in bounds[i:i + RANGES_PER_TASK]]
            w = self._workers[(i // RANGES_PER_TASK) % len(self._workers)]
            tasks.append(w.plan.remote(index.names, len(scan.packs), scan.memory_limit, chunk, written, now,
                                       min_content_age))
        for ref in tasks:
            out = self._ray.get(ref)
            if out["error"]:
                raise KdistError(f"an actor could not plan its key ranges: {out['error']}")
            yield from out["ranges"]

    def close(self) -> None:
        for w in self._workers:
            try:
                self._ray.get(w.close.remote())
            except Exception:  # an actor that died has nothing to retire
                pass
            self._ray.kill(w)
        self._workers = []
        if self._started:
            self._ray.shutdown()
