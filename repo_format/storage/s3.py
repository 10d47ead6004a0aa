"""Blob storage in an S3 bucket (AWS or any S3-compatible endpoint), on boto3.

Blob ``name`` is stored at key ``prefix + name``. Credentials come from boto3's standard chain
(environment, ``~/.aws``, instance or container role); this module never handles or prints them.

Errors: botocore's own retries are kept low (``max_attempts``) because retrying lives in
``RetryingStorage``; this module only says what is retryable. Throttling, 5xx and dropped
connections raise ``RetryableStorageError``, and so does a reply cut off in transit. HTTP
clients take a connection closed inside the headers for their end, so a GET whose length does
not match its ``Content-Length`` (or has none), a ``stat`` whose first byte did not arrive, a
listing page without ``IsTruncated``, a header botocore cannot parse and an error reply whose
body broke off are all retryable, never a short blob, a wrong length, an empty listing or a
traceback. Failing to connect raises ``StorageUnreachable`` while no request has yet succeeded
(a wrong endpoint should fail fast, not be retried), and ``RetryableStorageError`` once one has.
A timeout is retryable, charged to ``RetryingStorage``'s deadline as the seconds it waited
(``stalled``): an endpoint that accepts and never answers fails within ``--request-timeout``,
and one slow first reply (hundreds of nodes starting at once) is tried again.
A missing bucket and refused credentials raise ``StorageUnreachable``.

``put_if_absent`` checks with HEAD, then writes with ``If-None-Match: *``. On AWS that write is
atomic; other servers may ignore the header, so ``atomic_create_only`` is False and the HEAD at
least keeps it from overwriting a blob that already existed. When botocore retried the write
because the reply to the first attempt was lost, the retry fails its precondition on our own
blob: a blob holding exactly our bytes is therefore taken as created by this call.

A put killed during a multipart upload leaves the upload unfinished: invisible, but billed until
``reclaim_leftovers`` aborts it.

Object Lock: ``retention()`` reads the bucket's default retention once (the storage sets it on
every put, on its own clock; kdist never sends lock headers). On such a bucket ``delete`` reads
the blob's version and retention with a HEAD and either raises ``BlobLocked`` (the retention
ends after the HEAD's ``Date``, the storage's clock) or deletes that version for good: a plain
DELETE would only add a delete marker over the locked data. ``extend_retention`` puts a later
retain-until date; a refusal is accepted when the blob is already locked at least that long.

boto3 is imported when an ``S3Storage`` is made, not when this module is, since it costs ~0.3 s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Iterator
from urllib.parse import urlsplit

from repo_format.errors import BlobLocked, BlobNotFound, RetryableStorageError, StorageError, StorageUnreachable
from repo_format.storage.base import (BlobMeta, BlobStorage, Retention, check_range, validate_name,
                                      validate_prefix)

log = logging.getLogger(__name__)
MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's smallest part, except the last
MAX_PARTS = 10_000

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
              "InternalError", "RequestTimeout", "ConditionalRequestConflict", "OperationAborted"}
_TRANSIENT_STATUS = {500, 502, 503, 504}
# an error reply without a (whole) body, a HEAD's or one cut in transit, has its status as code
_CODE_OF_STATUS = {"412": "PreconditionFailed", "416": "InvalidRange", "501": "NotImplemented"}
_NO_LOCK_CONFIG = ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound")
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
DAY = 86400.0
MAX_VERSIONS = 16  # versions of one name a delete removes before it calls it corruption


def _lock_needs_checksum(code: str, message: str) -> bool:
    """A put into a bucket with Object Lock refused for want of a checksum: AWS answers
    InvalidRequest "Content-MD5 OR x-amz-checksum- HTTP header is required for Put Object (Put
    Part) requests with Object Lock parameters"; moto has a code of its own."""
    text = message.lower()
    return code == "MissingUploadObjectWithObjectLockHeaders" or (
        code == "InvalidRequest" and ("content-md5" in text or "x-amz-checksum" in text))


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise StorageError(f"invalid S3 location {url!r}: expected s3://bucket or s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


class _Refused(Exception):
    """An S3 error code the caller asked to handle itself (e.g. PreconditionFailed)."""

    def __init__(self, code: str, message: str = ""):
        self.code = code
        self.message = message


class S3Storage(BlobStorage):
    atomic_create_only = False

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region_name: str | None = None, multipart_threshold: int = 64 * MiB,
                 multipart_chunksize: int = 16 * MiB, max_attempts: int = 2,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0):
        if not bucket or "/" in bucket:
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        if multipart_chunksize < MIN_PART_SIZE:
            raise ValueError(f"multipart_chunksize must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)")
        if multipart_threshold < 1:
            raise ValueError("multipart_threshold must be positive")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._reached = False  # has any request succeeded? (see the module docstring)
        self._retention: list = []  # [Retention | None] once read
        # puts into a bucket with Object Lock need a checksum: botocore sends one by default to
        # AWS, not to other endpoints (see _make_client); learnt from the first refusal
        self._checksum: dict = {}
        self._client_args = (endpoint_url, region_name, max_attempts, connect_timeout, read_timeout)
        self._client = _make_client(*self._client_args)
        self.endpoint = self._client.meta.endpoint_url

    def _key(self, name: str) -> str:
        return self.prefix + validate_name(name)

    # ---- writes

    def put(self, name, data) -> None:
        key = self._key(name)
        self._upload(name, key, _as_bytes(data), {})

    def put_if_absent(self, name, data) -> bool:
        key = self._key(name)
        if self.exists(name):
            return False
        data = _as_bytes(data)
        try:
            self._upload(name, key, data, {"IfNoneMatch": "*"}, accept=("PreconditionFailed", "NotImplemented"))
        except _Refused as refused:
            if refused.code == "PreconditionFailed":
                return self._holds(name, data)  # ours, if an attempt whose reply was lost wrote it
            self._upload(name, key, data, {})  # the server has no conditional writes
        return True

    def _holds(self, name: str, data: bytes) -> bool:
        try:
            return self.get(name) == data
        except BlobNotFound:
            return False

    def _upload(self, name: str, key: str, data: bytes, conditions: dict, accept=()) -> None:
        try:
            self._upload_once(name, key, data, conditions, accept + ("InvalidRequest",
                                                                      "MissingUploadObjectWithObjectLockHeaders"))
        except _Refused as refused:
            if refused.code in accept:
                raise
            if self._checksum or not _lock_needs_checksum(refused.code, refused.message):
                raise StorageError(f"S3 put {name!r} in {self.describe()} failed ({refused.code}): "
                                   f"{refused.message}") from None
            self._checksum = {"ChecksumAlgorithm": "CRC32"}  # from now on, for every put
            self._upload_once(name, key, data, conditions, accept)

    def _upload_once(self, name: str, key: str, data: bytes, conditions: dict, accept) -> None:
        if len(data) <= self.multipart_threshold:
            with self._errors("put", name, accept):
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions, **self._checksum)
            return
        with self._errors("put", name, accept):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                             **self._checksum)["UploadId"]
        try:
            with self._errors("put", name, accept):
                parts = self._upload_parts(key, upload_id, memoryview(data))
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
                    **conditions)
        except BaseException:
            # an unfinished upload is invisible but billed until aborted
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _upload_parts(self, key: str, upload_id: str, view: memoryview) -> list[dict]:
        part_size = max(self.multipart_chunksize, math.ceil(len(view) / MAX_PARTS))
        parts = []
        for number, start in enumerate(range(0, len(view), part_size), start=1):
            response = self._client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                PartNumber=number, Body=bytes(view[start:start + part_size]),
                                                **self._checksum)
            part = {"ETag": response["ETag"], "PartNumber": number}
            if "ChecksumCRC32" in response:
                part["ChecksumCRC32"] = response["ChecksumCRC32"]
            parts.append(part)
        return parts

    def delete(self, name) -> None:
        key = self._key(name)
        if self.retention() is None:
            with self._errors("delete", name):
                self._client.delete_object(Bucket=self.bucket, Key=key)
            return
        # every version, newest first: deleting the current one makes an older one current (a
        # put that landed twice, a retried put), and the blob must be gone when this returns
        for _ in range(MAX_VERSIONS):
            try:
                with self._errors("delete", name):
                    head = self._client.head_object(Bucket=self.bucket, Key=key)
            except BlobNotFound:
                return
            self._delete_version(name, key, head)
        raise StorageError(f"S3 delete {name!r} in {self.describe()}: more than {MAX_VERSIONS} versions")

    def _delete_version(self, name: str, key: str, head: dict) -> None:
        until, version = self._locked_until(head), head.get("VersionId")
        if until is None and head.get("ObjectLockLegalHoldStatus") == "ON":  # until someone lifts it
            until = self._server_time(head) + DAY
        if until is not None:
            raise BlobLocked(name, until)
        try:
            with self._errors("delete", name, accept=("AccessDenied",)):
                self._client.delete_object(Bucket=self.bucket, Key=key, **({"VersionId": version} if version else {}))
        except _Refused:
            with self._errors("delete", name):  # locked meanwhile (a concurrent run extended it)?
                until = self._locked_until(self._client.head_object(Bucket=self.bucket, Key=key))
            if until is not None:
                raise BlobLocked(name, until) from None
            raise StorageUnreachable(
                f"S3 refused to delete a version of {name!r} in {self.describe()}: on a bucket with Object Lock "
                "maintenance needs s3:GetObjectRetention and s3:DeleteObjectVersion "
                "(cluster/policies/maintenance-object-lock-policy.json)") from None

    def _locked_until(self, head: dict) -> float | None:
        """When the version a HEAD saw stays locked until, if still locked by the reply's own
        Date (the storage's clock); None if it is free."""
        until = head.get("ObjectLockRetainUntilDate")
        if until is None or until.timestamp() < self._server_time(head):
            return None
        return until.timestamp()

    def _server_time(self, response: dict) -> float:
        from email.utils import parsedate_to_datetime

        try:
            return parsedate_to_datetime(_header(response, "date")).timestamp()
        except (TypeError, ValueError):
            raise self._incomplete("delete", None, "no Date header to judge a retention by") from None

    # ---- Object Lock

    def retention(self) -> Retention | None:
        """The bucket's default retention; None without one, and when the server cannot say (no
        permission, no such API: maintenance refuses to run when the repository asks for a lock
        it cannot see, gc/run.py)."""
        if not self._retention:
            rule = self._lock_configuration().get("Rule", {}).get("DefaultRetention")
            if rule:
                days = int(rule.get("Days") or 0) + 365 * int(rule.get("Years") or 0)
                self._retention.append(Retention(str(rule.get("Mode", "")).upper(), days * DAY))
            else:
                self._retention.append(None)
        return self._retention[0]

    def _lock_configuration(self) -> dict:
        """The bucket's ObjectLockConfiguration; ``{}`` without one, without the permission to
        read it, or from a server without the API (any refusal but an outage)."""
        try:
            with self._errors("read the Object Lock configuration of", accept=_NO_LOCK_CONFIG + ("AccessDenied",)):
                return self._client.get_object_lock_configuration(Bucket=self.bucket).get(
                    "ObjectLockConfiguration", {})
        except _Refused as refused:
            log.debug("no Object Lock configuration readable for bucket %r (%s)", self.bucket, refused.code)
            return {}
        except (RetryableStorageError, StorageUnreachable):
            raise
        except StorageError as exc:  # e.g. NotImplemented, MethodNotAllowed, InvalidArgument
            log.debug("no Object Lock configuration for bucket %r: %s", self.bucket, exc)
            return {}

    def configure_retention(self, days: int, mode: str) -> None:
        """Set the bucket's default retention (``repo create --object-lock-days``). The bucket
        must have been created with Object Lock."""
        if mode not in LOCK_MODES or not 1 <= days <= 36500:
            raise ValueError(f"invalid Object Lock retention {mode} {days} days")
        if self._lock_configuration().get("ObjectLockEnabled") != "Enabled":
            # never turned on here: on AWS that is for good, and for the whole bucket
            raise StorageError(
                f"bucket {self.bucket!r} has no Object Lock: create the bucket with it (aws s3api "
                "create-bucket --object-lock-enabled-for-bucket ...) or turn it on yourself, knowing that "
                "it cannot be turned off")
        self._retention.clear()
        current = self.retention()
        if current is not None and current != Retention(mode, days * DAY):
            raise StorageError(
                f"bucket {self.bucket!r} already locks every object for {current.seconds / DAY:.0f} days "
                f"({current.mode}); create the repository with those settings or in another bucket")
        config = {"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}}}
        with self._errors("set the Object Lock configuration of"):
            self._client.put_object_lock_configuration(Bucket=self.bucket, ObjectLockConfiguration=config)
        self._retention[:] = [Retention(mode, days * DAY)]

    def extend_retention(self, name, until) -> None:
        import datetime

        retention = self.retention()
        if retention is None:
            super().extend_retention(name, until)
        key = self._key(name)
        date = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
        try:
            with self._errors("extend the retention of", name, accept=("AccessDenied", "InvalidRequest")):
                self._client.put_object_retention(Bucket=self.bucket, Key=key,
                                                  Retention={"Mode": retention.mode, "RetainUntilDate": date})
        except _Refused as refused:  # S3 refuses to shorten: fine if it is already locked as long
            with self._errors("extend the retention of", name):
                current = self._client.head_object(Bucket=self.bucket, Key=key).get("ObjectLockRetainUntilDate")
            if current is None or current.timestamp() < until:
                raise StorageError(
                    f"cannot extend the Object Lock retention of {name!r} in {self.describe()} "
                    f"({refused.code}): the maintenance credentials need s3:PutObjectRetention") from None

    # ---- reads

    def get(self, name, offset=0, length=-1) -> bytes:
        key = self._key(name)
        check_range(offset, length)
        if length == 0:
            self.stat(name)  # still raise BlobNotFound for a missing blob
            return b""
        extra = {}
        if offset or length > 0:
            extra["Range"] = f"bytes={offset}-{offset + length - 1 if length > 0 else ''}"
        try:
            with self._errors("get", name, accept=("InvalidRange",)):
                response = self._client.get_object(Bucket=self.bucket, Key=key, **extra)
                data = response["Body"].read()
        except _Refused:  # the range starts at or past the end
            return b""
        expected = response.get("ContentLength")
        if expected is None and "chunked" in _header(response, "transfer-encoding"):
            expected = len(data)  # chunked framing has its own end: a cut raised above
        if expected != len(data):
            raise self._incomplete("get", name, f"{len(data)} bytes, Content-Length {expected}")
        return data

    def stat(self, name) -> BlobMeta:
        """Length and time from a GET of the blob's first byte, not a HEAD: that byte arrives only
        after the whole header block, so a reply cut inside a header (a length of "30" for "3000")
        cannot pass for a complete one, as a HEAD's can. An empty blob has no first byte; it is
        read with HEAD, whose length "0" no cut can turn into another number, and whose date,
        cut anywhere before its final "GMT", parses without a time zone and is refused."""
        key = self._key(name)
        try:
            with self._errors("stat", name, accept=("InvalidRange",)):
                response = self._client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
                first = response["Body"].read()
        except _Refused:
            with self._errors("stat", name):
                response = self._client.head_object(Bucket=self.bucket, Key=key)
            first = b""
        length, modified = _total_length(response), response.get("LastModified")
        wanted = min(1, length or 0) if response.get("ContentRange") else length  # or the server sent it all
        if length is None or modified is None or modified.tzinfo is None or len(first) != wanted:
            raise self._incomplete("stat", name, "no complete length and time")
        return BlobMeta(name, length, modified.timestamp())

    def list(self, prefix="") -> Iterator[BlobMeta]:
        validate_prefix(prefix)
        with self._errors("list"):
            for page in self._pages("list_objects_v2", "list", self.prefix + prefix):
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(self.prefix):]
                    if _is_blob_name(name):  # skip objects not written by a blob storage
                        yield BlobMeta(name, obj["Size"], obj["LastModified"].timestamp())

    def _pages(self, operation: str, what: str, key_prefix: str) -> Iterator[dict]:
        """The pages of the listing ``operation`` of keys under ``key_prefix`` (``what`` names it
        in errors)."""
        paginator = self._client.get_paginator(operation)
        # Delimiter keeps the listing out of "sub-directories" (e.g. another repository's prefix)
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix, Delimiter="/"):
            if "IsTruncated" not in page:  # an empty or cut-off reply parses as a page of nothing
                raise self._incomplete(what, None, "a page without IsTruncated")
            yield page

    # ---- leftovers

    def reclaim_leftovers(self, now: float, older_than: float) -> dict[str, int]:
        """Abort the multipart uploads of blob names under the prefix that were initiated (S3's
        clock) before ``now - older_than``; return ``{"multipart_uploads": n}``.

        A put whose process died between starting and completing or aborting a multipart upload
        leaves it: invisible to listings, but its parts are stored and billed until aborted. A
        put still uploading when its upload is aborted fails (``older_than`` must exceed the
        longest put); one that completed meanwhile is kept, as is an upload another reclaim
        aborted first (neither is counted).
        """
        cutoff = now - older_than
        aborted = 0
        with self._errors("reclaim leftovers of"):
            for page in self._pages("list_multipart_uploads", "reclaim leftovers of", self.prefix):
                for upload in page.get("Uploads", ()):
                    key = upload["Key"]
                    # the prefix match is checked again: some servers ignore Prefix and Delimiter
                    if (key.startswith(self.prefix) and _is_blob_name(key[len(self.prefix):])
                            and upload["Initiated"].timestamp() < cutoff):
                        aborted += self._abort_upload(key, upload["UploadId"])
        return {"multipart_uploads": aborted}

    def _abort_upload(self, key: str, upload_id: str) -> int:
        """Abort one upload; 1 if this call did, 0 if it was completed or aborted already."""
        try:
            # a reply without a body says only its status: 404 here is the same NoSuchUpload
            with self._errors("abort an upload of", key[len(self.prefix):], accept=("NoSuchUpload", "404")):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except _Refused:
            return 0
        return 1

    # ---- misc

    def after_fork(self) -> None:
        """A client of its own: the parent's connection pool's sockets must not carry two
        processes' requests (botocore clients are not fork-safe)."""
        global _session, _session_lock
        _session, _session_lock = None, threading.Lock()
        self._client = _make_client(*self._client_args)

    def close(self) -> None:
        self._client.close()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} ({self.endpoint})"

    def _incomplete(self, op: str, name: str | None, detail: str) -> RetryableStorageError:
        what = f"{op} {name!r} in {self.describe()}" if name else f"{op} {self.describe()}"
        return RetryableStorageError(f"S3 {what}: incomplete reply from {self.endpoint} ({detail}); "
                                     "the connection was probably cut")

    @contextlib.contextmanager
    def _errors(self, op: str, name: str | None = None, accept: tuple[str, ...] = ()):
        """Translate botocore errors raised inside the block into kdist's typed errors."""
        try:
            yield
        except _Refused:
            raise
        except Exception as exc:
            if accept and _error_code(exc) in accept:
                response = getattr(exc, "response", None)
                message = response.get("Error", {}).get("Message", "") if isinstance(response, dict) else ""
                raise _Refused(_error_code(exc), str(message)) from exc
            error = self._translate(exc, op, name)
            if error is None:
                raise
            raise error from exc
        self._reached = True

    def _translate(self, exc: Exception, op: str, name: str | None) -> StorageError | None:
        from http.client import HTTPException

        from botocore import exceptions as bex
        from botocore.parsers import ResponseParserError
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(exc, StorageError):  # raised by this module inside the block: already typed
            return None
        what = f"{op} {name!r} in {self.describe()}" if name else f"{op} {self.describe()}"
        if isinstance(exc, bex.ClientError):
            code = _error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = exc.response.get("Error", {}).get("Message", "")
            if code in _NOT_FOUND and name is not None:
                return BlobNotFound(name)
            if code == "NoSuchBucket":
                return StorageUnreachable(f"bucket {self.bucket!r} does not exist at {self.endpoint}")
            if code in _CREDENTIALS or status == 403:
                # the server's message may quote the access key id: leave it out
                return StorageUnreachable(
                    f"access denied ({code}) to {self.describe()}: check the AWS credentials "
                    "(environment, ~/.aws, instance role) and the bucket policy")
            if code in _TRANSIENT or status in _TRANSIENT_STATUS:
                return RetryableStorageError(f"S3 {what} failed temporarily ({code}): {message}")
            return StorageError(f"S3 {what} failed ({code}): {message}")
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)):
            return StorageUnreachable(f"no usable AWS credentials for {self.describe()}: {exc}")
        if isinstance(exc, bex.ConnectionError):  # never reached the server: refused, DNS, TLS, timeout
            if not self._reached:
                return StorageUnreachable(f"cannot connect to S3 endpoint {self.endpoint}: {exc}")
            waited = self._client_args[3] * self._client_args[2] if isinstance(exc, bex.ConnectTimeoutError) else 0
            return RetryableStorageError(f"S3 {what}: connection to {self.endpoint} failed: {exc}", stalled=waited)
        if isinstance(exc, (bex.HTTPClientError, bex.IncompleteReadError)):  # dropped mid-request
            # botocore's tries (max_attempts) each waited read_timeout, at most
            waited = self._client_args[4] * self._client_args[2] if isinstance(exc, bex.ReadTimeoutError) else 0
            return RetryableStorageError(f"S3 {what}: connection to {self.endpoint} broke: {exc}", stalled=waited)
        if isinstance(exc, bex.BotoCoreError):
            return StorageError(f"S3 {what} failed: {exc}")
        if isinstance(exc, (ResponseParserError, ValueError)):  # e.g. a date header cut in transit
            return RetryableStorageError(f"S3 {what}: unreadable reply from {self.endpoint}: {exc}")
        if isinstance(exc, (Urllib3Error, HTTPException)):  # an error reply's body cut: botocore lets it through
            return RetryableStorageError(f"S3 {what}: connection to {self.endpoint} broke: {exc}")
        return None


def _as_bytes(data) -> bytes:
    return data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()


def _total_length(response: dict) -> int | None:
    """The blob's length from a ranged GET (``Content-Range: bytes 0-0/LENGTH``), or from a reply
    about the whole blob (a HEAD, or a server that ignored the range)."""
    content_range = response.get("ContentRange")
    if content_range:
        total = content_range.rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return response.get("ContentLength")


def _header(response: dict, name: str) -> str:
    return str(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(name, "")).lower()


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return _CODE_OF_STATUS.get(code, code)


def _is_blob_name(name: str) -> bool:
    try:
        validate_name(name)
        return True
    except StorageError:
        return False


_session_lock = threading.Lock()
# One boto3 session per process: a new one reloads the service model (~0.1 s). It resolves the
# credentials once; role and SSO credentials refresh themselves.
_session = None


def _make_client(endpoint_url, region_name, max_attempts, connect_timeout, read_timeout):
    global _session
    import boto3
    from botocore.config import Config

    options = {}
    if endpoint_url:
        # S3-compatible servers: path-style URLs work everywhere, and many servers reject the
        # CRC checksums botocore now adds by default. Blob contents are authenticated by kdist.
        options = {"s3": {"addressing_style": "path"},
                   "request_checksum_calculation": "when_required",
                   "response_checksum_validation": "when_required"}
    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                    connect_timeout=connect_timeout, read_timeout=read_timeout, **options)
    try:
        with _session_lock:  # sessions are not thread-safe; the clients they make are
            _session = _session or boto3.session.Session()
            return _session.client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)
    except ValueError as exc:  # e.g. a malformed endpoint URL
        raise StorageUnreachable(f"cannot use S3 endpoint {endpoint_url!r}: {exc}") from exc
