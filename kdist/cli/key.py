"""``kdist key``: one password per admin, maintenance job and host (SECURITY.md)."""

from __future__ import annotations

import json

import click
from repo_format import constants as C
from repo_format.keyslots import ADMIN, HOST, ROLES

from kdist.cli.context import new_password_option, read_new_password, with_repository


@click.group("key")
def key_group():
    """Keys: a password per admin, maintenance job and host, each with its role."""


@key_group.command("add")
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="admin: everything; maintenance: gc, forget, check; host: back up as --host, "
                   "list and restore that host's snapshots, never delete.")
@click.option("--host", default="", help="The host a host key backs up as (required for --role host).")
@new_password_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(roles=(ADMIN,), what="add keys")
def add(repo, role, host, new_password_file, as_json):
    """Add a key (a password with a role); prints its id, which its holder passes as --key-id."""
    from kdist.keys import add_key

    if role == HOST and not host:
        raise click.UsageError("a host key needs --host NAME")
    identity = add_key(repo, read_new_password(new_password_file, "Password of the new key"), role, host)
    if role != ADMIN and repo.format.version < C.FORMAT_VERSION_CONVERGENT:
        click.echo(f"note: in this format {repo.format.version} repository every key can read every host's "
                   "backups; a repository made with `kdist repo create --format-version 3` keeps hosts apart "
                   "(SECURITY.md; `kdist repo copy` moves snapshots into one)", err=True)
    if as_json:
        click.echo(json.dumps({"key_id": identity.slot, "role": role, "host": host}))
        return
    click.echo(f"added {role} key {identity.slot}" + (f" for host {host}" if host else ""))
    click.echo(f"its holder opens the repository with KDIST_KEY_ID={identity.slot} and its password")


@key_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_repository(read_only=True, roles=(ADMIN,), what="list keys")
def list_(repo, as_json):
    """List the keys: id, role, host, state (active or removed); * marks the one in use."""
    from kdist.keys import list_keys

    rows = list_keys(repo)
    if as_json:
        click.echo(json.dumps([vars(r) for r in rows], indent=2))
        return
    click.echo(f"  {'ID':<10}{'role':<13}{'state':<10}host")
    click.echo(f"{'*' if not repo.identity.slot else ' '} {'(format)':<10}{'admin':<13}{'active':<10}"
               "the repository's own password")
    for r in rows:
        older = "  (older generation: the removed key reads what it backs up; replace it)" \
            if r.older_generation else ""
        click.echo(f"{'*' if r.current else ' '} {r.key_id:<10}{r.role:<13}{r.state:<10}{r.host}{older}")


@key_group.command("remove")
@click.argument("removed", metavar="KEY_ID")
@with_repository(roles=(ADMIN,), what="remove keys")
def remove(repo, removed):
    """Remove a key: its password opens nothing any more, and whatever it writes from now on is
    ignored (and reported by `kdist repo check`); what it wrote before stays."""
    from kdist.keys import remove_key

    kept = remove_key(repo, removed)
    click.echo(f"removed key {removed}; {kept} record(s) it wrote before stay valid")
