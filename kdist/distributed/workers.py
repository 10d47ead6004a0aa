"""The Ray actors of a distributed backup: a backup worker per node or per pool slot, and the
progress board they report to.

A worker opens the repository itself, on its own node, with a password it reads there (an
environment variable or a file on that node): neither the password nor any file data ever
passes through Ray. It backs up with the same ``Uploader`` as ``kdist snapshot create``, so a
worker keeps every promise of a single-process backup (checkpoints, revalidation, sessions).
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import threading
from dataclasses import dataclass, field, replace

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.repository import Repository
from repo_format.storage.wrappers import counting_storage

from kdist.access import AccessError, RepositorySpec
from kdist.allocator import tune_process
from kdist.failures import try_record_failure
from kdist.snapshot import Entry, Source, backup_host
from kdist.uploader import BackupOptions, BackupStats, SourceError, TreePart, Uploader

NODE_CONFIG_ENV = "KDIST_NODE_CONFIG"
HOST_LABEL = "kdist-host"  # a Ray node label naming the host in snapshots (else the node's host name)
PROGRESS_EVERY = 1.0  # seconds between two progress reports of one worker


class NodeSetupError(KdistError):
    """A node cannot take part: no password, no paths, an unreadable node config."""


@dataclass
class FleetRequest:
    """What every node backs up, unless its node config file says otherwise."""

    paths: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    node_config: str | None = None  # JSON file on each node: {"paths": [...], "excludes": [...], "host": "..."}
    workers: int = 0  # reader threads per node; 0: the node's CPU count
    jitter: float = 0.0  # seconds: each node waits a random share of it before it starts
    run: str = ""  # the fleet run's id, in the failure records of its nodes


# what a node config may provision besides paths, so that nothing depends on the environment
# the raylet was started with: the password file, the key, the S3 credentials of this node
_PROVISIONS = ("password_file", "key_id", "aws_profile", "aws_shared_credentials_file")


def read_node_config(path: str | None) -> dict:
    """The node's config file (``KDIST_NODE_CONFIG`` on the node wins over ``path``); {} if none."""
    path = os.environ.get(NODE_CONFIG_ENV) or path
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            # it names the password file, the key and the AWS profile (whose credential_process
            # runs a command): whoever may write it may act as this node, so only root or this
            # user may (checked on the file opened, not on a name that could change meanwhile)
            st = os.fstat(f.fileno())
            if st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
                raise NodeSetupError(f"node config {path} on {socket.gethostname()} must be owned by root or the "
                                     "user Ray runs as and writable by no one else (chmod go-w)")
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise NodeSetupError(f"cannot read node config {path} on {socket.gethostname()}: {exc}") from None
    if not isinstance(cfg, dict) or not all(isinstance(p, str) for p in cfg.get("paths", [])):
        raise NodeSetupError(f"node config {path} on {socket.gethostname()} must be an object with a list of paths")
    bad = [k for k in _PROVISIONS if k in cfg and not (isinstance(cfg[k], str) and cfg[k])]
    if bad:
        raise NodeSetupError(f"node config {path} on {socket.gethostname()}: {', '.join(bad)} must be non-empty text")
    return cfg


def provisioned(spec: RepositorySpec, cfg: dict) -> RepositorySpec:
    """``spec`` with what this node's config provisions: its password file and key id win over
    the driver's (the node's own file is the more specific), its AWS profile and credentials file
    go into this actor's environment (boto3 reads them when the storage is opened)."""
    if cfg.get("password_file"):
        spec = replace(spec, password=replace(spec.password, file=cfg["password_file"]))
    if cfg.get("key_id"):
        spec = replace(spec, key_id=cfg["key_id"])
    for key, env in (("aws_profile", "AWS_PROFILE"), ("aws_shared_credentials_file", "AWS_SHARED_CREDENTIALS_FILE")):
        if cfg.get(key):
            os.environ[env] = cfg[key]
    return spec


class ProgressBoard:
    """Latest progress of every worker, keyed by worker; the driver polls it."""

    def __init__(self):
        self.lines: dict[str, dict] = {}
        self.hosts: dict[str, str] = {}  # node id -> the host its snapshots are published as

    def report(self, key: str, line: dict) -> None:
        self.lines[key] = line

    def read(self) -> dict[str, dict]:
        return dict(self.lines)

    def announce(self, node_id: str, host: str) -> None:
        self.hosts[node_id] = host

    def read_hosts(self) -> dict[str, str]:
        return dict(self.hosts)


def open_on_node(spec: RepositorySpec, **kwargs) -> Repository:
    """``spec.open`` on this node; a password or location this node cannot read is its setup
    failure, naming the node."""
    try:
        return spec.open(**kwargs)
    except AccessError as exc:
        raise NodeSetupError(f"{exc} (on {socket.gethostname()})") from None


class BackupWorker:
    def __init__(self, spec: RepositorySpec, board=None, node_config: str | None = None):
        tune_process()
        self.spec = spec
        self.node_config = node_config
        self.repo: Repository | None = None
        self._counting = None
        self.board = board
        self.host = _node_labels().get(HOST_LABEL) or socket.gethostname()
        self._last_report = 0.0
        self._report_lock = threading.Lock()

    def _open(self, cfg: dict | None = None) -> None:
        """Open the repository on first use, so that a node without a password or storage access
        reports that as its failure (a constructor error would look like a dead actor).
        ``cfg``: the node config, if the caller read it already."""
        if self.repo is None:
            spec = provisioned(self.spec, read_node_config(self.node_config) if cfg is None else cfg)
            # append-only: a backup never deletes or replaces; it passes over unreadable manifests
            self.repo = open_on_node(spec, append_only=True)
            self._counting = counting_storage(self.repo.storage)

    def _counts(self) -> dict:
        return self._counting.counts() if self._counting is not None else {}

    def where(self) -> dict:
        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": self.host, "pid": os.getpid()}

    # ---- fleet mode: this node's own paths, one snapshot each -----------------------------------
    def backup_node(self, request: FleetRequest) -> dict:
        started, before = clock.monotonic(), self._counts()
        out = {"node_id": self.where()["node_id"], "host": self.host, "status": "ok", "snapshots": [],
               "files": 0, "bytes_read": 0, "new_bytes": 0, "errors": 0, "error": "", "jitter_wait": 0.0}
        if request.jitter > 0:  # hundreds of nodes must not hit the storage in the same second
            out["jitter_wait"] = random.uniform(0, request.jitter)
            clock.sleep(out["jitter_wait"])
        try:
            self.node_config = request.node_config
            cfg = read_node_config(request.node_config)  # read once: how to get in, and what to back up
            self._open(cfg)
            host = str(cfg.get("host") or self.host)
            out["host"] = host
            paths = cfg.get("paths") or request.paths
            if not paths:
                raise NodeSetupError(f"nothing to back up on {host}: no paths given and no node config")
            excludes = list(request.excludes) + list(cfg.get("excludes", []))
            host = backup_host(self.repo.identity, "") or host  # a host key backs up as its own host
            out["host"] = host
            if self.board is not None:  # so that if this node dies, its failure is filed under this name
                self.board.announce.remote(out["node_id"], host)
            failed = []
            for i, path in enumerate(paths):
                local = Source.local(os.path.abspath(path), host)
                try:
                    snap = self._backup_path(request, excludes, path, local)
                except SourceError as exc:  # this path cannot be read: the node's other paths still can
                    failed.append(self._failed(out, local, exc, request.run))
                    continue
                except KdistError as exc:  # the repository or the storage: the rest would fail alike
                    failed.append(self._failed(out, local, exc, request.run))
                    if i + 1 < len(paths):  # not tried: the driver records the host's failure
                        out["recorded"] = False
                    break
                t = snap.totals
                out["snapshots"].append({"path": snap.source.path, "id": snap.id, "files": t["files"],
                                         "bytes_read": t["bytes_read"], "new_bytes": t["new_bytes"],
                                         "errors": t["errors"]})
                for k in ("files", "bytes_read", "new_bytes", "errors"):
                    out[k] += t[k]
            if failed:
                out["status"], out["error"] = "failed", "; ".join(failed)
            elif out["errors"]:
                out["status"] = "partial"
        except KdistError as exc:  # before any path: the node's setup, or the repository would not open
            out["status"], out["error"] = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self._close_quietly(out)  # retire the session marker: this node's backup is over
        out["duration"] = clock.monotonic() - started
        out["requests"] = _diff(before, self._counts())
        out["peak_rss_mb"] = peak_rss_mb()
        return out

    def _backup_path(self, request: FleetRequest, excludes: list[str], path: str, source: Source):
        options = BackupOptions(excludes=excludes, tags=list(request.tags) + ["fleet"],
                                workers=node_threads(request.workers))
        return Uploader(self.repo, options, progress=self._progress(source.host, path)).backup(path, source)

    def _failed(self, out: dict, source: Source, exc: KdistError, run: str) -> str:
        """Record the failed backup of ``source`` in the repository; the error, for the summary.
        ``out["recorded"]``: every failure of this node is in the repository (the driver records
        the others)."""
        from kdist.cli.exit_codes import exit_code_for

        error = f"{source.path}: {type(exc).__name__}: {exc}"
        why = try_record_failure(self.repo.manifests, source.host, source.user, source.path, str(exc),
                                 exit_code_for(exc), run)
        out["recorded"] = out.get("recorded", True) and not why
        return error + (f" (not recorded in the repository: {why})" if why else "")

    # ---- shard mode: one part of a shared tree --------------------------------------------------
    def backup_part(self, index: int, part: TreePart, source: Source, root_dev: int, run: str,
                    options: BackupOptions, driver: str = "") -> dict:
        started, before = clock.monotonic(), self._counts()
        out = {"index": index, "path": part.path, "names": len(part.names) if part.names is not None else None,
               "node_id": self.where()["node_id"], "host": self.host, "status": "ok", "error": ""}
        up = None
        try:
            self._open()
            options = replace(options, workers=node_threads(options.workers))
            up = Uploader(self.repo, options, progress=self._progress(self.host, f"part {index}"))
            entries, checkpoint = up.backup_part(part, source, root_dev, run, driver)
            out["entries"] = [e.to_wire() for e in entries]
            out["checkpoint"] = checkpoint
            # the part's checkpoint protects what it refers to until the driver publishes: the
            # actor's next part revalidates only its own references (kdist.processes does the same)
            self.repo.contents.forget_references()
        except KdistError as exc:
            out["status"], out["error"] = "failed", f"{type(exc).__name__}: {exc}"
        out["stats"] = up.stats.as_dict() if up is not None else {}
        out["error_list"] = list(up.error_list) if up is not None else []
        out["duration"] = clock.monotonic() - started
        out["requests"] = _diff(before, self._counts())
        out["peak_rss_mb"] = peak_rss_mb()
        return out

    def close(self) -> None:
        """Flush and retire this worker's session (the driver calls it before letting it go)."""
        repo, self.repo = self.repo, None
        if repo is not None:
            repo.close()

    def _close_quietly(self, out: dict) -> None:
        try:
            self.close()
        except KdistError as exc:
            if out["status"] != "failed":
                out["status"], out["error"] = "failed", f"closing the repository: {type(exc).__name__}: {exc}"
                # its snapshots are published: no backup of it failed, so none is recorded
                out["recorded"] = True

    def _progress(self, host: str, what: str):
        if self.board is None:
            return None
        key = f"{host} {what}"

        def report(stats: BackupStats, _line: str) -> None:
            now = clock.monotonic()
            with self._report_lock:
                if now - self._last_report < PROGRESS_EVERY:
                    return
                self._last_report = now
            self.board.report.remote(key, {"files": stats.files_read + stats.files_reused,
                                           "bytes_read": stats.bytes_read})
        return report


def _node_labels() -> dict:
    import ray
    if not ray.is_initialized():  # a worker used directly, outside Ray
        return {}
    return dict(ray.get_runtime_context().get_node_labels() or {})


def entries_from_wire(wire: list[dict]) -> list[Entry]:
    return [Entry.from_wire(d) for d in wire]


def node_threads(asked: int) -> int:
    """Reader threads on this node: as asked, or (0) one per CPU, at least 2."""
    return asked if asked > 0 else max(2, os.cpu_count() or 2)


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _diff(before: dict, after: dict) -> dict:
    calls = {k: v["calls"] - before.get(k, {}).get("calls", 0) for k, v in after.items()}
    return {k: n for k, n in calls.items() if n}
