"""How every command finds its repository and password (``kdist.access``): one precedence, a
named source that cannot be read is an error, an empty ``--repo`` is a usage error, and Unicode
passwords open whatever form they were typed in."""

from __future__ import annotations

import os
import unicodedata

import pytest

from kdist.cli import exit_codes
from kdist_trees import PASSWORD, cli_env, run_cli
from repo_format import format_blob
from repo_format.crypto import KdfParams
from repo_format.errors import WrongPassword
from repo_format.format_blob import RepositoryParameters
from repo_format.storage import open_storage


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)
    for var in ("KDIST_NEW_PASSWORD", "KDIST_NEW_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)


def opens_with(repo, password: str) -> bool:
    try:
        format_blob.read(open_storage(str(repo)), password)
        return True
    except WrongPassword:
        return False


def test_an_explicit_password_file_beats_the_environment(env, tmp_path, monkeypatch):
    """``KDIST_PASSWORD=a kdist repo create --password-file f`` once created the repository with
    password ``a``: the flag the operator typed must win."""
    pw = tmp_path / "pw"
    pw.write_text("from-the-file\n")
    monkeypatch.setenv("KDIST_PASSWORD", "from-the-environment")
    run_cli("repo", "create", "--repo", tmp_path / "r", "--password-file", pw)
    assert opens_with(tmp_path / "r", "from-the-file") and not opens_with(tmp_path / "r", "from-the-environment")
    run_cli("snapshot", "list", "--repo", tmp_path / "r", "--password-file", pw)
    run_cli("snapshot", "list", "--repo", tmp_path / "r", code=exit_codes.WRONG_PASSWORD)  # the variable's


def test_a_named_source_that_cannot_be_read_is_an_error_not_a_fallback(env, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-file"
    r = run_cli("repo", "create", "--repo", tmp_path / "r", "--password-file", missing, code=exit_codes.USAGE)
    assert f"cannot read password file {missing}" in r.stderr and PASSWORD not in r.output
    assert not (tmp_path / "r").exists()  # nothing created with KDIST_PASSWORD instead

    run_cli("repo", "create", "--repo", tmp_path / "r")
    monkeypatch.delenv("KDIST_PASSWORD")
    monkeypatch.setenv("KDIST_PASSWORD_FILE", str(missing))
    r = run_cli("snapshot", "list", "--repo", tmp_path / "r", code=exit_codes.USAGE)
    assert f"cannot read password file {missing}" in r.stderr


def test_password_variables_one_at_a_time(env, tmp_path, monkeypatch):
    run_cli("repo", "create", "--repo", tmp_path / "r")
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    monkeypatch.setenv("KDIST_PASSWORD_FILE", str(pw))
    r = run_cli("snapshot", "list", "--repo", tmp_path / "r", code=exit_codes.USAGE)  # both set: which one?
    assert "both KDIST_PASSWORD and KDIST_PASSWORD_FILE are set" in r.stderr
    run_cli("snapshot", "list", "--repo", tmp_path / "r", "--password-file", pw)  # the flag settles it
    monkeypatch.delenv("KDIST_PASSWORD")
    run_cli("snapshot", "list", "--repo", tmp_path / "r")  # the file the variable names
    monkeypatch.delenv("KDIST_PASSWORD_FILE")
    r = run_cli("snapshot", "list", "--repo", tmp_path / "r", code=exit_codes.USAGE, input="")
    assert "no password" in r.stderr


def test_new_password_file_beats_the_environment_too(env, tmp_path, monkeypatch):
    run_cli("repo", "create", "--repo", tmp_path / "r")
    new = tmp_path / "new"
    new.write_text("new-from-file\n")
    monkeypatch.setenv("KDIST_NEW_PASSWORD", "new-from-environment")
    run_cli("repo", "change-password", "--repo", tmp_path / "r", "--new-password-file", new)
    assert opens_with(tmp_path / "r", "new-from-file") and not opens_with(tmp_path / "r", "new-from-environment")
    monkeypatch.setenv("KDIST_PASSWORD", "new-from-file")
    r = run_cli("repo", "change-password", "--repo", tmp_path / "r", "--new-password-file", tmp_path / "missing",
                code=exit_codes.USAGE)
    assert "cannot read password file" in r.stderr and opens_with(tmp_path / "r", "new-from-file")


@pytest.mark.parametrize("args", [("repo", "create"), ("snapshot", "list"), ("snapshot", "create", "."),
                                  ("maintenance", "run")])
def test_an_empty_repository_location_is_a_usage_error(env, tmp_path, monkeypatch, args):
    """``kdist repo create --repo ''`` once made the current directory a repository (exit 0)."""
    monkeypatch.chdir(tmp_path)
    r = run_cli(*args, "--repo", "", code=exit_codes.USAGE)
    assert "--repo (or KDIST_REPO) is empty" in r.stderr
    monkeypatch.setenv("KDIST_REPO", "  ")
    run_cli(*args, code=exit_codes.USAGE)
    assert os.listdir(tmp_path) == []  # nothing written here


def test_unicode_passwords_open_in_either_normal_form(env, tmp_path, monkeypatch):
    composed = "caf\u00e9-\u00c5ngstr\u00f6m"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    monkeypatch.setenv("KDIST_PASSWORD", decomposed)
    run_cli("repo", "create", "--repo", tmp_path / "r")
    monkeypatch.setenv("KDIST_PASSWORD", composed)  # typed on a system that composes
    run_cli("snapshot", "list", "--repo", tmp_path / "r")
    assert opens_with(tmp_path / "r", decomposed) and opens_with(tmp_path / "r", composed)
    assert not opens_with(tmp_path / "r", unicodedata.normalize("NFC", "cafe-Angstrom"))


def test_a_key_wrapped_before_normalisation_still_opens(env, tmp_path, monkeypatch):
    """A repository whose password was wrapped exactly as typed (decomposed), as kdist did before
    it normalised: the same bytes still open it."""
    decomposed = unicodedata.normalize("NFD", "na\u00efve-p\u00e4ss")
    storage = open_storage(str(tmp_path / "old"), create=True)
    monkeypatch.setattr("repo_format.format_blob.normalise_password", lambda p: p)  # the old writer
    format_blob.create(storage, decomposed, RepositoryParameters(), kdf=KdfParams.weak_for_tests())
    monkeypatch.undo()
    cli_env(monkeypatch)
    assert opens_with(tmp_path / "old", decomposed)
    assert not opens_with(tmp_path / "old", unicodedata.normalize("NFC", decomposed))  # only the old form
