"""Failed backups, recorded in the repository: what ``kdist fleet status`` shows as a host's
last failure, whoever ran the backup (cron, ``kdist fleet backup``, a CronJob) and whatever
became of its logs.

A failure record is a manifest record (SPEC.md section 8) with labels ``type=failure``,
``host``, ``user``, ``path`` (``path`` empty: the whole host, e.g. a node that could not start
its backup) and a msgpack payload ``{"time", "error", "exit_code", "run"}``. It is written
by the backup that failed, when it can still reach the repository, and by the fleet driver for
a node that could not write its own (its actor died, or it could not open the repository). A
host key may write failure records of its own host only (``repo_format.keyslots``), so a host
can neither blame nor clear another.

A failure record refers to no content and is never a root of garbage collection; retention
(``snapshot forget``) never looks at it. Maintenance forgets one ``FAILURE_KEEP`` after it was
stored (``plan_failures``): the only records that step may forget are of this type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack

from repo_format import clock
from repo_format.manifest import ManifestRecord, ManifestStore

FAILURE_LABEL = "failure"
FAILURE_KEEP = 30 * 86400.0  # seconds (storage clock) a failure record is kept
MAX_ERROR = 1000  # characters of the error message a record keeps
_FIELDS = {"time": (int, float), "error": (str,), "exit_code": (int,), "run": (str,)}


@dataclass
class Failure:
    host: str
    user: str
    path: str  # "" for the whole host
    time: float  # when it failed (the writer's clock; ``kdist.retention.bounded_by_storage``)
    error: str
    exit_code: int
    run: str = ""  # the fleet run it belongs to ("" outside one)
    id: str = ""
    stored: float = 0.0  # when its record was first stored (storage clock; 0 unknown)
    signer: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def record_failure(manifests: ManifestStore, host: str, user: str, path: str, error: str, exit_code: int,
                   run: str = "") -> ManifestRecord:
    """Write one failure record (a new manifest blob: append-only writers may). Text that is
    not valid Unicode (a file name's undecodable bytes) is kept escaped."""
    payload = {"time": clock.now(), "error": _text(error)[:MAX_ERROR], "exit_code": int(exit_code), "run": run}
    return manifests.put({"type": FAILURE_LABEL, "host": _text(host), "user": _text(user), "path": _text(path)},
                         msgpack.packb(payload))


def _text(s: str) -> str:
    """``s`` as valid Unicode: an undecodable byte of a file name (a surrogate) as ``\\xe9``."""
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def try_record_failure(manifests: ManifestStore, host: str, user: str, path: str, error: str, exit_code: int,
                       run: str = "") -> str:
    """``record_failure``, for a backup that is failing already: '' if written, else why not
    (the storage that failed the backup may fail this put too; the backup's own error stands)."""
    try:
        record_failure(manifests, host, user, path, error, exit_code, run)
    except Exception as exc:  # whatever it is, the backup's own error is the one to report
        return f"{type(exc).__name__}: {exc}"
    return ""


def read_failures(manifests: ManifestStore, **labels) -> list[Failure]:
    """The failure records that count (a malformed payload is left out), oldest first."""
    return decode_failures(manifests.find(type=FAILURE_LABEL, **labels))


def decode_failures(records) -> list[Failure]:
    """The failures of these failure records (a malformed payload is left out), oldest first."""
    out = [f for f in map(_decode, records) if f is not None]
    return sorted(out, key=lambda f: (f.stored or f.time, f.id))


def _decode(r: ManifestRecord) -> Failure | None:
    try:
        doc = msgpack.unpackb(r.payload, raw=False)
    except Exception:  # any bytes a writer chose: a record that does not decode is no failure shown
        return None
    if not isinstance(doc, dict) or set(doc) != set(_FIELDS) or not all(
            type(doc[k]) in types for k, types in _FIELDS.items()):
        return None
    if not all(isinstance(r.labels.get(k), str) for k in ("host", "user", "path")):
        return None
    if not 0 <= doc["time"] < 2**37:
        return None
    return Failure(r.labels["host"], r.labels["user"], r.labels["path"], float(doc["time"]),
                   doc["error"][:MAX_ERROR], doc["exit_code"], doc["run"], r.id, r.stored, r.signer)


def plan_failures(manifests: ManifestStore, now: float, keep: float = FAILURE_KEEP,
                  type_rule: bool = True) -> list[ManifestRecord]:
    """The failure records stored more than ``keep`` ago (storage clock; a record whose storage
    time is unknown is kept). Only records of type ``failure`` are ever chosen: this step must
    not be able to forget a snapshot. ``type_rule=False`` is the simulator's mutation (every old
    record is chosen), which its scenario and tests/gc/test_failure_records.py catch."""
    old = [r for r in manifests.find() if r.stored and now - r.stored > keep]
    return [r for r in old if r.labels.get("type") == FAILURE_LABEL or not type_rule]
