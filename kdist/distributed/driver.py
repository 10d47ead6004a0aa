"""The driver of a distributed backup (``kdist fleet backup``, ``cluster/backup.py``): fleet mode and shard mode.

Fleet: one worker actor per alive node (optionally only nodes with given labels), pinned with a
hard node-affinity constraint, backs up that node's own paths into its own snapshots.
Shard: the driver plans balanced parts of one shared tree, a pool of worker actors pulls them
(work stealing, at most ``IN_FLIGHT`` per actor; parts of a dead actor are queued again), and
the driver assembles the parts into one snapshot whose root is the one a single-process backup
writes.

Exit codes: 0 every node/part done; 3 done, but some files were skipped (listed in the
snapshots); 18 some node or part failed (the others finished and are published); otherwise the
code of the error that stopped the driver (kdist/cli/exit_codes.py). The command is
``kdist.cli.fleet``.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass, field, replace

import click

from repo_format import clock
from repo_format.errors import KdistError

from kdist.access import RepositorySpec
from kdist.cli import exit_codes
from kdist.cli.text import printable
from kdist.distributed.plan import parts_totals, plan_tree, publish_parts
from kdist.distributed.workers import HOST_LABEL, BackupWorker, FleetRequest, ProgressBoard, entries_from_wire
from kdist.failures import try_record_failure
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
    left_out: list = field(default_factory=list)  # fleet: nodes that cannot run a backup actor, and why
    unrecorded: list = field(default_factory=list)  # hosts whose failure is not recorded in the repository
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


def run_fleet(spec: RepositorySpec, request: FleetRequest, labels: dict, parallelism: int | None, cpus: float,
              show: bool) -> Summary:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    summary = Summary(mode="fleet")
    matching = alive_nodes(labels)
    if not matching:
        raise click.UsageError("no alive Ray node matches" + (f" the labels {labels}" if labels else ""))
    # an actor asking for more CPUs than a node has would wait there forever (a head started with
    # --num-cpus 0): such a node is left out, and said so, rather than reported as dying
    nodes = [n for n in matching if n.get("Resources", {}).get("CPU", 0) >= cpus]
    summary.left_out = [{"node_id": n["NodeID"], "host": node_host(n),
                         "reason": f"it offers {n.get('Resources', {}).get('CPU', 0):g} CPUs to Ray and a backup "
                                   f"actor needs {cpus:g} (--cpus-per-actor); label the backup nodes and pass "
                                   "--node-label to choose them"} for n in matching if n not in nodes]
    if not nodes:
        summary.status = "failed"
        summary.error = "no matching node can run a backup actor: " + "; ".join(
            f"{n['host']}: {n['reason']}" for n in summary.left_out)
        if labels:
            summary.unrecorded = record_node_failures(spec, [{**n, "error": n["reason"]} for n in summary.left_out],
                                                      request.run)
        return summary
    request = replace(request, run=request.run or secrets.token_hex(8))
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
            ).remote(spec, board)
            running[actor.backup_node.remote(request)] = (node, actor)
        done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT)
        for ref in done:
            node, actor = running.pop(ref)
            results.append(_node_result(ref, node))
            ray.kill(actor)
        display.tick(len(results), len(nodes))
    try:
        announced = ray.get(board.read_hosts.remote(), timeout=30)
    except ray.exceptions.RayError:  # the names only: the nodes' outcomes stand
        announced = {}
    for r in results:  # a node that died is named as it publishes (node config, host key), if it said so
        r["host"] = announced.get(r["node_id"], r["host"])
    summary.nodes = sorted(results, key=lambda r: r["host"])
    summary.snapshots = [s for r in results for s in r.get("snapshots", [])]
    summary.totals = _sum(results, ("files", "bytes_read", "new_bytes", "errors"))
    if any(r["status"] == "failed" for r in results):
        summary.status = "failed"
    if labels and summary.left_out:
        # the operator chose these nodes by label: one that cannot run is a node not backed up
        # (without labels, a head started with --num-cpus 0 is expected to be left out)
        summary.status = "failed"
        summary.error = f"{len(summary.left_out)} node(s) with the labels {labels} cannot run a backup actor"
    elif summary.status != "failed" and any(r["status"] == "partial" for r in results):
        summary.status = "partial"
    unrecorded = [r for r in results if r["status"] == "failed" and not r.get("recorded")]
    if labels:
        unrecorded += [{**n, "error": n["reason"]} for n in summary.left_out]
    summary.unrecorded = record_node_failures(spec, unrecorded, request.run)
    return summary


def record_node_failures(spec: RepositorySpec, nodes: list[dict], run: str) -> list[str]:
    """Record in the repository the failures of nodes that could not record their own (an actor
    that died, a node that could not open the repository or was left out), as failures of the
    whole host (path ""), so that ``kdist fleet status`` shows them whatever becomes of this
    run's output. The driver's key must be allowed to write for those hosts (an admin or
    maintenance key; a host key only for its own host). Returns the hosts it could not record."""
    if not nodes:
        return []
    from repo_format.keyslots import HOST

    from kdist.failures import record_failure

    try:
        repo = spec.open(append_only=True)
    except (KdistError, OSError) as exc:
        click.echo(f"kdist: warning: the failures of {', '.join(sorted({printable(n['host']) for n in nodes}))} "
                   f"are not recorded in the repository: this driver cannot open it ({printable(str(exc))})", err=True)
        return sorted({n["host"] for n in nodes})
    missed = []
    try:
        for n in nodes:
            if repo.identity.role == HOST and n["host"] != repo.identity.host:
                missed.append(n["host"])  # readers would refuse it: a host key writes only for its host
                continue
            try:
                record_failure(repo.manifests, n["host"], "", "", n.get("error") or "failed",
                               exit_codes.DISTRIBUTED_FAILED, run)
            except KdistError:
                missed.append(n["host"])
    finally:
        try:
            repo.close()
        except KdistError:
            pass
    if missed:
        click.echo(f"kdist: warning: the failures of {', '.join(sorted(map(printable, set(missed))))} are not "
                   "recorded in the repository (this driver's key may not write for them, or the storage failed)",
                   err=True)
    return sorted(set(missed))


def _node_result(ref, node) -> dict:
    import ray
    try:
        return ray.get(ref, timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
        host = node_host(node)
        return {"node_id": node["NodeID"], "host": host, "status": "failed", "snapshots": [],
                "error": f"the node or its backup actor died mid-backup ({type(exc).__name__}); what it "
                         "finished stays reachable through its last checkpoint"}


def run_shard(spec: RepositorySpec, root: str, options: BackupOptions, host: str, parallelism: int | None,
              cpus: float, show: bool, node_config: str | None = None) -> Summary:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    summary = Summary(mode="shard")
    started = clock.now()
    root_path, st = stat_source(root)
    repo = spec.open(append_only=True)  # a backup: it never deletes, and passes over unreadable manifests
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
        repo.contents.hold_session()  # the parts' checkpoints name it: maintenance keeps them while it is live
        board = progress_board()
        display = Display(board, show)
        placements = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=True) for n in nodes]  # any node can read it
        remote_cls = ray.remote(BackupWorker)

        def spawn(k: int | None):
            """Actor k goes to node k (softly); a replacement anywhere, spread."""
            strategy = placements[k % len(placements)] if k is not None and placements else "SPREAD"
            return remote_cls.options(num_cpus=cpus, scheduling_strategy=strategy).remote(
                spec, board, node_config)

        results, failures, requeued = _pull_parts(spawn, plan.parts, (source, st.st_dev, run, options, repo.session),
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
            errors = sorted({str(f.get("error") or "") for f in failures} - {""})
            why = try_record_failure(repo.manifests, source.host, source.user, source.path,
                                     summary.error + (": " + "; ".join(errors) if errors else ""),
                                     exit_codes.DISTRIBUTED_FAILED, run)
            if why:
                summary.unrecorded = [source.host]
                click.echo(f"kdist: warning: the failure is not recorded in the repository: {printable(why)}",
                           err=True)
            return summary
        for r in results.values():
            r["entries"] = entries_from_wire(r["entries"])
        try:
            snap = publish_parts(repo, options, source, plan, results, run, started)
        except KdistError as exc:
            try_record_failure(repo.manifests, source.host, source.user, source.path,
                               f"publishing the snapshot: {exc}", exit_codes.exit_code_for(exc), run)
            raise
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
    source, root_dev, run, options, driver = part_args
    while queue or running:
        for a in list(load):
            while queue and load[a] < IN_FLIGHT:
                i = queue.pop(0)
                running[a.backup_part.remote(i, parts[i], source, root_dev, run, options, driver)] = (a, i)
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
    for r in summary.left_out:
        click.echo(f"{printable(r['host'])}: left out -- {r['reason']}")
    for r in summary.nodes:
        name = printable(str(r.get("host")) if summary.mode == "fleet" else f"part {r.get('index')} {r.get('path')}")
        stats = r.get("stats", r)
        line = (f"{name}: {r['status']}, {stats.get('files', 0)} files, {stats.get('bytes_read', 0)} bytes read, "
                f"{stats.get('new_bytes', 0)} new, {r.get('duration', 0):.1f} s, requests {r.get('requests', {})}")
        click.echo(line + (f" -- {printable(r['error'])}" if r.get("error") else ""))
    for s in summary.snapshots:
        click.echo(f"snapshot {s['id'][:8]} of {printable(s['path'])}")
    t = summary.totals
    click.echo(f"{summary.mode} backup {summary.status}: {t.get('files', 0)} files, {t.get('bytes_read', 0)} bytes "
               f"read, {t.get('new_bytes', 0)} new, {summary.duration:.1f} s"
               + (f"; {printable(summary.error)}" if summary.error else ""))
