"""``kdist fleet backup``: back up a Ray cluster's nodes (fleet) or one shared tree (shard).

``cluster/backup.py`` is this command for ``ray submit``, which copies one script to the head.
The repository is opened the way every kdist command opens it (``kdist.access``); each Ray actor
reads the password on its own node by the same precedence. ``--status-file`` records the outcome
with its exit code, which ``ray submit`` and ``ray job submit`` do not pass on (they exit 1 for
every failure): cron reads the file (cluster/README.md, "Exit codes through Ray").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time

import click

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.keyslots import ADMIN, MAINTENANCE

from kdist.access import PasswordSource, RepositorySpec
from kdist.cli import exit_codes
from kdist.cli.context import DURATION, filter_options, metrics_options, repo_options, with_repository
from kdist.cli.text import local_time, printable


@click.group("fleet")
def fleet_group():
    """Back up a Ray cluster's nodes into one repository, and see how every host's backups stand."""


def write_status(path: str | None, status: dict) -> None:
    """Write ``status`` (JSON) to ``path`` atomically: a reader sees the previous run's file or
    this one's, never half of one."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kdist-status-")
    except OSError as exc:  # checked before the run: gone since; the run's outcome stands
        click.echo(f"kdist: warning: cannot write the status file {path}: {exc.strerror}", err=True)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(status, f, default=str, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        click.echo(f"kdist: warning: cannot write the status file {path}: {exc.strerror}", err=True)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise click.UsageError(f"--node-label wants key=value, not {p!r}")
        out[k] = v
    return out


@fleet_group.command("backup")
@repo_options
@click.option("--password-env", default="KDIST_PASSWORD", show_default=True,
              help="Environment variable that holds the password on every node (never pass the password itself); "
                   "--password-file, a file on every node, wins over it.")
@click.option("--mode", type=click.Choice(["fleet", "shard"]), required=True,
              help="fleet: every node backs up its own paths; shard: one shared tree split over the cluster.")
@click.option("--path", "paths", multiple=True, help="Path to back up (fleet: on every node; shard: the shared tree).")
@click.option("--address", default=None, metavar="ADDRESS",
              help="The Ray cluster: HOST:PORT of its head, ray://HOST:PORT, auto (the cluster running on this "
                   "machine, e.g. under `ray submit`) or local (a new Ray of its own). Default: RAY_ADDRESS, else "
                   "a new local Ray, refused if a cluster runs on this machine.")
@click.option("--status-file", type=click.Path(dir_okay=False), default=None,
              help="Write the outcome here as JSON, with its exit code (Ray's submit commands do not pass it on).")
@click.option("--node-config", default="/etc/kdist/backup.json", show_default=True,
              help="JSON file on each node: its paths, excludes and host (fleet), and in both modes its "
                   "password_file, key_id, aws_profile, aws_shared_credentials_file (env KDIST_NODE_CONFIG wins).")
@click.option("--node-label", multiple=True, help="Fleet: only nodes with this Ray label, key=value (repeatable).")
@click.option("--exclude", "excludes", multiple=True, help="Glob of names or paths to leave out (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag for the snapshots (repeatable).")
@click.option("--parallelism", type=click.IntRange(min=1), default=None,
              help="At most this many backup actors at once (default: one per node, in both modes).")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="CPUs a backup actor asks Ray for; fleet mode leaves out nodes that offer fewer.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Reader threads per actor; 0: the node's CPU count (at least 2).")
@click.option("--jitter", type=DURATION, default=0.0,
              metavar="DURATION", help="Fleet: each node waits a random time up to DURATION (e.g. 15m) before it "
                                       "starts, so hundreds of hosts do not reach the storage in the same second.")
@click.option("--host", default=None, help="Shard: host name recorded in the snapshot (default: this machine's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@metrics_options("fleet", lambda kw: {"mode": kw.get("mode") or ""})
def backup(repo_location, endpoint_url, password_file, password_env, mode, paths, address, status_file, node_config,
           node_label, excludes, tags, parallelism, cpus_per_actor, threads, jitter, host, as_json, metrics):
    """Back up every node's own paths (fleet) or one big shared tree (shard) into one repository.

    Exit codes: 0 done; 3 done, some files skipped; 18 some node or part failed (the others are
    published); 20 the Ray cluster cannot be reached; otherwise the error's (`kdist --help`)."""
    if status_file:  # a path that cannot take the file is a usage error now, not after the night's backup
        directory = os.path.dirname(os.path.abspath(os.path.expanduser(status_file)))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            click.echo(f"kdist: error: --status-file {status_file}: cannot write in {directory}", err=True)
            click.echo(EXIT_LINE.format(code=exit_codes.USAGE), err=True)
            sys.exit(exit_codes.USAGE)
    started_at = time.time()
    started = clock.monotonic()
    status = {"command": "fleet backup", "mode": mode, "started": started_at}
    from kdist.access import at_deadline

    # before the metrics' own hook: the status file and the exit line first, within the hooks' time
    at_deadline(lambda: _finish(status_file, status, started, exit_codes.STORAGE, "error", "ran past --timeout",
                                metrics), first=True)
    _signalled.clear()
    try:
        code = _backup(status, RepositorySpec(repo_location, endpoint_url,
                                              PasswordSource(file=password_file, env=password_env)),
                       mode, paths, address, node_config, node_label, excludes, tags, parallelism, cpus_per_actor,
                       threads, jitter, host, as_json)
    except click.UsageError as exc:
        exc.show()
        code, outcome, error = exit_codes.USAGE, "usage", exc.format_message()
    except KdistError as exc:
        click.echo(f"kdist: error: {printable(str(exc))}", err=True)
        code, outcome, error = exit_codes.exit_code_for(exc), "error", str(exc)
    except KeyboardInterrupt:
        click.echo("kdist: interrupted", err=True)
        code, outcome, error = 130, "error", "interrupted"
    except BaseException as exc:  # a signal (which Ray's calls may wrap), a bug, an exit from below
        if _signalled:
            code, error = 128 + _signalled[0], f"stopped by signal {_signalled[0]}"
        elif isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else exit_codes.FAILURE
            error = f"exited with {exc.code}"
        else:
            code, error = exit_codes.FAILURE, f"{type(exc).__name__}: {exc}"
        click.echo(f"kdist: error: {error}"[:2000], err=True)
        outcome = "error"
    else:
        outcome, error = None, ""
    restore_signals()  # a signal during _finish must not cut the status file or the exit line
    _finish(status_file, status, started, code, outcome, error, metrics)  # its exit line is the last output
    sys.exit(code)


_signalled: list[int] = []  # the signal that stopped the run (Ray's calls may wrap what the handler raises)
_previous_handlers: dict = {}


class _Terminated(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminated(signum, _frame):
    _signalled.append(signum)
    raise _Terminated(signum)


def catch_signals() -> None:
    """SIGTERM (`ray job stop`, a deleted RayJob) and SIGHUP (a closed terminal) end the run
    through ``_finish``: status file, metrics and exit line say 143 or 129. Installed after
    ``ray.init``, which puts a handler of its own (an exit without a word) on SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            _previous_handlers.setdefault(sig, signal.signal(sig, _terminated))
        except ValueError:  # not the main thread (a caller running the command in a thread)
            pass


def restore_signals() -> None:
    for sig, handler in list(_previous_handlers.items()):
        signal.signal(sig, handler)
    _previous_handlers.clear()


def _node_name(node: dict) -> str:
    """A fleet node's host, or a shard part's number."""
    return str(node["host"] if node.get("host") is not None and "index" not in node else node.get("index"))


EXIT_LINE = "kdist: fleet backup exit code {code}"  # cluster/exit-code.sh reads it through Ray


def _finish(path, status: dict, started: float, code: int, outcome: str | None = None, error: str = "",
            metrics=None) -> None:
    status.setdefault("duration", clock.monotonic() - started)
    status["finished"] = time.time()
    status["exit_code"] = code
    if outcome is not None:
        status["status"] = outcome
        status["error"] = error
    write_status(path, status)  # before the metrics: a hung Pushgateway must not cost the status file
    if metrics:
        from kdist.metrics import export

        nodes = status.get("nodes") or []
        totals = status.get("totals") or {}
        export(metrics, "fleet", {"mode": str(status.get("mode", ""))},
               {"exit_code": code, "nodes_failed": sum(1 for n in nodes if n.get("status") == "failed"),
                "nodes_done": sum(1 for n in nodes if n.get("status") in ("ok", "partial")),
                "nodes_left_out": len(status.get("left_out") or []),
                **{k: totals.get(k, 0) for k in ("files", "bytes_read", "new_bytes", "errors")}},
               code in (exit_codes.SUCCESS, exit_codes.PARTIAL), status["duration"],
               rows=[(name, {"node": _node_name(n)}, value, help_text) for n in nodes for name, value, help_text in (
                         ("node_success", 1.0 if n.get("status") in ("ok", "partial") else 0.0,
                          "1 if the node (fleet) or part (shard) finished its backup in the last run"),
                         ("node_errors", float((n.get("stats") or n).get("errors", 0) or 0),
                          "Files or directories the node's backup could not read"))])
    # the last line of the output, whatever happened: `ray submit` and `ray job submit` pass the
    # output on but turn every failure into exit 1; cluster/exit-code.sh gives this code back
    sys.stderr.flush()
    sys.stdout.flush()
    click.echo(EXIT_LINE.format(code=code), err=True)


def _backup(status: dict, spec: RepositorySpec, mode, paths, address, node_config, node_label, excludes, tags,
            parallelism, cpus_per_actor, threads, jitter, host, as_json) -> int:
    from kdist.allocator import tune_process
    from kdist.distributed.connect import connect
    from kdist.distributed.driver import alive_nodes, print_summary, run_fleet, run_shard
    from kdist.distributed.workers import FleetRequest
    from kdist.uploader import BackupOptions

    import ray

    tune_process()
    labels = _labels(node_label)
    if mode == "shard" and len(paths) != 1:
        raise click.UsageError("--mode shard backs up exactly one --path (a tree every node can read)")
    started = clock.monotonic()
    stop = connect(address)
    catch_signals()
    try:
        show = sys.stderr.isatty() and not as_json
        if mode == "fleet":
            request = FleetRequest(list(paths), list(excludes), list(tags), node_config, threads, jitter)
            summary = run_fleet(spec, request, labels, parallelism, cpus_per_actor, show)
        else:
            options = BackupOptions(excludes=list(excludes), tags=list(tags) + ["shard"], workers=threads)
            summary = run_shard(spec, paths[0], options, host or socket.gethostname(), parallelism, cpus_per_actor,
                                show, node_config)
        summary.duration = clock.monotonic() - started
        summary.cluster = {"address": ray.get_runtime_context().gcs_address, "nodes": len(alive_nodes({}))}
    finally:
        if stop:
            ray.shutdown()
    status.update(summary.__dict__)
    print_summary(summary, as_json)
    return summary.exit_code()


def _source(host: str, path: str) -> str:
    """``host:path``, or ``host`` for the whole host, escaped for the terminal."""
    return f"{printable(host)}{':' + printable(path) if path else ''}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    minutes = int(seconds // 60)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    return f"{days}d {hours}h" if days else (f"{hours}h {minutes}m" if hours else f"{minutes}m")


@fleet_group.command("status")
@click.option("--max-age", type=DURATION, default="26h", show_default=True, metavar="DURATION",
              help="A host and path whose last snapshot is older than this (or that has none) is stale.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@metrics_options("fleet_status")
@with_repository(read_only=True)
def status(repo, max_age, where, as_json, metrics):
    """Every host and path: its last snapshot, age, files, size, errors, a backup that started
    since and did not finish, and the last failure a backup recorded. Exit 22 when any is stale or
    failed after its last snapshot (listed on stderr), so cron can alert; a host key without any
    snapshot counts as stale."""
    from kdist.cli.progress import human_bytes
    from kdist.fleet_status import fleet_status
    from kdist.snapshot import visible_labels

    started = clock.monotonic()
    rows = fleet_status(repo.manifests, clock.now(), max_age, where, **visible_labels(repo.identity))
    stale = [r for r in rows if r.stale]
    failing = [r for r in rows if r.failing]
    _status_metrics(metrics, rows, stale, clock.monotonic() - started)
    if as_json:
        click.echo(json.dumps({"max_age": max_age, "sources": [r.as_dict() for r in rows],
                               "stale": len(stale), "failing": len(failing)}, indent=2))
    elif not rows:
        click.echo("no snapshots")
    else:
        hosts = [printable(r.host) for r in rows]
        paths = [printable(r.path) or "-" for r in rows]
        hw, pw = max(4, *map(len, hosts)) + 2, max(4, *map(len, paths)) + 2
        click.echo(f"{'HOST':<{hw}}{'PATH':<{pw}}{'LAST':<21}{'AGE':>8}{'FILES':>9}{'SIZE':>11}{'ERRORS':>8}  STATUS")
        for r, host, path in zip(rows, hosts, paths):
            state = "STALE" if r.stale else "ok"
            if r.failing:
                state += (f", FAILED {local_time(r.failed_at)} (exit {r.failure_exit_code}): "
                          f"{printable(r.failure)}")
            elif r.unfinished_since:
                state += f", a backup started {local_time(r.unfinished_since)} did not finish"
            last = local_time(r.time) if r.snapshot else "-"
            click.echo(f"{host:<{hw}}{path:<{pw}}{last:<21}{_age(r.age):>8}{r.files:>9}{human_bytes(r.bytes):>11}"
                       f"{r.errors:>8}  {state}")
    if stale:
        click.echo(f"{len(stale)} of {len(rows)} stale (no snapshot within {_age(max_age)}): " + ", ".join(
            f"{_source(r.host, r.path)} ({_age(r.age)})" for r in stale), err=True)
    if failing:
        click.echo(f"{len(failing)} of {len(rows)} failed since their last snapshot: " + ", ".join(
            f"{_source(r.host, r.path)} ({local_time(r.failed_at)}, exit {r.failure_exit_code})" for r in failing),
            err=True)
    if stale or failing:
        sys.exit(exit_codes.STALE)


@fleet_group.command("clear")
@click.option("--host", "hosts", multiple=True, required=True, help="Clear the failures of this host (repeatable).")
@click.option("--path", "paths", multiple=True,
              help="Only those of this path (repeatable; \"\" for failures of the whole host); default: all.")
@click.option("--dry-run", is_flag=True, help="Only list what would be cleared.")
@with_repository(roles=(ADMIN, MAINTENANCE), what="clear recorded failures")
def clear(repo, hosts, paths, dry_run):
    """Forget the recorded failures of a host (or some of its paths), e.g. of a path given by
    mistake that will never back up, which `fleet status` would show as FAILED until maintenance
    forgets the record after 30 days. Snapshots are not touched."""
    from kdist.failures import read_failures

    chosen = [f for f in read_failures(repo.manifests) if f.host in hosts and (not paths or f.path in paths)]
    for f in chosen:
        click.echo(f"{'would clear' if dry_run else 'cleared'}: {_source(f.host, f.path)} "
                   f"{local_time(f.stored or f.time)} (exit {f.exit_code}) {printable(f.error)}")
    if not dry_run:
        repo.manifests.delete([f.id for f in chosen])
    if not chosen:
        click.echo("no recorded failures match")


def _status_metrics(metrics, rows, stale, duration: float) -> None:
    """Per host and path: the last snapshot's time, age and figures, and whether it is stale;
    Prometheus can alert on ``kdist_fleet_status_stale == 1`` or on the timestamps directly."""
    from kdist.metrics import export

    samples = []
    for r in rows:
        where = {"host": r.host, "path": r.path}
        samples.append(("stale", where, 1.0 if r.stale else 0.0, "1 if this host and path has no snapshot within "
                                                                  "--max-age"))
        samples.append(("failing", where, 1.0 if r.failing else 0.0, "1 if a backup of this host and path failed "
                                                                      "after its last snapshot"))
        if r.failed_at:
            samples.append(("last_failure_timestamp_seconds", where, r.failed_at, "When a backup of this host and "
                                                                                  "path last recorded a failure"))
        if r.snapshot:
            samples += [("last_snapshot_timestamp_seconds", where, r.time, "When the last snapshot was taken "
                                                                          "(bounded by the storage's clock)"),
                        ("last_snapshot_files", where, r.files, "Files in the last snapshot"),
                        ("last_snapshot_bytes", where, r.bytes, "Bytes in the last snapshot"),
                        ("last_snapshot_errors", where, r.errors, "Files the last snapshot's backup could not read")]
    export(metrics, "fleet_status", {}, {"sources": len(rows), "stale_sources": len(stale),
                                         "failing_sources": sum(1 for r in rows if r.failing)}, True, duration,
           rows=samples)
