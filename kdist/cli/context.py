"""How a command finds its repository and password, and the decorator that opens it.

The repository comes from ``--repo`` or ``KDIST_REPO`` (a path or ``s3://bucket/prefix``), the
password from ``KDIST_PASSWORD``, ``--password-file`` or a prompt, never from a command-line
argument. ``with_repository`` opens the repository before the command runs and closes it after,
borg-style; read-only commands get a read-only storage so they cannot change anything.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from repo_format.errors import KdistError, RepositoryNotFound
from repo_format.local_cache import CacheSettings
from repo_format.repository import Repository
from repo_format.storage import open_storage
from repo_format.storage.wrappers import (AppendOnlyStorage, CountingStorage, ReadOnlyStorage, RetryingStorage,
                                          counting_storage)

from kdist.cli.exit_codes import exit_code_for


def repo_options(fn):
    fn = click.option("--password-file", type=click.Path(dir_okay=False), envvar="KDIST_PASSWORD_FILE",
                      help="Read the password from this file (first line).")(fn)
    fn = click.option("--endpoint-url", envvar="KDIST_ENDPOINT_URL", default=None,
                      help="S3-compatible endpoint (for s3:// repositories).")(fn)
    fn = click.option("--repo", "repo_location", envvar="KDIST_REPO", required=True,
                      help="Repository: a directory path or s3://bucket/prefix (env KDIST_REPO).")(fn)
    return fn


def cache_options(fn):
    fn = click.option("--cache-limit", envvar="KDIST_CACHE_LIMIT", default=None, metavar="SIZE",
                      help="Largest size of this repository's local cache, e.g. 5GiB (default 10GiB).")(fn)
    fn = click.option("--no-cache", is_flag=True, default=False,
                      help="Use no local cache: fetch the index from the repository (env KDIST_NO_CACHE=1).")(fn)
    fn = click.option("--cache-dir", envvar="KDIST_CACHE_DIR", default=None, type=click.Path(file_okay=False),
                      help="Where local caches live (default $XDG_CACHE_HOME/kdist or ~/.cache/kdist).")(fn)
    return fn


def cache_settings(cache_dir: str | None, no_cache: bool, cache_limit: str | None) -> CacheSettings:
    try:
        return CacheSettings.from_environment(cache_dir, no_cache, cache_limit)
    except ValueError as exc:
        raise click.UsageError(f"--cache-limit: {exc}")


def read_password(password_file: str | None, confirm: bool = False, prompt: str = "Repository password") -> str:
    env = os.environ.get("KDIST_PASSWORD")
    if env is not None:
        return env
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise click.UsageError(f"cannot read password file {password_file}: {exc.strerror}")
    if not sys.stdin.isatty():
        raise click.UsageError("no password: set KDIST_PASSWORD, use --password-file, or run in a terminal")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


def make_storage(location: str, endpoint_url: str | None, create: bool = False, read_only: bool = False,
                 append_only: bool = False):
    """The storage stack of a command: counted, retried; read-only, or append-only for the
    backup path (it never deletes or replaces a blob, so it is refused here before storage
    policy refuses it there)."""
    if not create and "://" not in location and not os.path.isdir(os.path.expanduser(location)):
        raise RepositoryNotFound(f"no kdist repository at {location} (no such directory)")
    storage = CountingStorage(RetryingStorage(open_storage(location, endpoint_url=endpoint_url, create=create)))
    if read_only:
        return ReadOnlyStorage(storage)
    return AppendOnlyStorage(storage) if append_only else storage


def storage_requests(repo: Repository) -> dict[str, dict[str, int]]:
    """Storage requests this command made so far, by kind: ``{"GET": {"calls", "bytes"}, ...}``."""
    counting = counting_storage(repo.storage)
    return counting.counts() if counting is not None else {}


def _warn_unreadable(repo: Repository) -> None:
    for name in repo.manifests.unreadable:
        click.echo(f"kdist: warning: manifest blob {name} does not open or decode and was passed over (its "
                   "snapshots, if any, are not shown; `kdist repo check` names it, maintenance refuses to run "
                   "until an admin removes it)", err=True)


def fail(exc: BaseException) -> None:
    click.echo(f"kdist: error: {exc}", err=True)
    sys.exit(exit_code_for(exc))


def key_option(fn):
    return click.option("--key-id", envvar="KDIST_KEY_ID", default=None, metavar="ID",
                        help="The key slot the password opens (env KDIST_KEY_ID; `kdist key list`); "
                             "without it the admin password, then every key slot, is tried.")(fn)


def with_repository(read_only: bool = False, append_only: bool = False, roles: tuple = (), what: str = ""):
    """Open the repository named by the options and pass it as ``repo``; map errors to exit codes.

    ``roles``: the key roles that may run the command (``what`` names it in the refusal), checked
    before it runs; empty: every role."""

    def decorate(fn):
        @repo_options
        @key_option
        @cache_options
        @functools.wraps(fn)
        def wrapper(repo_location, endpoint_url, password_file, key_id, cache_dir, no_cache, cache_limit, **kwargs):
            try:
                cache = cache_settings(cache_dir, no_cache, cache_limit)
                storage = make_storage(repo_location, endpoint_url, read_only=read_only, append_only=append_only)
                repo = Repository.open(storage, read_password(password_file), key_id=key_id, cache=cache)
                # listing, restoring and backing up decide nothing from a record they cannot read:
                # one unreadable manifest blob must not stop them (ManifestStore.skip_unreadable)
                repo.manifests.skip_unreadable = read_only or append_only
                if roles:
                    repo.require(*roles, what=what or fn.__name__.replace("_", " "))
                try:
                    result = fn(repo=repo, **kwargs)
                except BaseException:
                    if not read_only:  # keep what was uploaded: the next run reuses it
                        try:
                            repo.close()
                        except KdistError:
                            pass
                    raise
                finally:
                    _warn_unreadable(repo)
                if read_only:
                    repo.trim_cache()
                else:
                    repo.close()
                return result
            except KdistError as exc:
                fail(exc)

        return wrapper

    return decorate
