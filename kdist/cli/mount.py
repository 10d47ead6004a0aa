"""``kdist mount MOUNTPOINT``: the snapshots as a read-only file system (``kdist.mount``)."""

from __future__ import annotations

import click

from kdist.cli.context import filter_options, with_repository


@click.command("mount")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@filter_options
@click.option("--allow-other", is_flag=True, help="Let other users read it too (FUSE's allow_other; "
                                                 "/etc/fuse.conf must have user_allow_other when not root).")
@with_repository(read_only=True)
def mount_command(repo, mountpoint, where, allow_other):
    """Mount the snapshots (those --host, --path and --tag select) read-only at MOUNTPOINT:
    hosts/HOST/TIME_ID/... for each snapshot, hosts/HOST/latest, ids/ID. Runs until unmounted
    (`fusermount3 -u MOUNTPOINT`, or Ctrl-C)."""
    from kdist.mount import mount

    click.echo(f"mounting the snapshots at {mountpoint} (read-only); unmount with `fusermount3 -u {mountpoint}` "
               "or Ctrl-C", err=True)
    mount(repo, mountpoint, where, allow_other)
