"""Secrets stay secret: the password and the keys never appear in process arguments, logs,
messages, the repository's blobs or local files, and the KDF is strong unless a test says so.

Already covered elsewhere: ``repr`` of the keys and the format blob (tests/format/
test_format_blob.py::test_key_material_never_shows_in_repr), out-of-range KDF parameters and
the weak KDF refused without the test variable at the library level (same file).

kdist keeps no local cache of keys or passwords: the format blob is read and the keys derived on
every open, held in memory only (no code writes outside the repository and the restore target;
``test_nothing_but_the_cache_is_written_outside_the_repository_and_the_target`` checks HOME, XDG and TMPDIR).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import traceback
from pathlib import Path

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")  # as the other test folders do

import click  # noqa: E402
import msgpack  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from kdist.cli import exit_codes  # noqa: E402
from kdist.cli.main import cli  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format.crypto import WEAK_KDF_ENV, KdfParams, derive_subkey, unkeyed_checksum  # noqa: E402
from repo_format.errors import CorruptionError, KdistError, WrongPassword  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import FilesystemStorage  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

PASSWORD = "kdist-Secret-pa55phrase-7f3a"
NEW_PASSWORD = "kdist-Other-pa55phrase-c41e"
WRONG_PASSWORD = "kdist-Wrong-guess-9d0b"
SPEC = Path(__file__).resolve().parents[2] / "repo_format" / "SPEC.md"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    monkeypatch.setenv(WEAK_KDF_ENV, "1")
    for var in ("KDIST_REPO", "KDIST_ENDPOINT_URL", "KDIST_PASSWORD_FILE", "KDIST_NEW_PASSWORD",
                "KDIST_NEW_PASSWORD_FILE", "KDIST_DEBUG"):
        monkeypatch.delenv(var, raising=False)


def kdist(*args, code=0) -> str:
    """Run the CLI in-process; returns everything it printed (stdout and stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.output)
    return result.output


def secrets_of(storage, password: str) -> dict[str, bytes]:
    """Every secret of a repository as bytes: password, keys, subkeys, the password-derived key."""
    fb = format_blob.read(storage, password)
    k = fb.keys
    out = {"password": password.encode(), "password utf-16": password.encode("utf-16-le"),
           "master key": k.master_key, "hash secret": k.hash_secret,
           "wrapping key": fb.kdf.derive(password),
           "chunker seed": k.chunker_seed().to_bytes(8, "big")}
    for info in (C.HKDF_INFO_CONTENT, C.HKDF_INFO_INDEX, C.HKDF_INFO_MANIFEST, C.HKDF_INFO_NAME, C.HKDF_INFO_LOCAL_CACHE):
        out[info.decode()] = derive_subkey(k.master_key, info)
    out[C.HKDF_INFO_HASH.decode()] = derive_subkey(k.hash_secret, C.HKDF_INFO_HASH)
    if k.fleet_secret is not None:  # format 3: the fleet secret's subkeys, the records' and payloads' keys
        from repo_format.convergent import tree_key
        from repo_format.sealed_payloads import host_private, readers_private

        out["fleet secret"] = k.fleet_secret
        for info in (C.HKDF_INFO_INDEX, C.HKDF_INFO_MANIFEST, C.HKDF_INFO_NAME, C.HKDF_INFO_LOCAL_CACHE):
            out["fleet " + info.decode()] = derive_subkey(k.fleet_secret, info)
        for info in (C.HKDF_INFO_RECORD_ID, C.HKDF_INFO_CONVERGENCE):
            out[info.decode()] = derive_subkey(k.hash_secret, info)
        host = socket.gethostname()  # (the backups below are this machine's)
        out.update({"readers' payload key": readers_private(k.master_key),
                    "host payload key": host_private(k.master_key, host), "host tree key": tree_key(k.master_key, host)})
    for name, value in list(out.items()):
        if "password" not in name:
            out[name + " (hex)"] = value.hex().encode()
    return out


def assert_no_secret(text: str | bytes, secrets: dict[str, bytes], where: str) -> None:
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    for name, value in secrets.items():
        assert value not in raw, f"the {name} appears in {where}"
        assert value.hex().encode() not in raw or "hex" in name, f"the {name} (as hex) appears in {where}"
    if isinstance(text, str):
        for name in ("master key", "hash secret"):
            assert repr(secrets[name]) not in text, f"the {name} (as a bytes repr) appears in {where}"


def _commands(group: click.Group, path: str = ""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{path} {name}")
        else:
            yield f"{path} {name}".strip(), cmd


# ---- process arguments ---------------------------------------------------------------------

def test_no_command_line_option_takes_the_password_itself():
    """Arguments are visible to every user of the machine (ps, /proc/*/cmdline): the password may
    come from KDIST_PASSWORD, a file or a prompt, or for Ray nodes from a named variable."""
    allowed = {"password_file", "new_password_file", "password_env", "to_password_file",  # (repo copy's destination)
               "key_id", "to_key_id"}  # which key slot the password opens: an id from `key list`, no secret
    commands = list(_commands(cli))  # `fleet backup` among them: what cluster/backup.py runs
    assert len(commands) >= 15 and any(path == "fleet backup" for path, _ in commands)
    seen = set()
    for path, cmd in commands:
        for param in cmd.params:
            names = [param.name or ""] + list(param.opts) + list(param.secondary_opts)
            if any("pass" in n.lower() or "secret" in n.lower() or "key" in n.lower() for n in names):
                assert param.name in allowed, f"`{path}` has an option {param.opts} that may take a secret"
                seen.add(param.name)
    assert {"password_file", "new_password_file", "password_env", "to_password_file"} <= seen


def test_ray_workers_are_told_where_the_password_is_not_what_it_is(monkeypatch):
    from kdist.access import PasswordSource, RepositorySpec

    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    source = PasswordSource(env="KDIST_PASSWORD")
    assert source.read() == PASSWORD
    spec = RepositorySpec("/nowhere", None, source)
    shipped = pickle.dumps(spec)  # what Ray sends to every node, actors and the maintenance pool alike
    assert PASSWORD.encode() not in shipped and PASSWORD not in repr(spec)
    assert pickle.loads(shipped).password.read() == PASSWORD  # read where it is used


# ---- logs, output and exception messages ---------------------------------------------------

@pytest.mark.parametrize("version", ["2", "3"])
def test_password_and_keys_never_in_logs_or_output_of_any_command(env, tmp_path, monkeypatch, caplog, version):
    caplog.set_level(logging.DEBUG)
    repo, src = tmp_path / "repo", tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(30_000))
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("nothing secret here\n" * 100)
    out = [kdist("repo", "create", "--repo", repo, "--format-version", version)]
    r = ["--repo", repo]
    out.append(kdist("snapshot", "create", *r, src))
    out.append(kdist("snapshot", "create", *r, src, "--json"))
    out.append(kdist("snapshot", "list", *r, "--json"))
    out.append(kdist("snapshot", "ls", *r, "latest", "-r"))
    out.append(kdist("snapshot", "restore", *r, "latest", tmp_path / "dst"))
    out.append(kdist("snapshot", "verify", *r, "latest"))
    out.append(kdist("repo", "status", *r, "--json"))
    out.append(kdist("gc", "run", *r, "--json"))
    out.append(kdist("maintenance", "run", *r))
    out.append(kdist("index", "rebuild", *r, "--dry-run"))
    monkeypatch.setenv("KDIST_NEW_PASSWORD", NEW_PASSWORD)
    monkeypatch.setenv("KDIST_PASSWORD", WRONG_PASSWORD)
    out.append(kdist("snapshot", "list", *r, code=exit_codes.WRONG_PASSWORD))
    out.append(kdist("repo", "change-password", *r, code=exit_codes.WRONG_PASSWORD))
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    out.append(kdist("repo", "change-password", *r))
    secrets = secrets_of(FilesystemStorage(repo), NEW_PASSWORD)
    secrets.update({"old password": PASSWORD.encode(), "wrong password": WRONG_PASSWORD.encode()})
    assert "wrong password" in out[-3]
    assert_no_secret("\n".join(out), secrets, "the CLI's output")
    assert_no_secret(caplog.text, secrets, "the logs")
    for rec in caplog.records:  # also arguments a handler with another format would print
        assert_no_secret(repr(rec.args) + str(rec.msg), secrets, "a log record")


def _message_chain(exc: BaseException) -> str:
    """What a traceback would print: messages of the exception and of its causes."""
    return "".join(traceback.format_exception(exc)) + repr(exc.args)


def test_exception_messages_never_contain_the_password(env, monkeypatch):
    storage = MemoryStorage()
    Repository.create(storage, PASSWORD, kdf=KdfParams.weak_for_tests())
    secrets = secrets_of(storage, PASSWORD)
    secrets["wrong password"] = WRONG_PASSWORD.encode()
    blob = storage.get(C.FORMAT_BLOB_NAME)
    body = blob[:-C.FORMAT_CHECKSUM_SIZE]
    header_end = len(body)
    sealed_flip = bytearray(body)
    sealed_flip[header_end - 5] ^= 1  # inside the sealed payload, checksum made valid again
    damaged = {
        "wrong password": (blob, WRONG_PASSWORD),
        "empty password": (blob, ""),
        "checksum damage": (blob[:-1] + bytes([blob[-1] ^ 1]), PASSWORD),
        "truncated": (blob[:40], PASSWORD),
        "sealed payload flipped": (bytes(sealed_flip) + unkeyed_checksum(bytes(sealed_flip)), PASSWORD),
        "bad magic": (b"XX" + blob[2:], PASSWORD),
    }
    for case, (raw, password) in damaged.items():
        with pytest.raises(KdistError) as info:
            format_blob.decode(raw, password)
        assert_no_secret(_message_chain(info.value), secrets, f"the error for {case}")
    with pytest.raises(WrongPassword) as info:
        Repository.open(storage, WRONG_PASSWORD)
    assert_no_secret(_message_chain(info.value), secrets, "the wrong-password error")
    monkeypatch.delenv(WEAK_KDF_ENV)
    with pytest.raises(CorruptionError, match="test-only") as info:
        Repository.open(storage, PASSWORD)
    assert_no_secret(_message_chain(info.value), secrets, "the weak-KDF refusal")


def test_unreadable_password_file_error_names_the_file_only(env, tmp_path, monkeypatch):
    monkeypatch.delenv("KDIST_PASSWORD")
    out = kdist("repo", "connect", "--repo", tmp_path, "--password-file", tmp_path / "missing", code=exit_codes.USAGE)
    assert "missing" in out and PASSWORD not in out


# ---- the repository and local disk ---------------------------------------------------------

def _run_process(*args, env_extra: dict, code: int = 0) -> str:
    p = subprocess.run([sys.executable, "-m", "kdist.cli.main", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **env_extra}, timeout=120)
    assert p.returncode == code, p.stderr
    return p.stdout + p.stderr


@pytest.mark.parametrize("version", ["2", "3"])
def test_repository_files_hold_neither_the_password_nor_any_key(env, tmp_path, monkeypatch, version):
    """Every file under a filesystem repository, after backups, forget, maintenance and a
    password change: no password, no key, no subkey, raw or as hex."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    src.mkdir()
    for i in range(20):  # several packs, chunks and index blobs
        (src / f"f{i}").write_bytes(os.urandom(50_000) + b"compressible " * 2000)
    r = ["--repo", repo]
    kdist("repo", "create", *r, "--format-version", version)
    kdist("snapshot", "create", *r, src)
    (src / "f0").write_bytes(b"changed")
    kdist("snapshot", "create", *r, src)
    kdist("snapshot", "forget", *r, "--keep-last", "1")
    kdist("maintenance", "run", *r)
    old_secrets = secrets_of(FilesystemStorage(repo), PASSWORD)
    monkeypatch.setenv("KDIST_NEW_PASSWORD", NEW_PASSWORD)
    kdist("repo", "change-password", *r)
    secrets = {**old_secrets, **{f"new {k}": v for k, v in secrets_of(FilesystemStorage(repo), NEW_PASSWORD).items()}}
    files = [Path(d, n) for d, _, names in os.walk(repo) for n in names]
    assert len(files) >= 8
    for f in files:
        assert_no_secret(f.read_bytes(), secrets, f"repository file {f.relative_to(repo)}")


def test_nothing_but_the_cache_is_written_outside_the_repository_and_the_target(env, tmp_path, monkeypatch):
    """No local copy of keys: HOME, the XDG directories and TMPDIR stay empty through create,
    backup, list, restore and maintenance in real processes, except the local cache in
    $XDG_CACHE_HOME/kdist, which holds neither the password nor any key."""
    monkeypatch.delenv("KDIST_CACHE_DIR", raising=False)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(10_000))
    env_extra = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
                 "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
                 "XDG_STATE_HOME": str(home / ".local/state"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = ["--repo", tmp_path / "repo"]
    _run_process("repo", "create", *r, env_extra=env_extra)
    _run_process("snapshot", "create", *r, src, env_extra=env_extra)
    _run_process("snapshot", "list", *r, env_extra=env_extra)
    _run_process("snapshot", "restore", *r, "latest", tmp_path / "dst", env_extra=env_extra)
    _run_process("maintenance", "run", *r, "--quick", env_extra=env_extra)
    cache = home / ".cache" / "kdist"
    written = [p for p in home.rglob("*") if p.is_file()]
    assert written and all(cache in p.parents for p in written), written
    assert [p for p in tmp.rglob("*")] == []
    assert sorted(os.listdir(tmp_path)) == ["dst", "home", "repo", "src", "tmp"]
    secrets = secrets_of(FilesystemStorage(tmp_path / "repo"), PASSWORD)
    for f in written:
        assert_no_secret(f.read_bytes(), secrets, f"cache file {f.relative_to(cache)}")


# ---- the key derivation function -----------------------------------------------------------

def _kdf_of(storage) -> dict:
    blob = storage.get(C.FORMAT_BLOB_NAME)
    _, _, header_len = C.FORMAT_PREAMBLE.unpack_from(blob)
    return msgpack.unpackb(blob[C.FORMAT_PREAMBLE.size:C.FORMAT_PREAMBLE.size + header_len])["kdf"]


PRODUCTION = {"algorithm": "scrypt", "n": 2**17, "r": 8, "p": 1}


def test_production_kdf_parameters_are_the_default_and_stated_in_the_spec(env, tmp_path, monkeypatch):
    assert (KdfParams.STRONG_N, KdfParams.STRONG_R, KdfParams.STRONG_P) == (2**17, 8, 1)
    assert 128 * KdfParams.STRONG_N * KdfParams.STRONG_R == 128 << 20  # 128 MiB per derivation
    spec = SPEC.read_text()
    assert re.search(r"Default N = 2\^17, r = 8,\s+p = 1 \(128 MiB", spec)
    monkeypatch.delenv(WEAK_KDF_ENV)
    storage = MemoryStorage()
    Repository.create(storage, PASSWORD)  # the library's default
    kdf = _kdf_of(storage)
    assert {k: kdf[k] for k in PRODUCTION} == PRODUCTION and len(kdf["salt"]) == 16
    out = kdist("repo", "create", "--repo", tmp_path / "repo")  # the CLI's, without the test variable
    assert "WARNING" not in out
    kdf = _kdf_of(FilesystemStorage(tmp_path / "repo"))
    assert {k: kdf[k] for k in PRODUCTION} == PRODUCTION


def test_weak_kdf_is_refused_without_the_test_variable_everywhere(env, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    out = kdist("repo", "create", "--repo", repo)
    assert "WARNING: test-only weak key derivation" in out  # the test setting never passes silently
    assert _kdf_of(FilesystemStorage(repo))["n"] == 16
    kdist("snapshot", "list", "--repo", repo)
    monkeypatch.setenv("KDIST_NEW_PASSWORD", NEW_PASSWORD)
    for value in (None, "0", "", "true", "yes", " 1", "1 "):
        if value is None:
            monkeypatch.delenv(WEAK_KDF_ENV, raising=False)
        else:
            monkeypatch.setenv(WEAK_KDF_ENV, value)
        out = kdist("snapshot", "list", "--repo", repo, code=exit_codes.CORRUPTION)
        assert "test-only key derivation parameters (scrypt N=16" in out and "refusing" in out
        kdist("repo", "change-password", "--repo", repo, code=exit_codes.CORRUPTION)
        # nor can a weak repository be created by handing the library weak parameters
        storage = MemoryStorage()
        with pytest.raises(CorruptionError, match="test-only"):
            format_blob.create(storage, PASSWORD, kdf=KdfParams(16, 8, 1, os.urandom(16)))
        with pytest.raises(KdistError, match=WEAK_KDF_ENV):
            KdfParams.weak_for_tests()
        assert list(storage.list()) == []
