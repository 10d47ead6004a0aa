"""``kdist repo create|connect|status|change-password``."""

from __future__ import annotations

import json
import os

import click

from repo_format import constants as C
from repo_format import format_blob
from repo_format.crypto import WEAK_KDF_ENV, KdfParams
from repo_format.errors import KdistError
from repo_format.format_blob import RepositoryParameters
from repo_format.safety import SAFETY_FULL, safety_of

from kdist.cli.context import fail, make_storage, read_password, repo_options, with_repository
from kdist.cli.progress import human_bytes


@click.group("repo")
def repo_group():
    """Create and inspect repositories."""


@repo_group.command("create")
@repo_options
@click.option("--encryption", type=click.Choice(C.AEAD_ALGORITHMS), default=C.AEAD_AES_256_GCM, show_default=True)
@click.option("--gc-margin-scale", type=click.FloatRange(min=1e-6, max=100), default=1.0, show_default=True,
              help="Multiply every maintenance safety margin (24 h content and pack age, 4 h drop margin, ...). "
                   "Below 1 reclaims space sooner and assumes backups and pauses are that much shorter.")
def create(repo_location, endpoint_url, password_file, encryption, gc_margin_scale):
    """Create a new repository (a directory, created if missing, or an S3 bucket prefix)."""
    try:
        storage = make_storage(repo_location, endpoint_url, create=True)
        password = read_password(password_file, confirm=True, prompt="New repository password")
        if not password:
            raise click.UsageError("the password must not be empty")
        kdf = KdfParams.strong()
        if os.environ.get(WEAK_KDF_ENV) == "1":  # the test suite's setting, never a user's
            click.echo("WARNING: test-only weak key derivation (KDIST_ALLOW_WEAK_KDF_FOR_TESTS=1)", err=True)
            kdf = KdfParams.weak_for_tests()
        safety = SAFETY_FULL.scaled(gc_margin_scale) if gc_margin_scale != 1.0 else SAFETY_FULL
        safety.validate()
        params = RepositoryParameters(aead=encryption, extra={"safety": safety.to_dict()})
        fmt = format_blob.create(storage, password, parameters=params, kdf=kdf)
    except KdistError as exc:
        fail(exc)
    click.echo(f"created repository {fmt.unique_id.hex()[:16]} at {storage.describe()}")
    click.echo("keep the password safe: without it the backups cannot be read by anyone")


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
        kind = m.name[:2] if m.name.startswith("x") else m.name[:1]
        s = sizes.setdefault(kind, [0, 0])
        s[0] += 1
        s[1] += m.length
    info = {
        "unique_id": repo.format.unique_id.hex(),
        "location": repo.storage.describe(),
        "format_version": C.FORMAT_VERSION,
        "encryption": p.aead,
        "hash": p.hash,
        "compression": f"zstd-{p.zstd_level}" if p.zstd_level else "none",
        "pack_size": p.pack_size,
        "chunk_avg": p.chunk_avg,
        "safety": safety_of(p).to_dict(),
        "kdf": {"algorithm": repo.format.kdf.algorithm, "n": repo.format.kdf.n, "r": repo.format.kdf.r, "p": repo.format.kdf.p},
        "blobs": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(sizes.items())},
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"repository  {info['unique_id']}\nlocation    {info['location']}")
    click.echo(f"format      version {info['format_version']}, {p.aead}, {p.hash}, {info['compression']}")
    click.echo(f"packs       target {human_bytes(p.pack_size)}, chunks average {human_bytes(p.chunk_avg)}")
    names = {"p": "data packs", "q": "metadata packs", "xn": "index blobs", "m": "manifest blobs", "k": "format blob"}
    for k, v in info["blobs"].items():
        click.echo(f"{names.get(k, k):<16}{v['count']:>8}  {human_bytes(v['bytes'])}")


@repo_group.command("change-password")
@repo_options
@click.option("--new-password-file", type=click.Path(dir_okay=False), envvar="KDIST_NEW_PASSWORD_FILE",
              help="Read the new password from this file (or set KDIST_NEW_PASSWORD).")
def change_password(repo_location, endpoint_url, password_file, new_password_file):
    """Re-wrap the repository key under a new password (rewrites only the format blob)."""
    try:
        storage = make_storage(repo_location, endpoint_url)
        old = read_password(password_file)
        new = os.environ.get("KDIST_NEW_PASSWORD")
        if new is None and new_password_file:
            with open(new_password_file, encoding="utf-8") as f:
                new = f.readline().rstrip("\r\n")
        if new is None:
            new = click.prompt("New repository password", hide_input=True, confirmation_prompt=True)
        if not new:
            raise click.UsageError("the password must not be empty")
        format_blob.change_password(storage, old, new)
    except KdistError as exc:
        fail(exc)
    click.echo("password changed")
