"""Sessions and the storage clock.

A writing client adds a heartbeat blob ``s<session>-b<8 random hex><commitment>`` every
``session_heartbeat`` seconds while it runs, and an end blob ``s<session>-e<secret>`` when it
finishes, where the commitment is a hash of the secret: it never replaces or deletes one
(writers are append-only; maintenance's housekeeping collects markers older than twice the
expiry). A session is live while it has a heartbeat younger than ``session_expiry`` on the
storage's clock and no end blob whose secret matches its commitment (markers of older kdist,
``s<session>``, count as heartbeats). Random names and the secret keep other clients (a
hostile host) from ending someone else's session or taking its next marker's name first.
Maintenance never deletes a pack whose name carries a live session. A writer that could not
refresh its marker for longer than the expiry (it was paused or cut off) refuses to publish
index blobs: maintenance may have collected its unindexed packs meanwhile.

``storage_now`` reads the storage's clock by writing a probe blob and reading its timestamp:
the only clock that safety margins are measured on.
"""

from __future__ import annotations

import secrets
import threading

import blake3
import msgpack

from repo_format import clock
from repo_format import constants as C
from repo_format.crypto import Aead
from repo_format.errors import KdistError
from repo_format.storage.base import BlobMeta, BlobStorage


class SessionExpired(KdistError):
    """This client's session marker lapsed (a long pause); it must not publish what it wrote."""


def storage_now(storage: BlobStorage, session: str) -> float:
    """The storage's current time, read from the timestamp of a probe blob."""
    name = f"{C.PROBE_PREFIX}{secrets.token_hex(8)}-{session}"
    storage.put(name, b"")
    try:
        return storage.stat(name).timestamp
    finally:
        if storage.retention() is None:  # under Object Lock it is locked: housekeeping deletes it later
            storage.delete(name)


def session_of(blob_name: str) -> str | None:
    """The session id a pack or index blob name ends with (``...-<session>``)."""
    head, sep, tail = blob_name.rpartition("-")
    return tail if sep and len(tail) == 2 * C.SESSION_ID_BYTES else None


def _commitment(secret: str) -> str:
    return blake3.blake3(secret.encode("ascii")).hexdigest()[:COMMIT_HEX]


COMMIT_HEX = 16


def marker_session(name: str) -> tuple[str, str, str]:
    """(session, kind, value) of a session marker's name: ``("b", commitment)`` for a heartbeat,
    ``("e", secret)`` for an end blob, ``("", "")`` for a marker of older kdist."""
    session, _, rest = name[len(C.SESSION_PREFIX):].partition("-")
    if rest.startswith("b") and len(rest) == 1 + 8 + COMMIT_HEX:
        return session, "b", rest[-COMMIT_HEX:]
    if rest.startswith("e"):
        return session, "e", rest[1:]
    return session, "", ""


def live_sessions(markers: list[BlobMeta], now: float, expiry: float) -> set[str]:
    """Sessions with a heartbeat younger than ``expiry`` and no end. An end blob counts only when
    the hash of the secret it names is the commitment its session's heartbeats carry: nobody but
    the session's writer knows the secret, so no one else can end a session (a host could
    otherwise make another's running backup look dead to maintenance)."""
    beating, commits, ends = set(), {}, []
    for m in markers:
        session, kind, value = marker_session(m.name)
        if kind == "e":
            ends.append((session, value))
            continue
        if kind == "b":
            commits.setdefault(session, set()).add(value)
        if now - m.timestamp < expiry:
            beating.add(session)
    ended = {session for session, secret in ends if _commitment(secret) in commits.get(session, ())}
    return beating - ended


def unended_sessions(storage: BlobStorage) -> set[str]:
    """Sessions with a marker and no end blob, however old (a writer that did not retire)."""
    return live_sessions(list(storage.list(C.SESSION_PREFIX)), 0.0, float("inf"))


class SessionMarker:
    def __init__(self, storage: BlobStorage, aead: Aead, session: str, heartbeat: float, expiry: float,
                 auto: bool = True):
        self.storage = storage
        self.session = session
        self.name = C.SESSION_PREFIX + session
        self._secret = secrets.token_hex(16)  # revealed by the end blob's name only
        self._ended = False  # its end blob is written: a marker is never started again
        self._aead = aead
        self._heartbeat = heartbeat
        self._expiry = expiry
        self._last_ok = None  # monotonic time of the last successful write
        self._lapsed = False  # once true, this session never publishes again
        self._stop = threading.Event()
        self._thread = None
        self._auto = auto and heartbeat > 0
        self.on_beat = None  # also run on every beat (the content store refreshes its index view)

    def start(self) -> None:
        if self._ended:
            raise KdistError(f"session {self.session} has ended; a new one must be started (kdist bug)")
        self.refresh()
        if self._auto:
            self._thread = threading.Thread(target=self._run, name=f"kdist-session-{self.session}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._heartbeat):
            try:
                self.refresh()
                if self.on_beat is not None:
                    self.on_beat()
            except KdistError:
                pass  # the next beat retries; check_alive() refuses to publish once it lapses

    def refresh(self) -> None:
        started = clock.monotonic()
        if self._last_ok is not None and self._expiry > 0 and started - self._last_ok >= self._expiry * 0.8:
            self._lapsed = True  # paused or cut off past the expiry: refreshing now cannot undo that
        self._put("b" + secrets.token_hex(4) + _commitment(self._secret))  # unguessable: none can be put first
        self._last_ok = started

    def _put(self, beat: str) -> None:
        name = f"{self.name}-{beat}"
        body = msgpack.packb({"session": self.session, "at": clock.now(), "marker": beat})
        self.storage.put(name, self._aead.seal(body, name.encode()))

    def check_alive(self) -> None:
        """Raise ``SessionExpired`` if the marker may have lapsed; refresh it if it is due."""
        if self._expiry <= 0:
            return
        if self._lapsed or self._last_ok is None or clock.monotonic() - self._last_ok >= self._expiry * 0.8:
            self._lapsed = True
            raise SessionExpired(
                f"session {self.session} was not refreshed for longer than its expiry "
                f"({self._expiry:.0f} s): this client was paused or cut off, and maintenance may "
                "have collected what it wrote; run the backup again"
            )
        if clock.monotonic() - self._last_ok >= self._heartbeat:
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._last_ok is not None and not self._ended:
            self._ended = True
            self._put("e" + self._secret)
