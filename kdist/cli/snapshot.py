"""``kdist snapshot create|list|restore|ls|diff|verify|forget`` (``find|cat|dump``: ``snapshot_out``)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from dataclasses import replace

import click

from repo_format import clock
from repo_format.errors import KdistError
from repo_format.keyslots import ADMIN, HOST, MAINTENANCE
from repo_format.storage.wrappers import throttled_storage

from kdist.cli import exit_codes
from kdist.cli.context import DURATION, filter_options, metrics_options, storage_requests, with_repository
from kdist.cli.progress import ProgressLine, human_bytes
from kdist.cli.snapshot_out import cat, dump, find, resolve
from kdist.cli.text import local_time, printable
from kdist.restore import Restorer, find_subtree
from kdist.restore_plan import DEFAULT_OVERWRITE, OVERWRITE_POLICIES
from kdist.snapshot import (
    TAGS_LABEL, TYPE_DIR, Snapshot, Source, backup_host, check_entry_name, edit_tags, list_snapshots, resolve_snapshot,
    tag_edits, visible_labels,
)
from kdist.uploader import BackupOptions, Uploader
from kdist import browse


@click.group("snapshot")
def snapshot_group():
    """Create, list, restore and verify snapshots."""


for _command in (find, cat, dump):
    snapshot_group.add_command(_command)


def _minus(after: dict, before: dict) -> dict:
    return {k: {f: v[f] - before.get(k, {}).get(f, 0) for f in v} for k, v in after.items()}


def _snapshot_json(s: Snapshot) -> dict:
    return {
        "id": s.id, "source": {"host": s.source.host, "user": s.source.user, "path": s.source.path},
        "start": s.start, "end": s.end, "root": s.root, "totals": s.totals, "tags": s.tags,
        "description": s.description, "checkpoint": s.checkpoint, "partial": s.partial, "errors": s.errors,
    }


def _processes(ctx, param, value):
    if value in (None, "auto"):
        return 0
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise click.BadParameter(f"{value!r}: give a number of processes from 1 to 256, or auto")
    return n


def _read_list(path: str, nul: bool) -> list[str]:
    """The paths a --files-from (``nul``: --files-from0) file lists, made absolute. One a line,
    empty lines and lines starting with # left out; with NUL separators, every name verbatim."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--files-from") from None
    if nul:
        names = [n for n in data.split(b"\0") if n]
    else:
        names = [n[:-1] if n.endswith(b"\r") else n for n in data.split(b"\n")]
        names = [n for n in names if n.strip() and not n.startswith(b"#")]
    return [os.path.abspath(os.fsdecode(n)) for n in names]


@snapshot_group.command("create")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--exclude", "excludes", multiple=True, help="Glob of names or relative paths to leave out (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag the snapshot (repeatable).")
@click.option("--description", default="", help="Free text stored with the snapshot.")
@click.option("--one-file-system", is_flag=True, help="Do not cross into other filesystems.")
@click.option("--checkpoint-interval", type=float, default=1800.0, show_default=True,
              help="Seconds between checkpoint manifests during a long backup (0: none).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Reader threads (default: cores, at least 2).")
@click.option("--processes", default="auto", callback=_processes, show_default=True, metavar="N|auto",
              help="Back up a tree with N processes; auto: one per core for a tree of at least "
                   "20,000 entries per process (kdist.processes.AUTO_MIN_ENTRIES), else one.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--host", default="", help="Publish the snapshots under this host name (default: this machine's; "
                                        "a host key's own host, which it cannot change).")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Back up standard input as one file (`pg_dump db | kdist snapshot create --stdin ...`).")
@click.option("--stdin-filename", default="stdin", show_default=True, metavar="NAME",
              help="With --stdin: the file's name; the snapshot's path is stdin:NAME.")
@click.option("--files-from", "files_from", metavar="FILE",
              help="Back up only the paths FILE lists under PATH, one a line (# comments; - is standard input).")
@click.option("--files-from0", "files_from0", metavar="FILE", help="As --files-from, the paths separated by NUL.")
@metrics_options("backup", lambda kw: {"host": kw.get("host") or socket.gethostname()})
@with_repository(append_only=True, roles=(ADMIN, HOST), what="back up")
def create(repo, paths, excludes, tags, description, one_file_system, checkpoint_interval, workers, processes,
           as_json, host, from_stdin, stdin_filename, files_from, files_from0, metrics):
    """Back up each PATH (a directory) as one snapshot; or standard input (--stdin); or the
    paths a list names below one PATH (--files-from)."""
    started, results = clock.monotonic(), []
    name = host or socket.gethostname()  # the metrics' label: the same on success and on every failure
    files = _selection(paths, from_stdin, stdin_filename, files_from, files_from0)
    try:
        if from_stdin:
            partial = _create_from_stdin(repo, stdin_filename, tags, description, checkpoint_interval, as_json, host,
                                         results)
        else:
            partial = _create(repo, paths, excludes, tags, description, one_file_system, checkpoint_interval,
                              workers, 1 if files is not None else processes, as_json, host, results, files)
    except BaseException:
        _backup_metrics(metrics, name, results, False, clock.monotonic() - started)
        raise
    _backup_metrics(metrics, name, results, True, clock.monotonic() - started)
    if partial:
        sys.exit(exit_codes.PARTIAL)


def _selection(paths, from_stdin: bool, stdin_filename: str, files_from, files_from0) -> list[str] | None:
    """Check how the sources are given; the paths --files-from lists (None without it)."""
    if files_from and files_from0:
        raise click.UsageError("give --files-from or --files-from0, not both")
    listing = files_from or files_from0
    if from_stdin:
        if paths or listing:
            raise click.UsageError("--stdin backs up standard input alone: give no PATH and no --files-from")
        try:
            check_entry_name(stdin_filename)
        except KdistError:
            raise click.BadParameter(f"{stdin_filename!r}: a file name, without /", param_hint="--stdin-filename") \
                from None
        return None
    if not paths:
        raise click.UsageError("give a directory to back up (or --stdin)")
    if listing is None:
        return None
    if len(paths) != 1:
        raise click.UsageError("--files-from needs the one directory the listed paths are in: "
                               "kdist snapshot create DIR --files-from FILE")
    base = os.path.abspath(paths[0])
    files = _read_list(listing, nul=bool(files_from0))
    outside = [p for p in files if os.path.commonpath([base, p]) != base]
    if outside:
        raise click.BadParameter(f"{printable(outside[0])} is not in {printable(base)}"
                                 + (f" (nor are {len(outside) - 1} more)" if len(outside) > 1 else ""),
                                 param_hint="--files-from")
    return files


def _create_from_stdin(repo, name, tags, description, checkpoint_interval, as_json, host, results: list) -> bool:
    """``snapshot create --stdin``: one snapshot of the source ``stdin:NAME``."""
    if sys.stdin.isatty():
        raise click.UsageError("standard input is a terminal: pipe the data to back up into kdist")
    opts = BackupOptions(tags=list(tags), description=description, checkpoint_interval=checkpoint_interval,
                         host=backup_host(repo.identity, host))
    source = Source.local(f"stdin:{name}", opts.host)
    progress = ProgressLine()
    try:
        snap = Uploader(repo, opts, progress=lambda st, _l: progress.update(st.files_read, st.bytes_read, "reading: ")
                        ).backup_stream(sys.stdin.buffer, name, source)
    except KdistError as exc:
        progress.close()
        _record_failure(repo, source.path, opts.host, exc)
        raise
    progress.close()
    results.append(snap)
    if as_json:
        repo.close()
        click.echo(json.dumps([{**_snapshot_json(snap), "requests": storage_requests(repo)}], indent=2))
    else:
        t = snap.totals
        click.echo(f"snapshot {snap.short_id} of {printable(snap.source.path)}: {human_bytes(t['bytes'])} from "
                   f"standard input, new data {human_bytes(t['new_bytes'])}, {snap.end - snap.start:.1f} s")
    return False


def _record_failure(repo, path: str, host: str, exc: KdistError) -> None:
    """Record the failed backup of ``path`` in the repository (``kdist fleet status`` shows it),
    if the repository still takes a blob; the backup's own error is what the command reports."""
    from kdist.failures import try_record_failure

    source = Source.local(path, host)  # (an absolute path, or stdin:NAME)
    why = try_record_failure(repo.manifests, source.host, source.user, source.path, str(exc),
                             exit_codes.exit_code_for(exc))
    if why:
        click.echo(f"kdist: warning: the failure could not be recorded in the repository: {printable(why)}",
                   err=True)


def _backup_metrics(metrics, host: str, results: list, success: bool, duration: float) -> None:
    from kdist.metrics import export

    totals = {k: sum(s.totals.get(k, 0) for s in results) for k in ("files", "bytes", "bytes_read", "new_bytes",
                                                                      "errors")}
    export(metrics, "backup", {"host": host}, {"snapshots": len(results), **totals}, success, duration,
           {"errors": "Files or directories the last backup could not read",
            "new_bytes": "Bytes the last backup added to the repository (after deduplication and compression)"})


def _create(repo, paths, excludes, tags, description, one_file_system, checkpoint_interval, workers, processes,
            as_json, host, results: list, files: list[str] | None = None) -> bool:
    from kdist.processes import ProcessPool, auto_processes, measure

    opts = BackupOptions(excludes=list(excludes), tags=list(tags), description=description,
                         one_file_system=one_file_system, checkpoint_interval=checkpoint_interval,
                         host=backup_host(repo.identity, host), files=files)
    if workers:
        opts.workers = workers
    # Several processes fork before this process starts a thread, so the trees are measured first.
    measured, auto = {}, not processes
    if processes != 1 and repo.storage.shared_between_processes:
        for path in paths:
            try:
                measured[path] = measure(path, opts)
            except KdistError as exc:
                _record_failure(repo, os.path.abspath(path), opts.host, exc)
                raise
        if auto:
            processes = max(auto_processes(m.entries) for m in measured.values())
    if processes > 1 and measured and (throttle := throttled_storage(repo.storage)) is not None:
        throttle.share(processes)  # --limit-upload is the whole backup's, not each process's
    pool = ProcessPool.fork(repo, processes) if processes > 1 and measured else None
    with pool or contextlib.nullcontext():
        partial, requests = False, [{}]
        for path in paths:
            if results:
                requests.append(storage_requests(repo))
            progress = ProgressLine()
            show = lambda st, _l: progress.update(st.files_read, st.bytes_read, "reading: ")  # noqa: E731
            try:
                if pool is not None and (not auto or auto_processes(measured[path].entries) > 1):
                    snap = pool.backup(path, opts, measured[path], progress=show)
                else:
                    snap = Uploader(repo, replace(opts), progress=show).backup(path)
            except KdistError as exc:
                progress.close()
                _record_failure(repo, os.path.abspath(path), opts.host, exc)
                raise
            finally:
                progress.close()
            results.append(snap)
            partial = partial or snap.totals["errors"] > 0
            if not as_json:
                t = snap.totals
                click.echo(f"snapshot {snap.short_id} of {printable(snap.source.path)}: {t['files']} files, "
                           f"{t['dirs']} dirs, " + (f"{t['special']} special, " if t.get("special") else "")
                           + f"{human_bytes(t['bytes'])}; read {t['files_read']} files ({human_bytes(t['bytes_read'])}), "
                           f"reused {t['files_reused']}, new data {human_bytes(t['new_bytes'])}, "
                           f"{snap.end - snap.start:.1f} s")
                for err in snap.errors:
                    click.echo(f"  warning: {printable(err['path'])}: {printable(err['error'])}", err=True)
                if t["errors"]:
                    click.echo(f"  {t['errors']} file(s) or directories could not be backed up completely", err=True)
    if as_json:
        repo.close()  # the session marker's retirement counts too (closing again later is a no-op)
        requests.append(storage_requests(repo))
        # each snapshot's storage requests: the first's include opening the repository, the last's closing it
        click.echo(json.dumps([{**_snapshot_json(s), "requests": _minus(requests[i + 1], requests[i])}
                               for i, s in enumerate(results)], indent=2))
    return partial


@snapshot_group.command("list")
@filter_options
@click.option("--all", "include_checkpoints", is_flag=True, help="Include checkpoints of unfinished backups.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def list_(repo, where, include_checkpoints, as_json):
    """List snapshots, oldest first."""
    labels = {}
    labels.update(visible_labels(repo.identity))  # a host key lists its own host's
    snaps = where.select(list_snapshots(repo.manifests, include_checkpoints=include_checkpoints, **labels))
    if as_json:
        click.echo(json.dumps([_snapshot_json(s) for s in snaps], indent=2))
        return
    if not snaps:
        click.echo("no snapshots")
        return
    hosts = [printable(s.source.host) for s in snaps]
    width = max(4, *map(len, hosts)) + 2  # whole host names: fleets name hosts alike up to a suffix
    click.echo(f"{'ID':<10}{'time':<21}{'host':<{width}}{'files':>8}{'size':>12}  path")
    for s, host in zip(snaps, hosts):
        mark = " (checkpoint)" if s.checkpoint else ""
        tags = f"  [{', '.join(printable(t) for t in s.tags)}]" if s.tags else ""
        click.echo(f"{s.short_id:<10}{local_time(s.end):<21}{host:<{width}}{s.totals.get('files', 0):>8}"
                   f"{human_bytes(s.totals.get('bytes', 0)):>12}  {printable(s.source.path)}{mark}{tags}")
    click.echo(f"{len(snaps)} snapshot(s)")


@snapshot_group.command("restore")
@click.argument("snapshot_ref")
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--include", "subpath", default=None, metavar="PATH",
              help="Restore only this path inside the snapshot (a file or a directory, as `ls` shows it).")
@filter_options
@click.option("--overwrite", type=click.Choice(OVERWRITE_POLICIES), default=DEFAULT_OVERWRITE, show_default=True,
              help="Existing files: if-changed keeps those with the snapshot's bytes (compared by hash: read, "
                   "not downloaded) and replaces the others; always replaces them all; never keeps them all "
                   "(exit 3 if any differs from the snapshot).")
@click.option("--dry-run", is_flag=True, help="Show what would be created, replaced or left, and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@with_repository(read_only=True)
def restore(repo, snapshot_ref, target, subpath, where, overwrite, dry_run, as_json):
    """Restore SNAPSHOT (id prefix, or 'latest' of the snapshots --host/--path/--tag select) into TARGET.

    Afterwards every file and symlink restored matches the snapshot (with --overwrite if-changed,
    the default, or always): a second restore into the same target writes nothing."""
    snap = resolve(repo, snapshot_ref, where)
    if dry_run:
        return _restore_plan(repo, snap, target, subpath, overwrite, as_json)
    progress = ProgressLine(total_bytes=snap.totals.get("bytes"))
    try:
        stats = Restorer(repo, overwrite=overwrite,
                         progress=lambda st: progress.update(st.files, st.bytes, "restoring: ")).restore(snap, target, subpath)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps({"snapshot": snap.id, "target": target, **stats.as_dict(),
                               "requests": storage_requests(repo)}, indent=2))
    else:
        click.echo(f"restored snapshot {snap.short_id} to {printable(target)}: {stats.files} files, {stats.dirs} dirs, "
                   f"{stats.symlinks} symlinks, {human_bytes(stats.bytes)}"
                   + (f", {stats.special} fifos and devices" if stats.special else "")
                   + (f" ({stats.hardlinks} of the files as hard links)" if stats.hardlinks else "")
                   + (f"; {stats.unchanged} existing files already matched" if stats.unchanged else ""))
        if stats.special_skipped:
            click.echo(f"{stats.special_skipped} socket(s) or device(s) recorded in the snapshot were not made "
                       "(a socket is made by the program that listens on it; a device node needs root)", err=True)
        if stats.xattrs_skipped:
            click.echo(f"{stats.xattrs_skipped} extended attribute(s) outside user.* and ACLs were not written "
                       "(security.* and trusted.* need root)", err=True)
        for err in stats.error_list:
            click.echo(f"  error: {printable(err['path'])}: {printable(err['error'])}", err=True)
    if stats.left_different:
        click.echo(f"{stats.left_different} existing file(s) differ from the snapshot and were left alone "
                   "(--overwrite never)", err=True)
    if stats.errors:
        click.echo(f"{stats.errors} item(s) could not be restored", err=True)
    if stats.errors or stats.left_different:
        sys.exit(exit_codes.PARTIAL)


def _restore_plan(repo, snap, target, subpath, overwrite, as_json) -> None:
    from kdist.restore_plan import plan_restore

    plan = plan_restore(repo, find_subtree(repo, snap, subpath), target, overwrite)
    if as_json:
        click.echo(json.dumps({"snapshot": snap.id, "target": target, "dry_run": True, "overwrite": overwrite,
                               "counts": plan.counts, "changes": [{"action": a, "path": p} for a, p in plan.changes]},
                              indent=2))
    else:
        for what, path in plan.changes:
            click.echo(f"{what:<8} {printable(path)}")
        click.echo(", ".join(f"{n} to {what}" for what, n in sorted(plan.counts.items())) or "nothing to restore")
    if plan.differences_left:
        sys.exit(exit_codes.PARTIAL)


@snapshot_group.command("ls")
@click.argument("snapshot_ref")
@click.argument("path", required=False)
@click.option("-r", "--recursive", is_flag=True, help="List the whole subtree.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def ls(repo, snapshot_ref, path, recursive, where, as_json):
    """List the entries of a directory in a snapshot."""
    snap = resolve(repo, snapshot_ref, where)
    start = find_subtree(repo, snap, path)
    rows = browse.walk(repo, start, (path or "").strip("/"), recursive)
    if as_json:
        click.echo(json.dumps([{"path": p, "type": e.type, "mode": oct(e.mode), "size": e.size,
                                "mtime_ns": e.mtime_ns, "target": e.target or None} for p, e in rows], indent=2))
        return
    for p, e in rows:
        extra = f" -> {printable(e.target)}" if e.target else ("/" if e.type == TYPE_DIR else "")
        click.echo(f"{e.type} {oct(e.mode)[2:]:>4} {e.size:>12} {local_time(e.mtime_ns / 1e9)}  {printable(p)}{extra}")


@snapshot_group.command("diff")
@click.argument("first")
@click.argument("second")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def diff(repo, first, second, where, as_json):
    """Show what was added (+), removed (-) and modified (M) between two snapshots."""
    a, b = resolve(repo, first, where), resolve(repo, second, where)
    changes = browse.diff(repo, a.root, b.root)
    if as_json:
        click.echo(json.dumps([{"change": c, "path": p} for c, p in changes], indent=2))
        return
    for c, p in changes:
        click.echo(f"{c} {printable(p)}")
    click.echo(f"{len(changes)} change(s) between {a.short_id} and {b.short_id}")


@snapshot_group.command("verify")
@click.argument("snapshot_ref")
@click.option("--percent", type=click.FloatRange(0, 100), default=100.0, show_default=True,
              help="Share of file contents to re-read (directory objects are always read).")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def verify(repo, snapshot_ref, percent, where, as_json):
    """Re-read and authenticate every content of a snapshot (or a random share)."""
    repo.contents.cache_contents = False  # verify what the repository holds, not the local copies
    snap = resolve(repo, snapshot_ref, where)
    report = browse.verify(repo, snap.root, percent)
    if as_json:
        click.echo(json.dumps({"snapshot": snap.id, **report.as_dict()}, indent=2))
    else:
        for p in report.problems:
            click.echo(f"  damaged: {printable(p['path'])}: {printable(p['error'])}", err=True)
        click.echo(f"verified snapshot {snap.short_id}: {report.files} files, {report.contents_read} contents "
                   f"({human_bytes(report.bytes_read)}) read, {len(report.problems)} problem(s)")
    if report.problems:
        sys.exit(exit_codes.CORRUPTION)


def _group_by(ctx, param, value):
    fields = tuple(f.strip() for f in value.split(",") if f.strip())
    from kdist.snapshot import GROUP_FIELDS

    bad = [f for f in fields if f not in GROUP_FIELDS]
    if bad or not fields:
        raise click.BadParameter(f"{value!r}: give a comma-separated list of {', '.join(GROUP_FIELDS)}")
    return fields


@snapshot_group.command("forget")
@click.option("--keep-last", type=click.IntRange(0), default=0)
@click.option("--keep-hourly", type=click.IntRange(0), default=0)
@click.option("--keep-daily", type=click.IntRange(0), default=0)
@click.option("--keep-weekly", type=click.IntRange(0), default=0)
@click.option("--keep-monthly", type=click.IntRange(0), default=0)
@click.option("--keep-yearly", type=click.IntRange(0), default=0)
@click.option("--keep-within", type=DURATION, default=0.0, metavar="DURATION",
              help="Keep every snapshot taken within DURATION (e.g. 14d, 36h) before the newest of its group.")
@click.option("--keep-tag", "keep_tags", multiple=True, help="Always keep snapshots with this tag.")
@filter_options
@click.option("--group-by", default="host,user,path", show_default=True, callback=_group_by, metavar="FIELDS",
              help="Decide per group of snapshots with the same host, user, path and/or tags. Leaving host out "
                   "is refused on a repository with host keys: a host could crowd others out of count rules.")
@click.option("--id", "ids", multiple=True, help="Forget exactly this snapshot (id prefix); repeatable.")
@click.option("--dry-run", is_flag=True, help="Only show what would be forgotten.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(roles=(ADMIN, MAINTENANCE), what="forget snapshots")
def forget(repo, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within, keep_tags,
           where, group_by, ids, dry_run, as_json):
    """Forget snapshots by retention policy (per group, among those --host/--path/--tag select) or by
    id, and the checkpoints of backups that died and were since superseded. Data is freed later by
    `kdist gc run`."""
    from kdist.retention import RetentionPolicy
    from kdist.snapshot import ForgetPlan, dead_checkpoints, plan_forget
    from repo_format.keyslots import HOST as HOST_ROLE

    policy = RetentionPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                             tuple(keep_tags), keep_within)
    if ids:
        if where:
            raise click.UsageError("--id names snapshots itself: give it without --host, --path or --tag")
        plan = ForgetPlan(forget=[resolve_snapshot(repo.manifests, i) for i in ids])
    else:
        if policy.is_empty():
            raise click.UsageError("give a --keep-* policy or --id; refusing to forget every snapshot")
        plan = plan_forget(repo.manifests, policy, where, group_by)
        if "host" not in group_by and any(k.role == HOST_ROLE for k in repo.manifests.keys.values()):
            raise click.UsageError("this repository has host keys: --group-by must include host, or one host's "
                                   "snapshots could push another host's out of the count rules")
        # what maintenance would forget too, once this forget is done
        plan.checkpoints = dead_checkpoints(repo, where, dry_run, frozenset(s.id for s in plan.forget))
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "forget": [s.id for s in plan.forget],
                               "keep": [s.id for s in plan.keep],
                               "reasons": {s.id: plan.reasons.get(s.id, []) for s in plan.keep},
                               "checkpoints": [s.id for s in plan.checkpoints]}, indent=2))
    else:
        for s in plan.keep:
            click.echo(f"keep    {s.short_id}  {local_time(s.end)}  {printable(str(s.source))}  "
                       f"({', '.join(plan.reasons.get(s.id, []))})")
        for s in plan.forget:
            click.echo(f"forget  {s.short_id}  {local_time(s.end)}  {printable(str(s.source))}")
        for s in plan.checkpoints:
            click.echo(f"forget  {s.short_id}  {local_time(s.end)}  {printable(str(s.source))}  (checkpoint of a backup "
                       "that died; a later snapshot of its source exists)")
    gone = plan.forget + plan.checkpoints
    if not dry_run:
        edits = tag_edits(repo.manifests.find(type=TAGS_LABEL))  # a forgotten snapshot's tag edits go with it
        repo.manifests.delete([s.id for s in gone] + [i for s in gone for i in edits.get(s.id, ((), ()))[1]])
        if not as_json:
            click.echo(f"forgot {len(plan.forget)} snapshot(s)" + (f" and {len(plan.checkpoints)} checkpoint(s)"
                                                                     if plan.checkpoints else ""))
    elif not as_json:
        click.echo(f"dry run: would forget {len(plan.forget)} snapshot(s)"
                   + (f" and {len(plan.checkpoints)} checkpoint(s)" if plan.checkpoints else ""))


def _tag_values(values, option: str) -> list[str]:
    for t in values:
        if not t.strip() or "," in t:  # (--tag a,b selects snapshots with both: a tag cannot hold one)
            raise click.BadParameter(f"{t!r}: a tag holds no comma and is not empty", param_hint=option)
    return list(values)


@snapshot_group.command("tag")
@click.argument("snapshot_refs", nargs=-1, metavar="[SNAPSHOT]...")
@click.option("--add", "add", multiple=True, metavar="TAG", help="Add this tag (repeatable).")
@click.option("--remove", "remove", multiple=True, metavar="TAG", help="Remove this tag (repeatable).")
@click.option("--set", "set_", multiple=True, metavar="TAG",
              help="Make the tags exactly these (repeatable; --set '' removes them all).")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(roles=(ADMIN, MAINTENANCE), what="edit tags")
def tag(repo, snapshot_refs, add, remove, set_, where, as_json):
    """Add, remove or set the tags of snapshots: those named, or all those --host, --path and
    --tag select. A snapshot keeps its id; list, latest and forget --keep-tag follow the new tags."""
    if set_ and (add or remove):
        raise click.UsageError("--set replaces all tags: give it alone, or use --add and --remove")
    if not (set_ or add or remove):
        raise click.UsageError("give --add, --remove or --set")
    if not snapshot_refs and not where:
        raise click.UsageError("name the snapshots to tag (or select them with --host, --path or --tag)")
    add, remove = _tag_values(add, "--add"), _tag_values(remove, "--remove")
    new_set = None if not set_ else ([] if list(set_) == [""] else _tag_values(set_, "--set"))
    if snapshot_refs:
        snaps = list({s.id: s for s in (resolve(repo, ref, where) for ref in snapshot_refs)}.values())
    else:
        snaps = where.select(list_snapshots(repo.manifests))
    changed = edit_tags(repo.manifests, snaps, add, remove, new_set)
    if as_json:
        click.echo(json.dumps([_snapshot_json(s) for s in changed], indent=2))
        return
    for s in changed:
        click.echo(f"{s.short_id}  {printable(str(s.source))}  [{', '.join(printable(t) for t in s.tags)}]")
    click.echo(f"{len(changed)} snapshot(s) changed")
