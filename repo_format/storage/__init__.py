"""Blob storages: the interface, the backends, the wrappers, and ``open_storage`` for a location.

Importing this package does not import boto3; an ``S3Storage`` does when it is made.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from repo_format.errors import StorageError
from repo_format.storage import wrappers
from repo_format.storage.base import BlobMeta, BlobStorage, validate_name
from repo_format.storage.filesystem import FilesystemStorage
from repo_format.storage.memory import MemoryStorage
from repo_format.storage.s3 import S3Storage, parse_s3_url
from repo_format.storage.wrappers import (AppendOnlyStorage, CountingStorage, FaultInjectingStorage, ReadOnlyStorage,
                                          RetryingStorage, StorageWrapper)

__all__ = [
    "AppendOnlyStorage", "BlobMeta", "BlobStorage", "CountingStorage", "FaultInjectingStorage", "FilesystemStorage",
    "MemoryStorage", "ReadOnlyStorage", "RetryingStorage", "S3Storage", "StorageWrapper",
    "open_storage", "parse_s3_url", "validate_name", "wrappers",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_storage(location: str, endpoint_url: str | None = None, create: bool = False,
                 request_timeout: float | None = None) -> BlobStorage:
    """Open ``s3://bucket/prefix`` as an ``S3Storage``, a path or ``file:///path`` as a directory.

    ``create`` makes a missing directory; it never creates a bucket. ``request_timeout`` bounds
    how long S3 waits for a connection and for each reply: a quarter of it each try (at most 5 s
and 60 s; see ``kdist.access``).
    """
    scheme = _SCHEME.match(location)
    if scheme is None:
        return FilesystemStorage(os.path.expanduser(location), create=create)
    kind = scheme.group(1).lower()
    if kind == "s3":
        bucket, prefix = parse_s3_url(location)
        # a request stalls at most twice per attempt (botocore's two tries, S3Storage's
        # max_attempts), and RetryingStorage gives up once the stalls add up to the timeout: a
        # quarter each, so a request that never gets an answer fails within about the timeout
        timeouts = {} if request_timeout is None else {"connect_timeout": min(5.0, request_timeout / 4),
                                                         "read_timeout": min(60.0, request_timeout / 4)}
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url, **timeouts)
    if kind == "file":
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file location {location!r} names a remote host; use a local path")
        return FilesystemStorage(unquote(parts.path), create=create)
    raise StorageError(f"unsupported storage location {location!r}: use a directory path or s3://bucket/prefix")
