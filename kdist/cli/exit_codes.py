"""Exit codes of every kdist command, mapped from error classes in one place.

| code | meaning |
|------|---------|
| 0  | success |
| 1  | failure not covered below (a bug or an unexpected error) |
| 2  | usage error (bad arguments or options; an empty `--repo`; a password source that is named but unreadable, or two that conflict; a key that cannot be added or removed as asked) |
| 3  | partial success: finished, but some files were skipped or could not be restored (or, by `restore --overwrite never`, existing files that differ from the snapshot were left; `restore --dry-run`: the restore would leave or block some) |
| 10 | repository not found |
| 11 | repository already exists |
| 12 | wrong password |
| 13 | corruption found (authentication failure, damaged or missing data) |
| 14 | storage unreachable or failing (bucket, credentials, endpoint, I/O) |
| 15 | unsupported format version |
| 16 | snapshot or path not found, or an ambiguous snapshot id |
| 17 | the backup source or restore target cannot be used (missing source, full disk) |
| 18 | a distributed backup (`kdist fleet backup`, `cluster/backup.py`) finished, but some node or shard failed; a process of a multi-process backup (`snapshot create --processes`) died |
| 19 | permission refused: this key's role may not do that (a host key running maintenance, forget, key changes; a host key backing up as another host) |
| 20 | the Ray cluster cannot be reached or started (`kdist fleet backup`, `gc run --ray`): a wrong or stale address, a head that does not answer |
| 21 | retryable: the repository's manifest or index blobs kept changing while the command read them (maintenance compacting them); nothing is wrong, run it again |
| 22 | `kdist fleet status`: some host or path has no snapshot within `--max-age` (or a host key has none at all), or its backup failed after its last snapshot |
"""

from repo_format import errors as E

SUCCESS = 0
FAILURE = 1
USAGE = 2
PARTIAL = 3
REPO_NOT_FOUND = 10
REPO_EXISTS = 11
WRONG_PASSWORD = 12
CORRUPTION = 13
STORAGE = 14
UNSUPPORTED_VERSION = 15
NOT_FOUND = 16
SOURCE_OR_TARGET = 17
DISTRIBUTED_FAILED = 18
PERMISSION = 19
RAY_UNAVAILABLE = 20
CONCURRENT_CHANGE = 21
STALE = 22


def exit_code_for(exc: BaseException) -> int:
    # imported here: the CLI layer knows the library, never the other way round
    from repo_format.keyslots import PermissionRefused

    from kdist.access import AccessError
    from kdist.distributed.connect import RayUnavailable
    from kdist.keys import KeyManagementError
    from kdist.processes import BackupProcessDied
    from kdist.restore import RestoreError, TargetFull, TargetUnusable
    from kdist.snapshot import SnapshotNotFound
    from kdist.uploader import SourceError

    table = [
        (PermissionRefused, PERMISSION),
        (KeyManagementError, USAGE),
        (AccessError, USAGE),
        (E.ConcurrentChange, CONCURRENT_CHANGE),
        (E.RepositoryNotFound, REPO_NOT_FOUND),
        (E.RepositoryExists, REPO_EXISTS),
        (E.WrongPassword, WRONG_PASSWORD),
        (E.UnsupportedVersion, UNSUPPORTED_VERSION),
        (E.CorruptionError, CORRUPTION),
        (E.ContentNotFound, CORRUPTION),
        (E.BlobNotFound, CORRUPTION),
        (E.StorageError, STORAGE),
        (SnapshotNotFound, NOT_FOUND),
        (TargetFull, SOURCE_OR_TARGET),
        (TargetUnusable, SOURCE_OR_TARGET),
        (SourceError, SOURCE_OR_TARGET),
        (RestoreError, NOT_FOUND),
        (BackupProcessDied, DISTRIBUTED_FAILED),
        (RayUnavailable, RAY_UNAVAILABLE),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, E.KdistError) and isinstance(exc.__cause__, E.KdistError):
        return exit_code_for(exc.__cause__)  # a wrapper (GC's IncompleteWalk) exits as its cause would
    return FAILURE
