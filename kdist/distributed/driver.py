"""The driver of a distributed backup (``cluster/backup.py``): fleet mode and shard mode.

Fleet: one worker actor per alive node (optionally only nodes with given labels), pinned with a
hard node-affinity constraint, backs up that node's own paths into its own snapshots.
Shard: the driver plans balanced parts of one shared tree, a pool of worker actors pulls them
(work stealing, at most ``IN_FLIGHT`` per actor; parts of a dead actor are queued again), and
the driver assembles the parts into one snapshot whose root is the one a single-process backup
writes.

Exit codes: 0 every node/part done; 3 done, but some files were skipped (listed in the
snapshots); 18 some node or part failed (the others finished and are published); otherwise the
code of the error that stopped the driver (kdist/cli/exit_codes.py).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field

import click

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.local_cache import CacheSettings
from repo_format.repository import Repository
from repo_format.storage import open_storage
from repo_format.storage.wrappers import CountingStorage, RetryingStorage, append_only

from kdist.allocator import tune_process
from kdist.cli import exit_codes
from kdist.distributed.plan import parts_totals, plan_tree, publish_parts
from kdist.distributed.workers import HOST_LABEL, BackupWorker, FleetRequest, PasswordSource, ProgressBoard, entries_from_wire
from kdist.snapshot import Source, backup_host, previous_root
from kdist.uploader import BackupOptions, stat_source

IN_FLIGHT = 2  # parts queued on one actor at a time: one running, one ready
MAX_ATTEMPTS = 3  # a part that failed (not its actor) this many times fails the backup
WAIT = 1.0  # seconds between two looks at progress


@dataclass
class Summary:
    mode: str
    status: str = "ok"
    snapshots: list = field(default_factory=list)
    nodes: list = field(default_factory=list)  # fleet: one per node; shard: one per part
    totals: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)  # the Ray cluster it ran on: address, alive nodes
    duration: float = 0.0
    error: str = ""

    def exit_code(self) -> int:
        if self.status == "failed":
            return exit_codes.DISTRIBUTED_FAILED
        return exit_codes.PARTIAL if self.status == "partial" else exit_codes.SUCCESS


class Display:
    """One aggregated progress line and a line per worker, only on a terminal."""

    def __init__(self, board, enabled: bool):
        self.board = board
        self.enabled = enabled
        self.started = clock.monotonic()
        self.shown = 0

    def tick(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        import ray
        lines = ray.get(self.board.read.remote(), timeout=30)
        files = sum(v["files"] for v in lines.values())
        nbytes = sum(v["bytes_read"] for v in lines.values())
        rate = nbytes / max(clock.monotonic() - self.started, 1e-6)
        out = [f"{done}/{total} done, {files} files, {nbytes / 1e6:.1f} MB read, {rate / 1e6:.1f} MB/s"]
        out += [f"  {k}: {v['files']} files, {v['bytes_read'] / 1e6:.1f} MB" for k, v in sorted(lines.items())]
        sys.stderr.write("\x1b[F\x1b[K" * self.shown + "\n".join(out) + "\n")
        sys.stderr.flush()
        self.shown = len(out)


def progress_board():
    """The progress actor, on the driver's own node: it must outlive any backup node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()


def alive_nodes(labels: dict[str, str]) -> list[dict]:
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [n for n in nodes if all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]


def node_host(node: dict) -> str:
    """The name a node's snapshots carry: its ``kdist-host`` label, else its host name."""
    return (node.get("Labels") or {}).get(HOST_LABEL) or node.get("NodeManagerHostname", "?")


def run_fleet(location, endpoint_url, password: PasswordSource, request: FleetRequest, labels: dict,
              parallelism: int | None, cpus: float, show: bool) -> Summary:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    summary = Summary(mode="fleet")
    nodes = alive_nodes(labels)
    if not nodes:
        raise click.UsageError("no alive Ray node matches" + (f" the labels {labels}" if labels else ""))
    board = progress_board()
    display = Display(board, show)
    worker_cls = ray.remote(BackupWorker)
    queue = list(nodes)
    running: dict = {}  # ref -> node
    limit = parallelism or len(nodes)
    results = []
    while queue or running:
        while queue and len(running) < limit:
            node = queue.pop(0)
            # a hard constraint: a soft one could back up another machine's disk under this node's name
            actor = worker_cls.options(
                num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(location, endpoint_url, password, board)
            running[actor.backup_node.remote(request)] = (node, actor)
        done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT)
        for ref in done:
            node, actor = running.pop(ref)
            results.append(_node_result(ref, node))
            ray.kill(actor)
        display.tick(len(results), len(nodes))
    summary.nodes = sorted(results, key=lambda r: r["host"])
    summary.snapshots = [s for r in results for s in r.get("snapshots", [])]
    summary.totals = _sum(results, ("files", "bytes_read", "new_bytes", "errors"))
    if any(r["status"] == "failed" for r in results):
        summary.status = "failed"
    elif any(r["status"] == "partial" for r in results):
        summary.status = "partial"
    return summary


def _node_result(ref, node) -> dict:
    import ray
    try:
        return ray.get(ref, timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
        host = node_host(node)
        return {"node_id": node["NodeID"], "host": host, "status": "failed", "snapshots": [],
                "error": f"the node or its backup actor died mid-backup ({type(exc).__name__}); what it "
                         "finished stays reachable through its last checkpoint"}


def run_shard(location, endpoint_url, password: PasswordSource, root: str, options: BackupOptions, host: str,
              parallelism: int | None, cpus: float, show: bool) -> Summary:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    summary = Summary(mode="shard")
    started = clock.now()
    root_path, st = stat_source(root)
    storage = append_only(CountingStorage(RetryingStorage(open_storage(location, endpoint_url=endpoint_url))))
    repo = Repository.open(storage, password.read(), key_id=os.environ.get("KDIST_KEY_ID") or None,
                           cache=CacheSettings.from_environment())
    repo.manifests.skip_unreadable = True  # a backup: one unreadable manifest blob must not stop it
    try:
        source = Source(backup_host(repo.identity, "") or host, Source.local(root_path).user, root_path)
        previous = previous_root(repo.manifests, source) if options.reuse_previous else None
        # one actor per node by default: threads inside a process share its index and move no data
        # between processes (shared/MEASURED.md), so a node needs no second copy of the index
        nodes = [n for n in alive_nodes({}) if n["Resources"].get("CPU", 0) >= cpus]
        workers = parallelism or max(1, len(nodes))
        plan = plan_tree(root_path, list(options.excludes), workers, options.one_file_system,
                         previous, repo.objects)
        run = secrets.token_hex(8)
        board = progress_board()
        display = Display(board, show)
        placements = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=True) for n in nodes]  # any node can read it
        remote_cls = ray.remote(BackupWorker)

        def spawn(k: int | None):
            """Actor k goes to node k (softly); a replacement anywhere, spread."""
            strategy = placements[k % len(placements)] if k is not None and placements else "SPREAD"
            return remote_cls.options(num_cpus=cpus, scheduling_strategy=strategy).remote(
                location, endpoint_url, password, board)

        results, failures, requeued = _pull_parts(spawn, plan.parts, (source, st.st_dev, run, options),
                                        min(workers, len(plan.parts)), display)
        summary.nodes = [{k: v for k, v in r.items() if k not in ("entries", "error_list")}
                         for r in [results[i] for i in sorted(results)] + failures]
        stats, _ = parts_totals(plan, results)
        summary.totals = {"files": stats.files, "bytes_read": stats.bytes_read, "new_bytes": stats.new_bytes,
                          "errors": stats.errors + len(plan.errors), "parts": len(plan.parts),
                          "requeued": requeued}
        if len(results) < len(plan.parts):
            summary.status = "failed"
            summary.error = (f"{len(plan.parts) - len(results)} of {len(plan.parts)} parts failed; no snapshot was "
                             "published (what the others stored is kept by their checkpoints)")
            return summary
        for r in results.values():
            r["entries"] = entries_from_wire(r["entries"])
        snap = publish_parts(repo, options, source, plan, results, run, started)
        summary.snapshots = [{"path": root_path, "id": snap.id, "root": snap.root, **{
            k: snap.totals.get(k, 0) for k in ("files", "bytes_read", "new_bytes", "errors")}}]
        summary.totals["new_bytes"] = snap.totals.get("new_bytes", 0)
        if snap.totals.get("errors"):
            summary.status = "partial"
        return summary
    finally:
        repo.close()


def _pull_parts(spawn, parts, part_args, pool_size: int, display: Display):
    """Hand parts to a pool of actors as they free up; requeue the parts of an actor that died."""
    import ray

    queue = list(range(len(parts)))
    attempts = {i: 0 for i in queue}
    results: dict[int, dict] = {}
    failures: list[dict] = []
    actors = [spawn(k) for k in range(max(1, pool_size))]
    replacements = len(actors)  # how many times a pool with no actor left may start a new one
    requeued = 0
    load = {a: 0 for a in actors}
    running: dict = {}  # ref -> (actor, part index)
    source, root_dev, run, options = part_args
    while queue or running:
        for a in list(load):
            while queue and load[a] < IN_FLIGHT:
                i = queue.pop(0)
                running[a.backup_part.remote(i, parts[i], source, root_dev, run, options)] = (a, i)
                load[a] += 1
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT)
        for ref in done:
            actor, i = running.pop(ref)
            try:
                r = ray.get(ref, timeout=60)
            except ray.exceptions.RayActorError:
                # the actor or its node died: its parts go to the others (or a replacement)
                load.pop(actor, None)
                queue.insert(0, i)
                requeued += 1
                if not load and replacements > 0:  # the survivors take its parts; if none, a new one
                    replacements -= 1
                    load[spawn(None)] = 0
                continue
            if actor in load:
                load[actor] -= 1
            attempts[i] += 1
            if r["status"] == "ok":
                results[i] = r
            elif attempts[i] < MAX_ATTEMPTS:
                queue.append(i)
            else:
                failures.append(r)
        display.tick(len(results), len(parts))
        if not load and queue and replacements == 0:
            failures += [{"index": i, "path": parts[i].path, "status": "failed",
                          "error": "every backup actor died"} for i in queue]
            queue.clear()
    closing = [a.close.remote() for a in load]  # retire their sessions, then let them go
    try:
        ray.get(closing, timeout=120)
    except ray.exceptions.RayError:
        pass  # a session left behind expires on its own; nothing published depends on it
    for a in load:
        ray.kill(a)
    return results, failures, requeued


def _sum(results: list[dict], keys) -> dict:
    return {k: sum(r.get(k, 0) for r in results) for k in keys}


def print_summary(summary: Summary, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.__dict__, default=str, indent=1))
        return
    for r in summary.nodes:
        name = r.get("host") if summary.mode == "fleet" else f"part {r.get('index')} {r.get('path')}"
        stats = r.get("stats", r)
        line = (f"{name}: {r['status']}, {stats.get('files', 0)} files, {stats.get('bytes_read', 0)} bytes read, "
                f"{stats.get('new_bytes', 0)} new, {r.get('duration', 0):.1f} s, requests {r.get('requests', {})}")
        click.echo(line + (f" -- {r['error']}" if r.get("error") else ""))
    for s in summary.snapshots:
        click.echo(f"snapshot {s['id'][:8]} of {s['path']}")
    t = summary.totals
    click.echo(f"{summary.mode} backup {summary.status}: {t.get('files', 0)} files, {t.get('bytes_read', 0)} bytes "
               f"read, {t.get('new_bytes', 0)} new, {summary.duration:.1f} s" + (f"; {summary.error}" if summary.error else ""))


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise click.UsageError(f"--node-label wants key=value, not {p!r}")
        out[k] = v
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", "location", envvar="KDIST_REPO", required=True,
              help="Repository every node can reach: s3://bucket/prefix, or a path on a shared filesystem.")
@click.option("--endpoint-url", envvar="KDIST_ENDPOINT_URL", default=None, help="S3-compatible endpoint.")
@click.option("--password-env", default="KDIST_PASSWORD", show_default=True,
              help="Environment variable that holds the password on every node (never pass the password itself).")
@click.option("--password-file", default=None, help="File on every node whose first line is the password.")
@click.option("--mode", type=click.Choice(["fleet", "shard"]), required=True,
              help="fleet: every node backs up its own paths; shard: one shared tree split over the cluster.")
@click.option("--path", "paths", multiple=True, help="Path to back up (fleet: on every node; shard: the shared tree).")
@click.option("--node-config", default="/etc/kdist/backup.json", show_default=True,
              help="Fleet: JSON file on each node with its own paths/excludes/host (env KDIST_NODE_CONFIG wins).")
@click.option("--node-label", multiple=True, help="Fleet: only nodes with this Ray label, key=value (repeatable).")
@click.option("--exclude", "excludes", multiple=True, help="Glob of names or paths to leave out (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag for the snapshots (repeatable).")
@click.option("--parallelism", type=click.IntRange(min=1), default=None,
              help="At most this many backup actors at once (default: one per node, in both modes).")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Reader threads per actor; 0: the node's CPU count (at least 2).")
@click.option("--host", default=None, help="Shard: host name recorded in the snapshot (default: this machine's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def main(location, endpoint_url, password_env, password_file, mode, paths, node_config, node_label, excludes,
         tags, parallelism, cpus_per_actor, threads, host, as_json):
    """Back up a Ray cluster's nodes (fleet) or one big shared tree (shard) into one repository."""
    import ray

    tune_process()
    started = clock.monotonic()
    password = PasswordSource(env=password_env, file=password_file)
    try:
        if not ray.is_initialized():  # no address: RAY_ADDRESS, else the cluster on this machine, else a new one
            ray.init(logging_level="WARNING", log_to_driver=False)
        show = sys.stderr.isatty() and not as_json
        if mode == "fleet":
            request = FleetRequest(list(paths), list(excludes), list(tags), node_config, threads)
            summary = run_fleet(location, endpoint_url, password, request, _labels(node_label), parallelism,
                                cpus_per_actor, show)
        else:
            if len(paths) != 1:
                raise click.UsageError("--mode shard backs up exactly one --path (a tree every node can read)")
            options = BackupOptions(excludes=list(excludes), tags=list(tags) + ["shard"], workers=threads)
            summary = run_shard(location, endpoint_url, password, paths[0], options, host or socket.gethostname(),
                                parallelism, cpus_per_actor, show)
    except KdistError as exc:
        click.echo(f"kdist: error: {exc}", err=True)
        sys.exit(exit_codes.exit_code_for(exc))
    summary.duration = clock.monotonic() - started
    summary.cluster = {"address": ray.get_runtime_context().gcs_address, "nodes": len(alive_nodes({}))}
    print_summary(summary, as_json)
    sys.exit(summary.exit_code())


if __name__ == "__main__":
    main()
