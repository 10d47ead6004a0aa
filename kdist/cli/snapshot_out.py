"""``kdist snapshot find|cat|dump``: what a help desk asks of old snapshots without restoring.

All three write to standard output and stop the way ``cat`` does when its reader goes away
(``| head``): killed by SIGPIPE, exit status 141 in a shell, nothing on standard error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import click

from kdist.cli.context import filter_options, with_repository
from kdist.cli.text import local_time, printable
from kdist.restore import find_subtree
from kdist.snapshot import TYPE_DIR, Snapshot, list_snapshots, resolve_snapshot, visible_labels


def resolve(repo, ref: str, where) -> Snapshot:
    return resolve_snapshot(repo.manifests, ref, where=where, **visible_labels(repo.identity))


@contextlib.contextmanager
def _ending_like_cat_on_a_closed_pipe():
    """A reader of standard output that goes away (``| head``) ends the command as it ends
    ``cat``: killed by SIGPIPE (status 141 in a shell), nothing on standard error. Python ignores
    SIGPIPE, which stays so while the command runs (a reset S3 connection is an error botocore
    retries, not a signal); only the write that finds the pipe closed raises the signal."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush must not fail again
        os.dup2(devnull, sys.stdout.fileno())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        raise  # (only where the signal is ignored after all)


def _write_object(repo, oid: str, out) -> None:
    with repo.objects.open(oid) as reader:
        while chunk := reader.read(1 << 20):
            out.write(chunk)


@click.command("find")
@click.argument("pattern")
@filter_options
@click.option("-i", "--ignore-case", is_flag=True, help="Match names regardless of case.")
@click.option("--newest", type=click.IntRange(min=1), default=None, metavar="N",
              help="Search only the N newest snapshots (of those --host/--path/--tag select).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def find(repo, pattern, where, ignore_case, newest, as_json):
    """Find files and directories in every snapshot, newest first, with size and mtime.

    PATTERN without a slash matches names at any depth (`*.conf`, `id_rsa*`); with a slash it
    matches whole paths from the snapshot's root (`/etc/ssh/*`, `/home/**/.bashrc`; `*` stops at
    a slash, `**` spans directories). Quote it, so that the shell does not expand it."""
    from kdist.find import Finder, Pattern

    try:
        finder = Finder(repo, Pattern(pattern, ignore_case))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    snaps = [s for s in where.select(list_snapshots(repo.manifests, **visible_labels(repo.identity)))]
    snaps.sort(key=lambda s: (s.end, s.ts), reverse=True)
    snaps = snaps[:newest] if newest else snaps
    found = [(s, finder.find(s)) for s in snaps]
    with _ending_like_cat_on_a_closed_pipe():
        _print_found(found, as_json)


def _print_found(found: list, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([
            {"snapshot": s.id, "time": s.end, "host": s.source.host, "path": s.source.path,
             "matches": [{"path": "/" + m.path, "type": m.entry.type, "mode": oct(m.entry.mode), "size": m.entry.size,
                          "mtime_ns": m.entry.mtime_ns} for m in matches]}
            for s, matches in found if matches], indent=2))
        return
    for s, matches in found:
        if not matches:
            continue
        click.echo(f"snapshot {s.short_id} of {printable(s.source.host)}:{printable(s.source.path)} at "
                   f"{local_time(s.end)}")
        for m in matches:
            e = m.entry
            tail = "/" if e.type == TYPE_DIR else (f" -> {printable(e.target)}" if e.target else "")
            click.echo(f"  {e.type} {oct(e.mode)[2:]:>4} {e.size:>12} {local_time(e.mtime_ns / 1e9)}  "
                       f"/{printable(m.path)}{tail}")
    hits = sum(1 for _s, m in found if m)
    click.echo(f"found in {hits} of {len(found)} snapshot(s)", err=True)


@click.command("cat")
@click.argument("snapshot_ref")
@click.argument("path")
@filter_options
@with_repository(read_only=True)
def cat(repo, snapshot_ref, path, where):
    """Write one file of a snapshot to standard output."""
    entry = find_subtree(repo, resolve(repo, snapshot_ref, where), path)
    if entry.type != "f":
        raise click.UsageError(f"{path} is not a file in the snapshot (`snapshot dump` writes a directory as tar)")
    out = sys.stdout.buffer
    with _ending_like_cat_on_a_closed_pipe():
        _write_object(repo, entry.oid, out)
        out.flush()


@click.command("dump")
@click.argument("snapshot_ref")
@click.argument("path", required=False, default="/")
@filter_options
@with_repository(read_only=True)
def dump(repo, snapshot_ref, path, where):
    """Write a file of a snapshot as it is, or a directory as a tar stream, to standard output.

    The tar stream (POSIX pax) holds each entry's mode, owner (ids and names), mtime and symlink
    target; a directory is written under its own name (`etc/ssh` gives `ssh/...`), the whole
    snapshot (PATH `/`, the default) with its entries at the top: `kdist snapshot dump latest
    /etc | tar -x -C /tmp/restore`."""
    from kdist.find import write_tar

    entry = find_subtree(repo, resolve(repo, snapshot_ref, where), path)
    if entry.type != "f" and sys.stdout.isatty():
        raise click.UsageError("standard output is a terminal: send the tar stream to a file or a pipe")
    out = sys.stdout.buffer
    parts = [p for p in path.split("/") if p not in ("", ".")]
    with _ending_like_cat_on_a_closed_pipe():
        if entry.type == "f":
            _write_object(repo, entry.oid, out)
        else:
            write_tar(repo, entry, parts[-1] if parts else "", out,
                      on_skip=lambda p, why: click.echo(f"kdist: warning: {printable(p)}: {printable(why)}", err=True))
        out.flush()
