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


def open_storage(location: str, endpoint_url: str | None = None, create: bool = False) -> BlobStorage:
    """Open ``s3://bucket/prefix`` as an ``S3Storage``, a path or ``file:///path`` as a directory.

    ``create`` makes a missing directory; it never creates a bucket.
    """
    scheme = _SCHEME.match(location)
    if scheme is None:
        return FilesystemStorage(os.path.expanduser(location), create=create)
    kind = scheme.group(1).lower()
    if kind == "s3":
        bucket, prefix = parse_s3_url(location)
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url)
    if kind == "file":
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file location {location!r} names a remote host; use a local path")
        return FilesystemStorage(unquote(parts.path), create=create)
    raise StorageError(f"unsupported storage location {location!r}: use a directory path or s3://bucket/prefix")
