"""The ``kdist`` command: the top-level group and its exit-code mapping."""

from __future__ import annotations

import os
import sys

import click

from repo_format.errors import KdistError

from kdist import __version__
from kdist.allocator import tune_process
from kdist.cli.context import fail
from kdist.cli.exit_codes import FAILURE
from kdist.cli.cache import cache_group
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
cli.add_command(cache_group)


def _raw_bytes_for_undecodable_names() -> None:
    """A file name that is not valid UTF-8 is printed as its own bytes (as ``ls`` would), not
    turned into a UnicodeEncodeError that fails ``snapshot ls`` or ``diff``."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def main() -> None:
    tune_process()
    _raw_bytes_for_undecodable_names()
    try:
        cli(standalone_mode=True)
    except KdistError as exc:  # errors raised outside a command's own handling
        fail(exc)
    except KeyboardInterrupt:
        click.echo("kdist: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: one clear line and exit code 1, not a traceback
        if os.environ.get("KDIST_DEBUG") == "1":
            raise
        click.echo(f"kdist: internal error: {type(exc).__name__}: {exc}"[:2000], err=True)
        click.echo("kdist: this is a bug in kdist; KDIST_DEBUG=1 shows the traceback", err=True)
        sys.exit(FAILURE)


if __name__ == "__main__":
    main()
