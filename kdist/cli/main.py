"""The ``kdist`` command: the top-level group and its exit-code mapping."""

from __future__ import annotations

import sys

import click

from repo_format.errors import KdistError

from kdist import __version__
from kdist.cli.context import fail
from kdist.cli.maintenance import gc_group, index_group, maintenance_group
from kdist.cli.repo import repo_group
from kdist.cli.snapshot import snapshot_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdist")
def cli():
    """kdist: deduplicating, compressed, end-to-end encrypted backups, for one machine or a fleet."""


cli.add_command(repo_group)
cli.add_command(snapshot_group)
cli.add_command(gc_group)
cli.add_command(maintenance_group)
cli.add_command(index_group)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KdistError as exc:  # errors raised outside a command's own handling
        fail(exc)
    except KeyboardInterrupt:
        click.echo("kdist: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
