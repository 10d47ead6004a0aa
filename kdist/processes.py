"""One tree backed up by several local processes (``kdist snapshot create --processes N``).

Why processes: backing up a small file is mostly Python work, which holds the GIL, so the threads
of one process take turns at it; processes use every core. The sharded Ray backup does this
across nodes; this does it on one host without Ray's start-up, which costs seconds.

How:
- The tree's metadata is walked once (``measure_tree``, counting entries: only directories are
  stat'ed) and split into parts as the sharded backup splits it (``kdist.distributed.plan``).
- The processes are forked from the command's process after the repository's keys were derived
  and before it started any thread (``ProcessPool.fork`` refuses otherwise): the keys reach them
  in the memory they inherit, never through argv, the environment, a file or a pipe.
- Each process opens a ``Repository`` of its own over its own copy of the storage
  (``BlobStorage.after_fork``): its own session, packs and index blobs. It backs up the parts it
  is handed with ``Uploader.backup_part``: each part ends with a checkpoint manifest labelled with
  the run and the parent's session (label ``driver``, held from before the first part), which
  keeps what the part stored reachable until the snapshot is published (gc/checkpoints.py).
  Parts go out one at a time to whichever process is free.
- The parent writes the split directories and publishes the snapshot (``publish_parts``): its root
  object is the one a single process writes for the same tree.
- A part that fails fails the backup with the part's own error; a process that dies fails it with
  ``BackupProcessDied``. Nothing is published then; what finished parts stored stays, and the next
  run stores none of it again (deduplication). The run's checkpoints stay until maintenance (or
  ``snapshot forget``) finds the parent's session dead and a later snapshot of the tree.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import secrets
import signal
import threading
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Callable

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.repository import Repository
from repo_format.storage.wrappers import counting_storage

from kdist.distributed.plan import MeasuredTree, measure_tree, parts_totals, plan_tree, publish_parts
from kdist.snapshot import Snapshot, Source, previous_root
from kdist.uploader import BackupOptions, BackupStats, SourceError, Uploader, stat_source

# ``--processes auto``: a tree of fewer entries than this is backed up by one process (forking,
# planning and publishing the parts cost more than they save), and each process gets at least
# this many entries.
AUTO_MIN_ENTRIES = 20_000
AUTO_MAX_PROCESSES = 16
# Parts per process: each part ends with a flush, an index reload and a checkpoint, so fewer
# than Ray's (whose nodes differ more in speed); two still let a process that is done early
# take over the other's second part.
PARTS_PER_PROCESS = 2


class BackupProcessDied(KdistError):
    """A process of a multi-process backup ended without finishing its part (killed, out of memory)."""


def auto_processes(entries: int, cpus: int | None = None) -> int:
    """How many processes ``--processes auto`` uses for a tree of ``entries`` entries."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(cpus, AUTO_MAX_PROCESSES, entries // AUTO_MIN_ENTRIES))


def measure(path: str, options: BackupOptions) -> MeasuredTree:
    """The tree under ``path`` as the plan needs it (``SourceError`` if it cannot be backed up)."""
    root_path, _ = stat_source(path)
    try:
        return measure_tree(root_path, list(options.excludes), options.one_file_system, sizes=False)
    except OSError as exc:
        raise SourceError(f"cannot back up {root_path}: {exc.strerror}") from None


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.exitcode is None:
            try:
                proc.kill()
            except (OSError, ValueError):  # gone meanwhile, or closed
                pass


class ProcessPool:
    """Forked backup processes, each with its own repository, waiting for parts."""

    def __init__(self, repo: Repository, children: list[tuple[multiprocessing.Process, Connection]]):
        self.repo = repo
        self._children = children

    @classmethod
    def fork(cls, repo: Repository, processes: int) -> "ProcessPool":
        if not repo.storage.shared_between_processes:
            raise ValueError(f"{repo.storage.describe()} is not shared between processes")
        from kdist.access import DEADLINE_THREAD, at_deadline

        others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != DEADLINE_THREAD]
        if others:
            # a thread of ours could hold a lock the child needs: fork before any thread starts
            # (the --timeout watchdog only waits, holding nothing a child could need)
            raise RuntimeError("a multi-process backup must fork before the process starts threads")
        import numpy  # noqa: F401  every process searches the index with it: import it once, not in each
        ctx = multiprocessing.get_context("fork")
        children = []
        for _ in range(processes):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child_end, repo), name="kdist-backup", daemon=True)
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
        # --timeout stops the whole backup, not only this process (children not yet reaped only:
        # a reaped child's pid may belong to another process by then)
        at_deadline(lambda: _kill([proc for proc, _ in children]), first=True)
        return cls(repo, children)

    @property
    def size(self) -> int:
        return len(self._children)

    def backup(self, path: str, options: BackupOptions, measured: MeasuredTree | None = None,
               progress: Callable[[BackupStats, str], None] | None = None) -> Snapshot:
        """Back up the tree at ``path`` as one snapshot, as ``Uploader.backup`` would."""
        started = clock.now()
        root_path, st = stat_source(path)
        source = Source.local(root_path, options.host)
        previous = previous_root(self.repo.manifests, source) if options.reuse_previous else None
        measured = measured or measure(root_path, options)
        plan = plan_tree(root_path, list(options.excludes), self.size, options.one_file_system, previous,
                         self.repo.objects, PARTS_PER_PROCESS, measured)
        run = secrets.token_hex(8)
        self.repo.contents.hold_session()  # the parts' checkpoints live as long as it (after the fork: a thread)
        threads = max(2, (os.cpu_count() or 2) // self.size)
        part_options = replace(options, workers=min(options.workers, threads))
        results: dict[int, dict] = {}
        queue = list(range(len(plan.parts)))
        idle = [conn for _, conn in self._children]
        busy: dict[Connection, int] = {}
        while queue or busy:
            while queue and idle:
                conn, i = idle.pop(), queue.pop(0)
                conn.send((plan.parts[i], source, st.st_dev, run, self.repo.session, part_options))
                busy[conn] = i
            for conn in wait(list(busy)):
                i = busy.pop(conn)
                r = self._receive(conn, f"part {i} ({plan.parts[i].path})")
                if r["error"] is not None:
                    raise r["error"]
                results[i] = r
                idle.append(conn)
                if progress is not None:
                    progress(parts_totals(plan, results)[0], "")
        return publish_parts(self.repo, options, source, plan, results, run, started)

    def close(self) -> None:
        """Let every process flush and retire its session, then end; add up their requests. The
        first process that fails to close raises, once every one has ended."""
        failed: KdistError | None = None
        for proc, conn in self._children:
            try:
                conn.send(None)
                r = self._receive(conn, "closing")
                _absorb_requests(self.repo.storage, r["requests"])
                failed = failed or r["error"]
            except KdistError as exc:
                failed = failed or exc
            finally:
                conn.close()
                proc.join()
        self._children = []
        if failed is not None:
            raise failed

    def terminate(self) -> None:
        """Stop every process now (the backup failed or was interrupted)."""
        for proc, conn in self._children:
            conn.close()
            if proc.is_alive():
                proc.terminate()
            proc.join()
        self._children = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    @staticmethod
    def _receive(conn: Connection, what: str) -> dict:
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise BackupProcessDied(f"a backup process died during {what}; nothing was published, and what "
                                    "the finished parts stored is kept for the next run") from None


def _serve(conn: Connection, parent_repo: Repository) -> None:
    """A child's loop: back up each part it receives; ``None`` closes its repository and ends it.
    Runs in a forked process: the parent's repository object is only read for its format (keys)
    and storage, never used."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the parent's to handle: it stops us
    storage = parent_repo.storage
    storage.after_fork()
    repo: Repository | None = None
    last_run = ""
    while True:
        task = conn.recv()
        if task is None:
            break
        part, source, root_dev, run, driver, options = task
        out = {"entries": [], "stats": {}, "error_list": [], "error": None}
        try:
            if repo is None:
                repo = Repository(storage, parent_repo.format, cache=parent_repo.cache_settings)
                # as the parent opened it (kdist.access): a backup passes over unreadable blobs
                repo.skip_unreadable = parent_repo.skip_unreadable
            elif run != last_run:  # a new backup: see what the other processes stored in the last one
                repo.contents.refresh_index()
            last_run = run
            up = Uploader(repo, options)
            out["entries"], out["checkpoint"] = up.backup_part(part, source, root_dev, run, driver)
            out["stats"], out["error_list"] = up.stats.as_dict(), up.error_list
            # the part's checkpoint protects what it refers to until the snapshot is published:
            # the next part's revalidation checks only its own references, not every part's so far
            repo.contents.forget_references()
        except KdistError as exc:
            out["error"] = _portable(exc)
        conn.send(out)
    out = {"error": None, "requests": {}}
    try:
        if repo is not None:
            repo.close()
    except KdistError as exc:
        out["error"] = _portable(exc)
    out["requests"] = _requests(storage)
    conn.send(out)


def _portable(exc: KdistError) -> KdistError:
    """``exc`` if it survives pickling (so the parent exits with its exit code), else its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return KdistError(str(exc))


def _requests(storage) -> dict:
    counting = counting_storage(storage)
    return counting.counts() if counting is not None else {}


def _absorb_requests(storage, counts: dict) -> None:
    counting = counting_storage(storage)
    if counting is not None:
        counting.absorb(counts)
