"""One way in: from (repository location, endpoint, password source, key id) to an opened repository.

Every entry point opens its repository here: the ``kdist`` commands, ``kdist fleet backup``'s
driver and its Ray actors on every node. So there is one storage stack (counted, retried, and
read-only or append-only as the command needs) and one password precedence:

1. a password file named explicitly (``--password-file``), which must be readable;
2. else the environment: ``KDIST_PASSWORD`` (or the variable ``--password-env`` names) holds the
   password, ``KDIST_PASSWORD_FILE`` names a file; both set is an error, not a silent choice;
3. else a prompt, on a terminal only.

A source that is named but cannot be read is an error: a wrong password must never come from a
fallback nobody asked for (``KDIST_PASSWORD=a kdist repo create --password-file f`` once made a
repository with password ``a``). A ``RepositorySpec`` is picklable and holds no secret: a Ray
actor gets the spec and reads the password on its own node.

Limits, set by options of every repository command (``kdist.cli.context``) and carried by the
spec to Ray actors: a storage request waits at most ``--request-timeout``
(``KDIST_REQUEST_TIMEOUT``, default 2 min) for answers, over all its attempts; a process moves at
most ``--limit-upload``/``--limit-download`` MB/s; a whole command runs at most ``--timeout``
(``KDIST_TIMEOUT``), after which it ends at once, as a kill would, with exit 14 (what a backup
stored is kept by its checkpoints).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from repo_format.errors import KdistError, RepositoryNotFound
from repo_format.local_cache import CacheSettings
from repo_format.repository import Repository
from repo_format.storage import open_storage
from repo_format.storage.base import BlobStorage
from repo_format.storage.wrappers import (AppendOnlyStorage, CountingStorage, ReadOnlyStorage, RetryingStorage,
                                          ThrottledStorage)

PASSWORD_ENV = "KDIST_PASSWORD"
PASSWORD_FILE_ENV = "KDIST_PASSWORD_FILE"
KEY_ID_ENV = "KDIST_KEY_ID"
REQUEST_TIMEOUT_ENV = "KDIST_REQUEST_TIMEOUT"
LIMIT_ENV = {"upload": "KDIST_LIMIT_UPLOAD", "download": "KDIST_LIMIT_DOWNLOAD"}  # MB/s
TIMEOUT_ENV = "KDIST_TIMEOUT"
DEFAULT_REQUEST_TIMEOUT = 120.0
DEADLINE_EXIT = 14  # what --timeout exits with: kdist/cli/exit_codes.STORAGE


class AccessError(KdistError):
    """The command cannot say which repository or password it means: an empty location, a
    password source that is named but unreadable, two sources that disagree, no password at all.
    A usage error (exit 2)."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``; ``ValueError`` otherwise."""
    text = str(text).strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos or (not m.group(2) and m.end() != len(text)):
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not text or pos != len(text) or total <= 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 2h or 1d")
    return total


_request_timeout: float | None = None  # --request-timeout of this process


def set_request_timeout(seconds: float | None) -> None:
    global _request_timeout
    _request_timeout = seconds


def request_timeout() -> float:
    """How long one storage request may wait for answers: ``--request-timeout``, else
    ``KDIST_REQUEST_TIMEOUT``, else 2 minutes."""
    if _request_timeout is not None:
        return _request_timeout
    text = os.environ.get(REQUEST_TIMEOUT_ENV)
    if not text:
        return DEFAULT_REQUEST_TIMEOUT
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise AccessError(f"{REQUEST_TIMEOUT_ENV}: {exc}") from None


_limits: dict[str, float | None] = {"upload": None, "download": None}  # --limit-upload/--limit-download


def set_limit(kind: str, mb_per_second: float | None) -> None:
    _limits[kind] = mb_per_second


def transfer_limits() -> tuple[float | None, float | None]:
    """(upload, download) limits of this process in bytes per second (None: unlimited), from
    ``--limit-upload``/``--limit-download`` or ``KDIST_LIMIT_UPLOAD``/``KDIST_LIMIT_DOWNLOAD``
    (MB/s, 1 MB = 10^6 bytes)."""
    out = []
    for kind in ("upload", "download"):
        value = _limits[kind]
        if value is None and os.environ.get(LIMIT_ENV[kind]):
            try:
                value = float(os.environ[LIMIT_ENV[kind]])
            except ValueError:
                raise AccessError(f"{LIMIT_ENV[kind]} must be a number of MB/s") from None
            if not value > 0:
                raise AccessError(f"{LIMIT_ENV[kind]} must be above 0")
        out.append(value * 1e6 if value else None)
    return out[0], out[1]


_deadline_lock = threading.Lock()
_deadline: list = []  # [threading.Timer] once --timeout armed it
_at_deadline: list[Callable[[], None]] = []


DEADLINE_HOOKS_WAIT = 5.0  # seconds the hooks get before the process ends anyway


def at_deadline(hook: Callable[[], None], first: bool = False) -> None:
    """Run ``hook`` when ``--timeout`` ends the command (write a status file, say a backup
    failed; ``first``: before the others, e.g. kill child processes). The hooks get a few seconds
    together: one that blocks (a hung pipe, an unreachable Pushgateway) cannot keep the process
    alive."""
    if first:
        _at_deadline.insert(0, hook)
    else:
        _at_deadline.append(hook)


DEADLINE_THREAD = "kdist-deadline"  # holds no lock of kdist's: a multi-process backup may fork beside it


def start_deadline(seconds: float) -> threading.Timer:
    """End this process ``seconds`` from now, whatever it is doing (a request that never
    returns included), with a message and exit 14; ``at_deadline`` hooks run first (the
    multi-process backup's hook kills its children). Once per process."""

    def run_hooks() -> None:
        for hook in list(_at_deadline):
            try:
                hook()
            except Exception:  # the exit must happen
                pass

    def expire() -> None:
        # os.write, not sys.stderr: the main thread may hold the stream's lock, stuck writing
        try:
            os.write(2, f"kdist: error: the command ran past its time limit of {seconds:g} s (--timeout or "
                        f"{TIMEOUT_ENV}) and was stopped; what a backup stored so far is kept by its "
                        "checkpoints\n".encode())
        except OSError:
            pass
        hooks = threading.Thread(target=run_hooks, name="kdist-deadline-hooks", daemon=True)
        hooks.start()
        hooks.join(DEADLINE_HOOKS_WAIT)
        os._exit(DEADLINE_EXIT)

    with _deadline_lock:
        if _deadline:
            return _deadline[0]
        timer = threading.Timer(seconds, expire)
        timer.name = DEADLINE_THREAD
        timer.daemon = True
        timer.start()
        _deadline.append(timer)
        return timer


def clear_deadline() -> None:
    """Cancel ``--timeout`` and forget the hooks (tests that run commands in-process)."""
    with _deadline_lock:
        for timer in _deadline:
            timer.cancel()
        _deadline.clear()
        _at_deadline.clear()


def reset_process_settings() -> None:
    """Forget what an earlier command in this process set (--request-timeout, --limit-*,
    --timeout and its hooks): ``kdist``'s group calls it before each command's options are read,
    so commands run in one process (tests, scripts) do not inherit each other's limits."""
    set_request_timeout(None)
    set_limit("upload", None)
    set_limit("download", None)
    clear_deadline()


def check_location(location: str | None) -> str:
    """The repository location, refused when empty (``--repo ''`` once made the current directory
    a repository)."""
    if location is None or not location.strip():
        raise AccessError("no repository: --repo (or KDIST_REPO) is empty; give a directory or s3://bucket/prefix")
    return location


def read_password_file(path: str) -> str:
    """The first line of ``path``, without its line ending; an error naming the file (never its
    content) when it cannot be read."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise AccessError(f"cannot read password file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AccessError(f"password file {path} is not UTF-8 text") from None


@dataclass(frozen=True)
class PasswordSource:
    """Where the password comes from (read where it is used: on a Ray node, that node's file or
    environment). ``file``: named explicitly, wins; ``env``: the variable holding the password;
    ``file_env``: the variable naming a password file."""

    file: str | None = None
    env: str = PASSWORD_ENV
    file_env: str = PASSWORD_FILE_ENV

    def read(self, prompt: str | None = None, confirm: bool = False) -> str:
        """The password. ``prompt``: ask on a terminal when no other source is set (the CLI); a
        Ray actor passes None and gets an error instead."""
        if self.file:
            return read_password_file(self.file)
        value = os.environ.get(self.env)
        named = os.environ.get(self.file_env) or None
        if value is not None and named is not None:
            raise AccessError(f"both {self.env} and {self.file_env} are set: unset one (or name the file with "
                              "--password-file, which wins)")
        if value is not None:
            return value
        if named is not None:
            return read_password_file(named)
        if prompt is not None and sys.stdin.isatty():
            import click
            return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
        raise AccessError(f"no password: set {self.env}, {self.file_env} or --password-file"
                          + (", or run in a terminal" if prompt is not None else ""))


def make_storage(location: str, endpoint_url: str | None, create: bool = False, read_only: bool = False,
                 append_only: bool = False, timeout: float | None = None,
                 limits: tuple[float | None, float | None] | None = None) -> BlobStorage:
    """The storage stack of every entry point: counted, retried within the request timeout
    (``timeout``, else ``request_timeout()``), each attempt within the transfer limits
    (``limits``, else ``transfer_limits()``); read-only, or append-only for the backup path (it
    never deletes or replaces a blob, so it is refused here before storage policy refuses it
    there)."""
    location = check_location(location)
    if not create and "://" not in location and not os.path.isdir(os.path.expanduser(location)):
        raise RepositoryNotFound(f"no kdist repository at {location} (no such directory)")
    timeout = timeout or request_timeout()
    upload, download = limits if limits is not None else transfer_limits()
    raw = open_storage(location, endpoint_url=endpoint_url, create=create, request_timeout=timeout)
    if upload or download:
        raw = ThrottledStorage(raw, upload, download)
    storage = CountingStorage(RetryingStorage(raw, deadline=timeout))
    if read_only:
        return ReadOnlyStorage(storage)
    return AppendOnlyStorage(storage) if append_only else storage


@dataclass(frozen=True)
class RepositorySpec:
    """Which repository, and how to get in: no secret, so it can travel to Ray actors.
    ``key_id`` None: the ``KDIST_KEY_ID`` of the process that opens it (each node its own key)."""

    location: str
    endpoint_url: str | None = None
    password: PasswordSource = PasswordSource()
    key_id: str | None = None
    request_timeout: float = field(default_factory=request_timeout)  # this process's, carried to actors
    limits: tuple = field(default_factory=transfer_limits)  # (upload, download) bytes/s, per process

    def __post_init__(self):
        check_location(self.location)

    def storage(self, create: bool = False, read_only: bool = False, append_only: bool = False) -> BlobStorage:
        return make_storage(self.location, self.endpoint_url, create=create, read_only=read_only,
                            append_only=append_only, timeout=self.request_timeout, limits=self.limits)

    def resolved_key_id(self) -> str | None:
        return self.key_id or os.environ.get(KEY_ID_ENV) or None

    def open(self, read_only: bool = False, append_only: bool = False, cache: CacheSettings | None = None,
             prompt: str | None = None, **repo_kwargs) -> Repository:
        """The opened repository. Read-only and append-only clients (listing, restoring, backing
        up) pass over a manifest blob or a raw index blob they cannot read
        (``ManifestStore.skip_unreadable``, ``EpochManager.skip_unreadable``); maintenance and
        forget do not. ``cache``: None reads this process's environment."""
        storage = self.storage(read_only=read_only, append_only=append_only)
        repo = Repository.open(storage, self.password.read(prompt=prompt), key_id=self.resolved_key_id(),
                               cache=cache if cache is not None else CacheSettings.from_environment(), **repo_kwargs)
        repo.skip_unreadable = read_only or append_only
        return repo
