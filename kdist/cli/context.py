"""How a command finds its repository and password, and the decorator that opens it.

The repository comes from ``--repo`` or ``KDIST_REPO`` (a path or ``s3://bucket/prefix``), the
password from ``--password-file``, else ``KDIST_PASSWORD`` or ``KDIST_PASSWORD_FILE``, else a
prompt (``kdist.access``: the one precedence every entry point uses), never from a command-line
argument. ``with_repository`` opens the repository before the command runs and closes it after,
borg-style; read-only commands get a read-only storage so they cannot change anything.
"""

from __future__ import annotations

import functools
import sys

import click

from repo_format.errors import KdistError
from repo_format.local_cache import CacheSettings
from repo_format.repository import Repository
from repo_format.storage.wrappers import counting_storage

from kdist.access import (REQUEST_TIMEOUT_ENV, TIMEOUT_ENV, PasswordSource, RepositorySpec, at_deadline,
                          parse_duration, set_limit, set_request_timeout, start_deadline)
from kdist.cli.exit_codes import exit_code_for



class Duration(click.ParamType):
    """A duration option's value (``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``) in seconds."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _duration_option(name: str, envvar: str, apply, help: str):
    return click.option(name, envvar=envvar, type=DURATION, default=None, metavar="DURATION", expose_value=False,
                        callback=lambda ctx, param, value: value is not None and apply(value), help=help)


def time_limit_options(fn):
    """``--timeout`` (the whole command) and ``--request-timeout`` (one storage request): both
    act when parsed, so every command taking them needs no parameter for them."""
    fn = _duration_option("--request-timeout", REQUEST_TIMEOUT_ENV, set_request_timeout,
                          "Longest a storage request waits for answers over all its attempts, e.g. 30s (default "
                          "2m; env KDIST_REQUEST_TIMEOUT); past it the command fails with exit 14.")(fn)
    fn = _duration_option("--timeout", TIMEOUT_ENV, start_deadline,
                          "Stop the whole command after this long, e.g. 6h (env KDIST_TIMEOUT): exit 14; a backup "
                          "stopped so keeps what its checkpoints hold.")(fn)
    return fn


def filter_options(fn):
    """``--host``, ``--path``, ``--tag``: which snapshots a command means (``latest`` among them;
    restic's semantics). Passed as ``where`` (``kdist.snapshot.SnapshotFilter``)."""
    fn = click.option("--tag", "filter_tags", multiple=True, metavar="TAG[,TAG...]",
                      help="Only snapshots with these tags (all of a comma-separated list; repeat the option "
                           "for any of several lists).")(fn)
    fn = click.option("--path", "filter_paths", multiple=True, metavar="PATH",
                      help="Only snapshots of this source path, as `snapshot list` shows it (repeatable).")(fn)
    fn = click.option("--host", "filter_hosts", multiple=True, metavar="HOST",
                      help="Only snapshots of this host (repeatable).")(fn)

    @functools.wraps(fn)
    def wrapper(*args, filter_hosts=(), filter_paths=(), filter_tags=(), **kwargs):
        for option, values in (("--host", filter_hosts), ("--path", filter_paths), ("--tag", filter_tags)):
            if any(not v.strip(" ,") for v in values):  # "$EMPTY" must not mean "every snapshot"
                raise click.UsageError(f"{option} was given an empty value")
        from kdist.snapshot import SnapshotFilter

        return fn(*args, where=SnapshotFilter.of(filter_hosts, filter_paths, filter_tags), **kwargs)

    return wrapper


def metrics_options(job: str, labels_of=lambda kwargs: {}):
    """``--metrics-file`` and ``--pushgateway``, passed as ``metrics`` (``kdist.metrics.MetricsTarget``).
    The command exports its own figures; if it fails before it does (the repository did not open:
    wrong password, storage down), this exports ``kdist_<job>_success 0`` with ``labels_of(its
    arguments)``, so an alert on success sees every failure."""

    def decorate(fn):
        fn = click.option("--pushgateway", envvar="KDIST_PUSHGATEWAY", default=None, metavar="URL",
                          help="Push this run's Prometheus metrics to this Pushgateway (env KDIST_PUSHGATEWAY).")(fn)
        fn = click.option("--metrics-file", envvar="KDIST_METRICS_FILE", default=None,
                          type=click.Path(),
                          help="Write this run's Prometheus metrics to this file, or to kdist_<job>_<labels>.prom in "
                               "this directory (node_exporter's textfile collector; env KDIST_METRICS_FILE).")(fn)

        @functools.wraps(fn)
        def wrapper(*args, metrics_file=None, pushgateway=None, **kwargs):
            from repo_format import clock

            from kdist.metrics import MetricsTarget, export

            target = MetricsTarget(metrics_file, pushgateway)
            started = clock.monotonic()
            ok = False
            if target:  # --timeout ends the process at once: say it failed first (unless the command did)
                at_deadline(lambda: target.exported or export(target, job, labels_of(kwargs), {}, False,
                                                               clock.monotonic() - started))
            try:
                result = fn(*args, metrics=target, **kwargs)
                ok = True
                return result
            except SystemExit as exc:
                ok = exc.code in (0, None)
                raise
            finally:
                if target and not target.exported and not ok:
                    export(target, job, labels_of(kwargs), {}, False, clock.monotonic() - started)

        return wrapper

    return decorate


def _rate_option(name: str, kind: str):
    from kdist.access import LIMIT_ENV

    def callback(ctx, param, value):
        if value is not None:
            set_limit(kind, value)

    return click.option(name, envvar=LIMIT_ENV[kind], type=click.FloatRange(min=0, min_open=True), default=None,
                        metavar="MB/s", expose_value=False, callback=callback,
                        help=f"At most this many MB (10^6 bytes) a second {'to' if kind == 'upload' else 'from'} the "
                             f"repository (a multi-process backup shares it; env {LIMIT_ENV[kind]}).")


def repo_options(fn):
    fn = _rate_option("--limit-download", "download")(fn)
    fn = _rate_option("--limit-upload", "upload")(fn)
    fn = time_limit_options(fn)
    # no envvar here: KDIST_PASSWORD_FILE is read by PasswordSource, below KDIST_PASSWORD's rank
    # and above nothing, and a flag given here must beat both (kdist.access)
    fn = click.option("--password-file", type=click.Path(dir_okay=False),
                      help="Read the password from this file's first line; wins over KDIST_PASSWORD and "
                           "KDIST_PASSWORD_FILE.")(fn)
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
    """The password by the one precedence (``kdist.access.PasswordSource``), prompting on a terminal."""
    return PasswordSource(file=password_file).read(prompt=prompt, confirm=confirm)


def new_password_option(fn):
    return click.option("--new-password-file", type=click.Path(dir_okay=False),
                        help="Read the new password from this file's first line; wins over KDIST_NEW_PASSWORD "
                             "and KDIST_NEW_PASSWORD_FILE.")(fn)


def read_new_password(new_password_file: str | None, prompt: str = "New repository password") -> str:
    """A new password (``repo change-password``, ``key add``): ``--new-password-file``, else
    ``KDIST_NEW_PASSWORD`` or ``KDIST_NEW_PASSWORD_FILE``, else a prompt with confirmation; the
    same precedence as the password's. Never empty."""
    source = PasswordSource(file=new_password_file, env="KDIST_NEW_PASSWORD", file_env="KDIST_NEW_PASSWORD_FILE")
    new = source.read(prompt=prompt, confirm=True)
    if not new:
        raise click.UsageError("the password must not be empty")
    return new


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
    # an error may quote a file or host name written by anyone: escaped like every listing
    from kdist.cli.text import printable

    click.echo(f"kdist: error: {printable(str(exc))}", err=True)
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
                spec = RepositorySpec(repo_location, endpoint_url, PasswordSource(file=password_file), key_id)
                # listing, restoring and backing up decide nothing from a record they cannot read:
                # one unreadable manifest blob must not stop them (ManifestStore.skip_unreadable)
                repo = spec.open(read_only=read_only, append_only=append_only, cache=cache,
                                 prompt="Repository password")
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
