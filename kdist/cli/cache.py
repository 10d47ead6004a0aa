"""``kdist cache status|clear``: the local caches on this host (no password needed).

A cache is only ever a copy (repo_format/local_cache.py): clearing one costs the next run the
requests it saved, nothing else, and is safe while other kdist processes are using it.
"""

from __future__ import annotations

import datetime
import json
import shutil

import click

from repo_format import format_blob
from repo_format.errors import KdistError
from repo_format.local_cache import CacheSettings, list_caches

from kdist.access import make_storage
from kdist.cli.context import cache_settings, fail


def _cache_options(fn):
    fn = click.option("--endpoint-url", envvar="KDIST_ENDPOINT_URL", default=None,
                      help="S3-compatible endpoint (for s3:// repositories).")(fn)
    fn = click.option("--repo", "repo_location", envvar="KDIST_REPO", default=None,
                      help="Only this repository's cache (default: every cache in the cache directory).")(fn)
    fn = click.option("--cache-limit", envvar="KDIST_CACHE_LIMIT", default=None, metavar="SIZE",
                      help="The limit to report against (default 10GiB).")(fn)
    fn = click.option("--cache-dir", envvar="KDIST_CACHE_DIR", default=None, type=click.Path(file_okay=False),
                      help="Where local caches live (default $XDG_CACHE_HOME/kdist or ~/.cache/kdist).")(fn)
    return fn


def _selected(settings: CacheSettings, repo_location: str | None, endpoint_url: str | None) -> list[dict]:
    if settings.base is None:
        raise click.UsageError("no cache directory: there is no home directory; set KDIST_CACHE_DIR")
    caches = list_caches(settings.base)
    if repo_location is None:
        return caches
    wanted = format_blob.read_unique_id(make_storage(repo_location, endpoint_url, read_only=True)).hex()
    return [c for c in caches if c["repository_id"] == wanted]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group("cache")
def cache_group():
    """The local caches of repositories on this host (index and directory copies)."""


@cache_group.command("status")
@_cache_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(cache_dir, cache_limit, repo_location, endpoint_url, as_json):
    """Where the caches are, how large, and the limit each is kept under."""
    try:
        settings = cache_settings(cache_dir, False, cache_limit)
        caches = _selected(settings, repo_location, endpoint_url)
    except KdistError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps({"cache_dir": str(settings.base), "limit_bytes": settings.limit, "caches": caches},
                              indent=2))
        return
    click.echo(f"cache directory: {settings.base} (limit {_size(settings.limit)} per repository)")
    if not caches:
        click.echo("no repository caches")
    for c in caches:
        when = datetime.datetime.fromtimestamp(c["last_written"]).strftime("%Y-%m-%d %H:%M") if c["last_written"] else "-"
        over = "  OVER LIMIT (trimmed at the end of the next run)" if c["total_bytes"] > settings.limit else ""
        click.echo(f"{c['repository_id']}  {_size(c['total_bytes'])}  (index {_size(c['index_bytes'])} in "
                   f"{c['index_files']} files, directories and manifests {_size(c['contents_bytes'])} in "
                   f"{c['content_files']} files)  last written {when}{over}")


@cache_group.command("clear")
@_cache_options
def clear(cache_dir, cache_limit, repo_location, endpoint_url):
    """Delete caches (every one, or --repo's): the next run fetches what it needs again."""
    try:
        settings = cache_settings(cache_dir, False, cache_limit)
        caches = _selected(settings, repo_location, endpoint_url)
    except KdistError as exc:
        fail(exc)
    freed = 0
    for c in caches:
        shutil.rmtree(c["path"], ignore_errors=True)
        freed += c["total_bytes"]
    click.echo(f"cleared {len(caches)} cache(s), {_size(freed)}")
