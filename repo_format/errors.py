"""Typed errors of the repository library.

Every error a person can meet has its own class and a message that says what happened and what
to do. The CLI maps the classes to exit codes in one place (``kdist.cli.exit_codes``); nothing
here knows about exit codes. Messages never contain passwords or key material.
"""


class KdistError(Exception):
    """Base class of every error kdist raises on purpose."""


class StorageError(KdistError):
    """The blob storage failed in a way that retrying will not fix."""


class RetryableStorageError(StorageError):
    """A transient storage failure (throttling, 5xx, dropped connection): retrying may help.
    ``stalled``: seconds the attempt waited for answers that never came (its timeouts; 0 for a
    refusal or a dropped connection), which ``RetryingStorage`` counts against its deadline. Not
    the attempt's duration: a slow link's long upload that then timed out is charged its
    timeout, not its upload."""

    def __init__(self, message: str = "", stalled: float = 0.0):
        super().__init__(message)
        self.stalled = float(stalled)


class BlobNotFound(StorageError):
    """A blob that should exist is not in the storage."""

    def __init__(self, name: str, detail: str = ""):
        self.name = name
        super().__init__(f"blob {name!r} not found" + (f": {detail}" if detail else ""))


class BlobExists(StorageError):
    """A create-only put found a blob of that name already present."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"blob {name!r} already exists")


class InvalidBlobName(StorageError, ValueError):
    """A blob name is not of the allowed form (it could escape the storage root)."""


class StorageUnreachable(StorageError):
    """The storage cannot be reached at all (no such bucket, bad endpoint, bad credentials)."""


class BlobLocked(StorageError):
    """A delete was refused because the blob is under S3 Object Lock retention until ``until``
    (seconds since the Unix epoch, the storage's clock). Maintenance leaves such a blob for a
    later run, exactly as if it had stopped before deleting it."""

    def __init__(self, name: str, until: float):
        self.name = name
        self.until = until
        super().__init__(f"blob {name!r} is locked (Object Lock) until {until:.0f}")


class ReadOnlyStorage(StorageError):
    """A write was attempted through a read-only storage."""


class AppendOnlyViolation(ReadOnlyStorage):
    """A delete, or a put over an existing name, was attempted through an append-only storage
    (the backup path, and every client holding a host key, may only add blobs)."""


def is_outage(exc: BaseException) -> bool:
    """The storage failing as a whole (unreachable, erroring after retries), as opposed to one
    blob being missing or malformed: a reader stops on it instead of reporting damage."""
    return isinstance(exc, StorageError) and not isinstance(exc, (BlobNotFound, BlobExists, InvalidBlobName,
                                                                    ReadOnlyStorage, BlobLocked))


class ConcurrentChange(KdistError):
    """The blobs a reader lists and reads (manifests, index) kept changing under it: maintenance
    was compacting them. Nothing is wrong; running the command again works (exit 21)."""


class RepositoryNotFound(KdistError):
    """There is no kdist repository at the given location."""


class RepositoryExists(KdistError):
    """A repository already exists where a new one was to be created."""


class WrongPassword(KdistError):
    """The password does not open the repository's format blob."""


class UnsupportedVersion(KdistError):
    """The repository (or a blob in it) was written by a format version this kdist cannot read."""


class CorruptionError(KdistError):
    """Stored data failed authentication or a structural check; the data is not returned."""


class ContentNotFound(KdistError):
    """A content id is not in the index (a repository inconsistency or a wrong id)."""
