"""``kdist gc run``, ``kdist maintenance run|status``, ``kdist index compact|rebuild``."""

from __future__ import annotations

import json

import click

from repo_format import clock
from repo_format.keyslots import ADMIN, MAINTENANCE
from repo_format.local_cache import parse_size
from repo_format.safety import PRESETS

from kdist.cli.context import metrics_options, with_repository
from kdist.cli.text import local_time, printable
from kdist.cli.progress import human_bytes
from kdist.gc import DEFAULT_MEMORY_LIMIT


def _print_report(report, as_json: bool, requests: dict) -> None:
    if as_json:
        click.echo(json.dumps({"dry_run": report.dry_run, "plans": report.plans, "steps": report.steps,
                               "freed_bytes": report.freed_bytes, "requests": requests}, indent=2, default=str))
        return
    for line in report.plans:
        click.echo(("would: " if report.dry_run else "") + line)
    if not report.dry_run:
        done = report.steps
        blob = done.get("blob_gc", {})
        click.echo(f"deleted {blob.get('deleted_packs', 0)} packs; {blob.get('candidates', 0)} more found unreferenced "
                   "(deleted by a later run, once the margin has passed)")
        moved = done.get("pack_rewrite", {})
        if moved.get("moved"):
            click.echo(f"rewrote {moved['moved']} live contents ({human_bytes(moved.get('bytes', 0))}) out of "
                       f"{moved.get('packs', 0)} mostly dead or small packs")
        click.echo(f"freed {human_bytes(report.freed_bytes)}")
        lock = done.get("object_lock", {})
        if lock:
            click.echo(f"object lock: extended {lock.get('extended', 0)} blobs' retention; "
                       f"{lock.get('kept_locked', 0)} collectable blobs are still locked (deleted by a later run, "
                       "once their lock ends)")
    click.echo("storage requests: " + ", ".join(f"{k} {v['calls']}" for k, v in sorted(requests.items())))


MIN_MEMORY_LIMIT = 32 * 2**20


def _memory_limit(ctx, param, value: str | None) -> int:
    if value is None:
        return DEFAULT_MEMORY_LIMIT
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size < MIN_MEMORY_LIMIT:
        raise click.BadParameter(f"at least {MIN_MEMORY_LIMIT // 2**20}MiB")
    return size


def memory_option(fn):
    return click.option("--memory-limit", envvar="KDIST_GC_MEMORY_LIMIT", default=None, metavar="SIZE",
                        callback=_memory_limit,
                        help="What the GC plan may hold in memory at once, e.g. 1GiB (default 256MiB); the rest "
                             "is spilled to the temporary directory. The index itself is read through the "
                             "local cache's mapped files.")(fn)


def ray_options(fn):
    fn = click.option("--actors", type=click.IntRange(min=1), default=2, show_default=True,
                      help="With --ray: how many actors walk and plan.")(fn)
    fn = click.option("--address", default=None, metavar="ADDRESS",
                      help="With --ray: the Ray cluster, HOST:PORT, auto (this machine's) or local (a new Ray of "
                           "its own); default: RAY_ADDRESS, else a new local Ray unless a cluster runs here.")(fn)
    fn = click.option("--ray", "use_ray", is_flag=True,
                      help="Share content GC's walk and plan out among Ray actors (the same plan). Each actor "
                           "reads the password on its node, as this command did: the --password-file path, else "
                           "KDIST_PASSWORD or KDIST_PASSWORD_FILE.")(fn)
    return fn


def _pool(use_ray: bool, address: str | None, actors: int):
    """The Ray actors for ``--ray`` (Ray is imported only then), opening the repository as the
    command did: same location, endpoint and password source."""
    if not use_ray:
        return None
    from kdist.access import PasswordSource, RepositorySpec
    from kdist.gc.ray_pool import RayPool

    p = click.get_current_context().params
    spec = RepositorySpec(p["repo_location"], p.get("endpoint_url"), PasswordSource(file=p.get("password_file")),
                          p.get("key_id"))
    return RayPool(spec, actors=actors, address=address)


def _run(repo, full: bool, dry_run: bool, safety: str | None, as_json: bool,
         memory_limit: int = DEFAULT_MEMORY_LIMIT, use_ray: bool = False, address: str | None = None,
         actors: int = 2, metrics=None) -> None:
    from kdist.gc.run import MaintenanceOptions, run_maintenance  # the planners import numpy: only here

    started = clock.monotonic()
    pool = _pool(use_ray and full, address, actors)
    opts = MaintenanceOptions(full=full, dry_run=dry_run, safety=PRESETS[safety] if safety else None,
                              memory_limit=memory_limit, pool=pool)
    before = repo.storage.counts() if hasattr(repo.storage, "counts") else {}
    try:
        report = run_maintenance(repo, opts)
        if pool is not None:
            report.steps["ray"] = {"actors": actors, "walked": pool.walked}
    finally:
        if pool is not None:
            pool.close()
    after = repo.storage.counts() if hasattr(repo.storage, "counts") else {}
    requests = {k: {"calls": v["calls"] - before.get(k, {}).get("calls", 0),
                    "bytes": v["bytes"] - before.get(k, {}).get("bytes", 0)} for k, v in after.items()}
    _print_report(report, as_json, requests)
    if metrics and not dry_run:
        from kdist.metrics import export

        steps = report.steps
        export(metrics, "maintenance", {"mode": "full" if full else "quick"},
               {"freed_bytes": report.freed_bytes,
                "deleted_packs": steps.get("blob_gc", {}).get("deleted_packs", 0),
                "rewritten_contents": steps.get("pack_rewrite", {}).get("moved", 0),
                "checkpoints_forgotten": steps.get("checkpoints_forgotten", 0),
                **{f"requests_{k.lower()}": v["calls"] for k, v in requests.items()}},
               True, clock.monotonic() - started,
               {"freed_bytes": "Bytes the last maintenance run deleted from the repository"})


@click.group("gc")
def gc_group():
    """Garbage-collect the repository (safe while backups run)."""


@gc_group.command("run")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--safety", type=click.Choice(sorted(PRESETS)), default=None,
              help="Safety preset (default: the repository's own margins); 'none' is for tests only.")
@click.option("--json", "as_json", is_flag=True)
@memory_option
@ray_options
@metrics_options("maintenance", lambda kw: {"mode": "full"})
@with_repository(roles=(ADMIN, MAINTENANCE), what="run garbage collection")
def gc_run(repo, dry_run, safety, as_json, memory_limit, use_ray, address, actors, metrics):
    """Mark unreachable contents, drop old deleted ones, delete unreferenced packs (in two runs),
    rewrite mostly dead packs."""
    _run(repo, True, dry_run, safety, as_json, memory_limit, use_ray, address, actors, metrics)


@click.group("maintenance")
def maintenance_group():
    """Repository maintenance (for cron): GC, index compaction, manifest compaction."""


@maintenance_group.command("run")
@click.option("--quick", "mode", flag_value="quick", help="Index and manifest compaction only.")
@click.option("--full", "mode", flag_value="full", default=True, help="Everything, GC included (default).")
@click.option("--dry-run", is_flag=True)
@click.option("--safety", type=click.Choice(sorted(PRESETS)), default=None)
@click.option("--json", "as_json", is_flag=True)
@memory_option
@ray_options
@metrics_options("maintenance", lambda kw: {"mode": "quick" if kw.get("mode") == "quick" else "full"})
@with_repository(roles=(ADMIN, MAINTENANCE), what="run maintenance")
def maintenance_run(repo, mode, dry_run, safety, as_json, memory_limit, use_ray, address, actors, metrics):
    """Run maintenance; safe to run while backups run, and twice at once."""
    _run(repo, mode != "quick", dry_run, safety, as_json, memory_limit, use_ray, address, actors, metrics)


@maintenance_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@with_repository(read_only=True)
def maintenance_status(repo, as_json):
    """Show the history of maintenance runs."""
    from kdist.gc import history

    runs = history.read_history(repo.manifests)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in runs], indent=2, default=str))
        return
    if not runs:
        click.echo("no maintenance has run on this repository")
        return
    click.echo(f"{'started':<20}{'mode':<7}{'took':>8}{'marked':>9}{'packs del':>10}{'bytes freed':>13}"
               f"{'rewritten':>10}{'checkpts':>9}{'manifests':>10}  result")
    for r in runs[-20:]:
        when = local_time(r.start)
        steps = r.steps if isinstance(r.steps, dict) else {}

        def step(name: str, key: str | None = None) -> int:
            v = steps.get(name, 0)
            v = v.get(key, 0) if isinstance(v, dict) and key else v
            return v if isinstance(v, int) else 0

        took = f"{max(0.0, r.end - r.start):.1f} s" if r.end else "-"
        result = f"failed: {r.error}" if r.error else ("ok" if r.end else "did not finish")
        click.echo(f"{when:<20}{r.mode:<7}{took:>8}{step('content_gc', 'marked'):>9}"
                   f"{step('blob_gc', 'deleted_packs'):>10}{human_bytes(step('blob_gc', 'bytes')):>13}"
                   f"{step('pack_rewrite', 'moved'):>10}{step('checkpoints_forgotten'):>9}"
                   f"{step('manifests_merged'):>10}  {printable(result)}")
    if len(runs) > 20:
        click.echo(f"({len(runs) - 20} earlier runs: --json lists them all)")


@click.group("index")
def index_group():
    """Index maintenance."""


@index_group.command("compact")
@with_repository(roles=(ADMIN, MAINTENANCE), what="compact the index")
def index_compact(repo):
    """Advance and compact epochs now (the index part of `maintenance run --quick`)."""
    _run(repo, False, False, None, False)


@index_group.command("rebuild")
@click.option("--dry-run", is_flag=True)
@with_repository(roles=(ADMIN, MAINTENANCE), what="rebuild the index")
def index_rebuild(repo, dry_run):
    """Recreate index entries from the packs' own indexes (adds entries; deletes nothing)."""
    from repo_format.index_rebuild import entries_from_packs, entries_to_write

    result = entries_from_packs(repo.storage, repo.format)
    for name, problem in sorted(result.damaged_packs.items()):
        click.echo(f"  damaged pack {name}: {problem}", err=True)
    current = repo.contents.epochs.load_index()
    missing = entries_to_write(result.entries, current, int(clock.now() * 1e6))  # one per content
    click.echo(f"read {result.packs_read} packs: {len(result.entries)} entries, {len(missing)} contents not in the index")
    if missing and not dry_run:
        name = repo.contents.epochs.write_index(missing)
        click.echo(f"wrote {len(missing)} entries to {name}")
