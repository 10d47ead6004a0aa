"""Exit codes of every kdist command, mapped from error classes in one place.

| code | meaning |
|------|---------|
| 0  | success |
| 1  | failure not covered below (a bug or an unexpected error) |
| 2  | usage error (bad arguments or options; a key that cannot be added or removed as asked) |
| 3  | partial success: finished, but some files were skipped or could not be restored |
| 10 | repository not found |
| 11 | repository already exists |
| 12 | wrong password |
| 13 | corruption found (authentication failure, damaged or missing data) |
| 14 | storage unreachable or failing (bucket, credentials, endpoint, I/O) |
| 15 | unsupported format version |
| 16 | snapshot or path not found, or an ambiguous snapshot id |
| 17 | the backup source or restore target cannot be used (missing source, full disk) |
| 18 | a distributed backup (`cluster/backup.py`) finished, but some node or shard failed; a process of a multi-process backup (`snapshot create --processes`) died |
| 19 | permission refused: this key's role may not do that (a host key running maintenance, forget, key changes; a host key backing up as another host) |
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


def exit_code_for(exc: BaseException) -> int:
    # imported here: the CLI layer knows the library, never the other way round
    from repo_format.keyslots import PermissionRefused

    from kdist.keys import KeyManagementError
    from kdist.processes import BackupProcessDied
    from kdist.restore import RestoreError, TargetFull, TargetUnusable
    from kdist.snapshot import SnapshotNotFound
    from kdist.uploader import SourceError

    table = [
        (PermissionRefused, PERMISSION),
        (KeyManagementError, USAGE),
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
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, E.KdistError) and isinstance(exc.__cause__, E.KdistError):
        return exit_code_for(exc.__cause__)  # a wrapper (GC's IncompleteWalk) exits as its cause would
    return FAILURE
