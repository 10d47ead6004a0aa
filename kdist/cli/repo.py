"""``kdist repo create|connect|status|change-password|upgrade|check|repair|copy``."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import click

from repo_format import constants as C
from repo_format import format_blob
from repo_format.crypto import WEAK_KDF_ENV, KdfParams
from repo_format.content import start_signed_epochs
from repo_format.errors import KdistError, RepositoryExists
from repo_format.format_blob import RepositoryParameters
from repo_format.keyslots import ADMIN, HOST, MAINTENANCE
from repo_format.local_cache import CacheSettings
from repo_format.repository import Repository
from repo_format.safety import SAFETY_FULL, safety_of

from kdist.cli import exit_codes
from kdist.access import make_storage
from kdist.cli.context import (fail, filter_options, key_option, new_password_option, read_new_password, read_password,
                               repo_options, with_repository)
from kdist.cli.progress import ProgressLine, human_bytes
from kdist.cli.text import printable

if TYPE_CHECKING:
    from kdist.check import CheckReport


@click.group("repo")
def repo_group():
    """Create and inspect repositories."""


@repo_group.command("create")
@repo_options
@click.option("--encryption", type=click.Choice(C.AEAD_ALGORITHMS), default=C.AEAD_AES_256_GCM, show_default=True)
@click.option("--gc-margin-scale", type=click.FloatRange(min=1e-6, max=100), default=1.0, show_default=True,
              help="Multiply every maintenance safety margin (24 h content and pack age, 4 h drop margin, ...). "
                   "Below 1 reclaims space sooner and assumes backups and pauses are that much shorter.")
@click.option("--object-lock-days", type=click.IntRange(1, 36500), default=None,
              help="S3 bucket created with Object Lock: lock every blob for this many days from its write "
                   "(the bucket's default retention); full maintenance extends what it keeps. Run it at "
                   "least every DAYS/2 days.")
@click.option("--object-lock-mode", type=click.Choice(["governance", "compliance"]), default="governance",
              show_default=True, help="COMPLIANCE: nobody, the account's root included, can shorten a lock.")
@click.option("--format-version", type=click.Choice([str(v) for v in C.FORMAT_VERSIONS_CREATED]),
              default=str(C.FORMAT_VERSION), show_default=True,
              help="3 keeps a fleet's hosts apart: a host key lists and reads only its own host's snapshots "
                   "(SECURITY.md). Sealing contents costs about three times the CPU of format 2.")
def create(repo_location, endpoint_url, password_file, encryption, gc_margin_scale, object_lock_days,
           object_lock_mode, format_version):
    """Create a new repository (a directory, created if missing, or an S3 bucket prefix)."""
    try:
        # the password first: a create that cannot read it leaves no empty directory behind
        password = read_password(password_file, confirm=True, prompt="New repository password")
        if not password:
            raise click.UsageError("the password must not be empty")
        storage = make_storage(repo_location, endpoint_url, create=True)
        kdf = KdfParams.strong()
        if os.environ.get(WEAK_KDF_ENV) == "1":  # the test suite's setting, never a user's
            click.echo("WARNING: test-only weak key derivation (KDIST_ALLOW_WEAK_KDF_FOR_TESTS=1)", err=True)
            kdf = KdfParams.weak_for_tests()
        safety = SAFETY_FULL.scaled(gc_margin_scale) if gc_margin_scale != 1.0 else SAFETY_FULL
        safety.validate()
        extra = {"safety": safety.to_dict()}
        if object_lock_days is not None:  # before the first blob, so that every blob is locked
            if storage.exists(C.FORMAT_BLOB_NAME):  # and never for someone else's repository
                raise RepositoryExists(f"a kdist repository already exists at {storage.describe()}")
            storage.configure_retention(object_lock_days, object_lock_mode.upper())
            extra["object_lock"] = {"days": object_lock_days, "mode": object_lock_mode.upper()}
        params = RepositoryParameters(aead=encryption, extra=extra)
        fmt = format_blob.create(storage, password, parameters=params, kdf=kdf, version=int(format_version))
        start_signed_epochs(storage, fmt)
    except KdistError as exc:
        fail(exc)
    click.echo(f"created repository {fmt.unique_id.hex()[:16]} at {storage.describe()}")
    if fmt.version >= C.FORMAT_VERSION_CONVERGENT:
        click.echo(f"format {fmt.version}: each host key reads only its own host's snapshots")
    click.echo("keep the password safe: without it the backups cannot be read by anyone")
    if object_lock_days is not None:
        click.echo(f"every blob is locked for {object_lock_days} days ({object_lock_mode}); run "
                   f"`kdist maintenance run` at least every {object_lock_days / 2:g} days to keep the locks up")


@repo_group.command("connect")
@with_repository(read_only=True)
def connect(repo):
    """Check that the repository opens with this password."""
    click.echo(f"connected to repository {repo.format.unique_id.hex()[:16]} at {repo.storage.describe()}")


@repo_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def status(repo, as_json):
    """Show the repository's parameters and size."""
    p = repo.parameters
    sizes: dict[str, list[int]] = {}
    for m in repo.storage.list():
        # the index family's blobs by their two-letter prefix (xn, xe, xs, ...), the others by one
        kind = m.name[:len(C.INDEX_PREFIX)] if m.name.startswith(C.INDEX_FAMILY_PREFIX) else m.name[:1]
        s = sizes.setdefault(kind, [0, 0])
        s[0] += 1
        s[1] += m.length
    info = {
        "unique_id": repo.format.unique_id.hex(),
        "location": repo.storage.describe(),
        "format_version": repo.format.version,
        "key": {"role": repo.identity.role, "id": repo.identity.slot or None, "host": repo.identity.host or None},
        "encryption": p.aead,
        "hash": p.hash,
        "compression": f"zstd-{p.zstd_level}" if p.zstd_level else "none",
        "pack_size": p.pack_size,
        "chunk_avg": p.chunk_avg,
        "safety": safety_of(p).to_dict(),
        "object_lock": p.extra.get("object_lock"),
        "kdf": {"algorithm": repo.format.kdf.algorithm, "n": repo.format.kdf.n, "r": repo.format.kdf.r, "p": repo.format.kdf.p},
        "blobs": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(sizes.items())},
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"repository  {info['unique_id']}\nlocation    {info['location']}")
    click.echo(f"format      version {info['format_version']}, {p.aead}, {p.hash}, {info['compression']}")
    click.echo(f"packs       target {human_bytes(p.pack_size)}, chunks average {human_bytes(p.chunk_avg)}")
    if info["object_lock"]:
        lock = info["object_lock"]
        click.echo(f"object lock {lock.get('days')} days, {str(lock.get('mode', '')).lower()}")
    names = {C.DATA_PACK_PREFIX: "data packs", C.METADATA_PACK_PREFIX: "metadata packs", C.INDEX_PREFIX: "index blobs",
             C.MANIFEST_PREFIX: "manifest blobs", C.FORMAT_BLOB_NAME[:1]: "format blob"}
    for k, v in info["blobs"].items():
        click.echo(f"{names.get(k, k):<16}{v['count']:>8}  {human_bytes(v['bytes'])}")


@repo_group.command("change-password")
@repo_options
@new_password_option
def change_password(repo_location, endpoint_url, password_file, new_password_file):
    """Re-wrap the repository key under a new password (rewrites only the format blob)."""
    try:
        storage = make_storage(repo_location, endpoint_url)
        old = read_password(password_file)
        new = read_new_password(new_password_file)
        format_blob.change_password(storage, old, new)
    except KdistError as exc:
        fail(exc)
    click.echo("password changed")


@repo_group.command("upgrade")
@repo_options
def upgrade(repo_location, endpoint_url, password_file):
    """Give a repository made before key slots (format version 1) its root key, so that `kdist
    key add` can add keys and manifests are signed. Stop every backup and maintenance first."""
    from kdist.keys import upgrade_repository
    from repo_format.session import storage_now

    try:
        storage = make_storage(repo_location, endpoint_url)
        password = read_password(password_file)
        fmt = format_blob.read(storage, password)
        signed = upgrade_repository(storage, password, storage_now(storage, "upgrade"),
                                    safety_of(fmt.parameters).session_expiry)
    except KdistError as exc:
        fail(exc)
    click.echo(f"upgraded the repository to format version {C.FORMAT_VERSION}: {signed} manifest record(s) "
               "signed with its new root key; add keys with `kdist key add`")


class _Percent(click.ParamType):
    """A share in percent, ``10`` or ``10%``, above 0 and at most 100."""

    name = "percent"

    def convert(self, value, param, ctx):
        try:
            share = float(str(value).rstrip("%"))
        except ValueError:
            self.fail(f"{value!r} is not a percentage", param, ctx)
        if not 0 < share <= 100:
            self.fail(f"{value!r} is not above 0 and at most 100", param, ctx)
        return share


def _on_format(repo_location, endpoint_url, password_file, read_only: bool, call, key_id=None, roles=(),
               what=""):
    """``call(storage, format blob)``: the check and the repair open the repository themselves
    with an index they assemble past damaged index blobs (``Repository(committed=...)``) and
    without the local cache (they judge what the repository holds). Library errors become exit
    codes."""
    try:
        storage = make_storage(repo_location, endpoint_url, read_only=read_only)
        fmt = format_blob.read(storage, read_password(password_file), key_id)
        if roles and fmt.identity is not None:
            fmt.identity.require(*roles, what=what)
        return call(storage, fmt)
    except KdistError as exc:
        fail(exc)


def _print_problems(report: CheckReport) -> None:
    for p in report.problems:
        click.echo(f"  problem: {p.message}")
    for note in report.notes:
        click.echo(f"  note: {note}")


@repo_group.command("check")
@repo_options
@key_option
@click.option("--read-data", type=_Percent(), is_flag=False, flag_value="100", default=None, metavar="[PERCENT]",
              help="Also fetch and authenticate every content, or those of a random PERCENT of the packs "
                   "(--read-data=10).")
@click.option("--seed", type=int, default=None, help="Seed of the --read-data sample (default: random, printed).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(repo_location, endpoint_url, password_file, key_id, read_data, seed, as_json):
    """Check the repository's structure (and with --read-data its contents); never writes.
    Exits 13 when it finds a problem."""
    from kdist.check import check_repository  # imported by the commands that check, not by every command

    report = _on_format(repo_location, endpoint_url, password_file, True,
                        lambda storage, fmt: check_repository(storage, fmt, read_data, seed), key_id)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_problems(report)
        if report.read_data is not None:
            click.echo(f"read {report.read_data['percent']:g}% of the packs (seed {report.read_data['seed']})")
        click.echo(report.summary())
        click.echo("no problems found" if report.healthy else "the repository is damaged: `kdist repo repair` "
                   "puts back what it can (with --source, from the original files)")
    if not report.healthy:
        sys.exit(exit_codes.CORRUPTION)


@repo_group.command("repair")
@repo_options
@key_option
@click.option("--source", type=click.Path(exists=True, file_okay=False), default=None,
              help="A tree holding the original files: re-upload missing contents found in it.")
@click.option("--dry-run", is_flag=True, help="Only say what would be repaired; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def repair(repo_location, endpoint_url, password_file, key_id, source, dry_run, as_json):
    """Rebuild missing index entries from the packs and re-upload missing contents from --source.
    Deletes nothing. Exits 0 only when nothing is missing afterwards (13 otherwise)."""
    from kdist.repair import repair_repository

    r = _on_format(repo_location, endpoint_url, password_file, dry_run,
                   lambda storage, fmt: repair_repository(storage, fmt, source, dry_run), key_id,
                   roles=(ADMIN, MAINTENANCE), what="repair the repository")
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
    else:
        would = "would " if dry_run else ""
        click.echo(f"before: {len(r.before.problems)} problem(s), {len(r.before.missing)} content(s) snapshots "
                   "need cannot be read")
        for name, why in sorted(r.damaged_packs.items()):
            click.echo(f"  damaged pack {name}: {why}")
        if r.packs_read:
            click.echo(f"index: read {r.packs_read} packs' own indexes; {would}write {r.entries_rebuilt} entries the "
                       f"index lacked and {r.entries_repointed} for contents found in another pack")
        if r.undeleted:
            click.echo(f"{would}undelete {r.undeleted} content(s) that snapshots reach")
        for name in r.unreadable_index_blobs_deleted:
            click.echo(f"{would}delete index blob {name}: it does not open (a forgery or damage; it stops maintenance)")
        if source is not None:
            click.echo(f"source: read {r.source_files} files; {would}re-upload {r.reuploaded} missing content(s) "
                       f"({human_bytes(r.reuploaded_bytes)})")
            for err in r.source_errors:
                click.echo(f"  cannot read {err}", err=True)
            for note in r.notes:
                click.echo(f"note: {note}", err=True)
        if r.after is not None:
            _print_problems(r.after)
            click.echo("after: " + r.after.summary())
        click.echo(f"still missing: {r.still_missing} content(s)" + ("" if r.healthy else
                   "; the repository is still damaged" + (" (dry run: nothing was written)" if dry_run else "")))
    if not r.healthy:
        sys.exit(exit_codes.CORRUPTION)


@repo_group.command("copy")
@click.argument("snapshot_refs", nargs=-1, metavar="[SNAPSHOT]...")
@click.option("--to", "to_location", required=True, metavar="REPO",
              help="The repository to copy into: a directory path or s3://bucket/prefix.")
@click.option("--to-endpoint-url", default=None, help="S3 endpoint of the destination (MinIO, Ceph, R2...).")
@click.option("--to-password-file", type=click.Path(dir_okay=False), default=None,
              help="The destination's password, from this file's first line; wins over KDIST_TO_PASSWORD and "
                   "KDIST_TO_PASSWORD_FILE.")
@click.option("--to-key-id", envvar="KDIST_TO_KEY_ID", default=None, metavar="ID",
              help="The destination key slot the password opens (env KDIST_TO_KEY_ID).")
@filter_options
@click.option("--dry-run", is_flag=True, help="Only list what would be copied.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True)
def copy(repo, snapshot_refs, to_location, to_endpoint_url, to_password_file, to_key_id, where, dry_run, as_json):
    """Copy snapshots, with their data, into another repository (an off-site copy).

    Every snapshot the filters select (or the SNAPSHOTs named) that the destination does not
    hold yet is copied: its files re-encrypted under the destination's keys and deduplicated
    against what is there, published with the original's times, tags and totals. Run it again to
    go on after an interruption, or nightly to keep the copy current; maintenance may run on
    either repository meanwhile. Exits 3 if a snapshot could not be copied."""
    from kdist.access import PasswordSource, RepositorySpec
    from kdist.copy import copied_already, copy_of, copy_snapshots
    from kdist.snapshot import list_snapshots, visible_labels

    from kdist.cli.snapshot_out import resolve

    if snapshot_refs:
        snaps = list({s.id: s for s in (resolve(repo, ref, where) for ref in snapshot_refs)}.values())
    else:
        snaps = where.select(list_snapshots(repo.manifests, **visible_labels(repo.identity)))
    spec = RepositorySpec(to_location, to_endpoint_url,
                          PasswordSource(file=to_password_file, env="KDIST_TO_PASSWORD",
                                         file_env="KDIST_TO_PASSWORD_FILE"), to_key_id)
    try:
        destination = Repository.open(spec.storage(read_only=dry_run, append_only=not dry_run),
                                      spec.password.read(prompt="Destination repository password"),
                                      key_id=to_key_id, cache=CacheSettings.from_environment())
        destination.skip_unreadable = True
        destination.require(ADMIN, HOST, what="copy snapshots into the repository")
    except KdistError as exc:
        fail(exc)
    try:
        if destination.format.unique_id == repo.format.unique_id:
            raise click.UsageError("--to names the repository copied from")
        own = visible_labels(destination.identity).get("host")  # a host key copies its own host's only
        snaps = [s for s in snaps if own is None or s.source.host == own]
        if dry_run:
            done = copied_already(destination)
            todo = [s for s in snaps if copy_of(repo, s) not in done]
            if as_json:
                click.echo(json.dumps({"would_copy": [s.id for s in todo], "copied_before": len(snaps) - len(todo)},
                                      indent=2))
            else:
                for s in todo:
                    click.echo(f"would copy {s.short_id} of {printable(s.source.host)}:{printable(s.source.path)}")
                click.echo(f"{len(todo)} snapshot(s) to copy, {len(snaps) - len(todo)} copied before")
            return
        progress = ProgressLine()
        try:
            report = copy_snapshots(repo, destination, snaps,
                                    progress=lambda st, _l: progress.update(st.files_read, st.bytes_read, "copying: "))
        finally:
            progress.close()
    except KdistError as exc:
        fail(exc)
    finally:  # what was uploaded stays usable: the next run deduplicates against it
        try:
            destination.close()
        except KdistError:
            pass
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for src_id, new_id in report.copied:
            click.echo(f"copied {src_id[:8]} as {new_id[:8]}")
        for src_id, why in report.failed:
            click.echo(f"  error: {src_id[:8]}: {printable(why)}", err=True)
        click.echo(f"{len(report.copied)} copied, {len(report.skipped)} copied before, {len(report.failed)} failed; "
                   f"read {human_bytes(report.bytes_read)}, stored {human_bytes(report.new_bytes)} new")
    if report.failed:
        sys.exit(exit_codes.PARTIAL)
