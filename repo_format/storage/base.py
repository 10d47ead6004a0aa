"""The blob storage interface: the contract every backend and wrapper keeps.

A blob storage is dumb. It stores opaque, immutable byte strings under validated names; it knows
nothing of packs, indexes, encryption or dedup. The contract:

* ``put(name, data)`` is atomic: a reader sees either no blob or the whole blob, never a part.
  Putting an existing name replaces it atomically (only the format blob is ever rewritten).
* ``put_if_absent(name, data)`` creates the blob only if the name is free and says whether it
  did; backends that cannot do this atomically set ``atomic_create_only = False`` (it is then a
  check followed by a put), and the protocol never relies on it for safety.
* ``get(name, offset, length)`` returns the bytes of the range; a range past the end returns the
  bytes that exist (possibly none), so callers check lengths. A missing blob raises
  ``BlobNotFound``.
* ``stat(name)`` and ``list(prefix)`` report name, length and the **storage's** timestamp of the
  blob's write (seconds since the Unix epoch on the storage's clock, not the client's).
  ``list`` yields only blobs whose writes have completed, in no particular order.
* ``delete(name)`` removes a blob; deleting a missing blob is not an error. On a storage with
  Object Lock (``retention()`` is not None) a blob still under retention is not deleted:
  ``BlobLocked`` is raised, naming when the retention ends. Such a storage's delete removes the
  blob for good (S3: the object version), never leaves a recoverable delete marker.
* ``retention()`` is the storage's Object Lock default (``Retention``: mode and seconds), set on
  every blob at its put on the storage's clock, or None without Object Lock.
  ``extend_retention(name, until)`` keeps a blob locked until at least ``until`` (storage clock);
  it never shortens a retention.
* Read-after-write: once ``put`` returns, ``get``/``stat`` see the blob. ``list`` may lag on
  eventually-consistent stores; the maintenance protocol accounts for that with its margins.
* ``reclaim_leftovers(now, older_than)`` removes what cut writes leave behind and no listing
  shows (a filesystem's temp files and empty shard directories, S3's unfinished multipart
  uploads), when older than ``older_than`` seconds at ``now``, both on the storage's clock. It
  never touches a blob; maintenance calls it from its housekeeping step.
* Errors are typed (``repo_format.errors``): ``BlobNotFound``, ``RetryableStorageError`` for
  transient failures, ``StorageUnreachable`` for a missing bucket or bad credentials,
  ``StorageError`` otherwise.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from repo_format.errors import InvalidBlobName

MAX_NAME_LENGTH = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid blob name; raise ``InvalidBlobName`` otherwise.

    Names are 1-200 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, so they
    can never name a path outside a storage root (no ``/``, no ``..`` component, no leading dot).
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise InvalidBlobName(f"invalid blob name {name!r}")
    return name


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, or a valid leading part of a name."""
    if prefix:
        validate_name(prefix)
    return prefix


@dataclass(frozen=True)
class Retention:
    """An Object Lock default retention: ``mode`` ``GOVERNANCE`` or ``COMPLIANCE``, for
    ``seconds`` after each blob's put (S3 counts whole days)."""

    mode: str
    seconds: float


@dataclass(frozen=True)
class BlobMeta:
    """What a listing or stat says about one blob."""

    name: str
    length: int
    timestamp: float  # seconds since the Unix epoch, on the storage's clock


class BlobStorage(ABC):
    """Abstract blob storage; see the module docstring for the contract."""

    #: True when ``put_if_absent`` is atomic against concurrent writers.
    atomic_create_only: bool = False

    @abstractmethod
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``name`` atomically."""

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` only if ``name`` is free; return whether it was stored."""
        if self.exists(name):
            return False
        self.put(name, data)
        return True

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        """Return ``length`` bytes from ``offset`` (``-1``: to the end)."""

    @abstractmethod
    def stat(self, name: str) -> BlobMeta:
        """Return the blob's metadata or raise ``BlobNotFound``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobMeta]:
        """Yield every blob whose name starts with ``prefix``."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete the blob if it exists."""

    def retention(self) -> Retention | None:
        """The Object Lock default retention of every blob put, or None (the default: no lock)."""
        return None

    def extend_retention(self, name: str, until: float) -> None:
        """Keep ``name`` locked until at least ``until`` (the storage's clock); never shortens."""
        raise NotImplementedError(f"{self.describe()} has no Object Lock")

    def configure_retention(self, days: int, mode: str) -> None:
        """Lock every blob put from now on for ``days`` (``repo create --object-lock-days``)."""
        from repo_format.errors import StorageError

        raise StorageError(f"{self.describe()} has no Object Lock: it needs an S3 bucket created with Object Lock")

    def exists(self, name: str) -> bool:
        from repo_format.errors import BlobNotFound

        try:
            self.stat(name)
            return True
        except BlobNotFound:
            return False

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        """Remove what cut or failed writes left behind (never a blob) and return counts by kind.

        ``now`` is the storage's current time, as the caller read it (maintenance: the timestamp
        of a probe blob), never the local machine's clock; only leftovers older than ``now -
        older_than`` by the storage's own timestamps are removed. A put still in progress looks
        like a cut one, so ``older_than`` must exceed the longest a put can take (a put whose
        leftover was reclaimed fails or starts again; it never leaves a partial blob). Safe to run
        while other clients write, and from several places at once.

        The default: a backend that leaves nothing behind (memory) has nothing to reclaim, ``{}``.
        """
        return {}

    # Whether processes forked from the one that made this storage see the same blobs through
    # their copies of it (a directory or a bucket: yes; memory: no). ``kdist.processes`` needs it.
    shared_between_processes = True

    def after_fork(self) -> None:
        """Called in a forked child before it uses its copy of this storage: drop what must not
        be shared with the parent (connections, locks another thread may have held)."""

    def close(self) -> None:
        """Release connections or handles; the storage is not used afterwards."""

    def describe(self) -> str:
        """A human description of where the blobs are (no secrets)."""
        return type(self).__name__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def delete_unless_locked(storage: BlobStorage, name: str) -> bool:
    """Delete ``name`` and return True, or return False when Object Lock keeps it (``BlobLocked``):
    maintenance then leaves it to a later run, exactly as if it had stopped before this delete."""
    from repo_format.errors import BlobLocked

    try:
        storage.delete(name)
        return True
    except BlobLocked:
        return False


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < -1:
        raise ValueError(f"invalid range offset={offset} length={length}")
