"""The ``kdist`` command: the top-level group and its exit-code mapping.

A command group's module is imported only when the command line names it (``kdist snapshot list``
does not import ``repo check``'s or maintenance's code), and every one for ``kdist --help``:
start-up costs what the command uses. ``tests/backup/test_startup.py`` checks which modules a
command imports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, MutableMapping

import click

from repo_format.errors import KdistError

from kdist import __version__
from kdist.allocator import tune_process
from kdist.cli.exit_codes import FAILURE

# name -> (module, attribute) of each command group, imported on first use
_GROUPS = {
    "repo": ("kdist.cli.repo", "repo_group"),
    "snapshot": ("kdist.cli.snapshot", "snapshot_group"),
    "gc": ("kdist.cli.maintenance", "gc_group"),
    "maintenance": ("kdist.cli.maintenance", "maintenance_group"),
    "index": ("kdist.cli.maintenance", "index_group"),
    "cache": ("kdist.cli.cache", "cache_group"),
    "key": ("kdist.cli.key", "key_group"),
    "fleet": ("kdist.cli.fleet", "fleet_group"),
    "mount": ("kdist.cli.mount", "mount_command"),
}


class _LazyCommands(MutableMapping):
    """``Group.commands`` whose groups are imported when looked up: listing the names (usage
    errors, shell completion) imports nothing; ``cli.commands[name]``, ``.get`` and ``.items()``
    return the real groups."""

    def __init__(self, groups: dict[str, tuple[str, str]]):
        self._where = dict(groups)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            module, attr = self._where[name]  # KeyError for an unknown name, as a dict
            # __import__, not importlib.import_module: -X importtime reports the module only then
            self._loaded[name] = getattr(__import__(module, fromlist=[attr]), attr)
        return self._loaded[name]

    def __setitem__(self, name: str, cmd: click.Command) -> None:
        self._where.pop(name, None)
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        if self._where.pop(name, None) is None and name not in self._loaded:
            raise KeyError(name)
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter({**self._where, **self._loaded})

    def __len__(self) -> int:
        return len(self._where.keys() | self._loaded.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._loaded


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, commands=_LazyCommands(_GROUPS))
@click.version_option(__version__, prog_name="kdist")
def cli():
    """kdist: deduplicating, compressed, end-to-end encrypted backups, for one machine or a fleet."""
    from kdist.access import reset_process_settings

    reset_process_settings()  # runs before the command's own options set them again


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
        from kdist.cli.context import fail

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
