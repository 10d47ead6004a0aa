"""A repository: a storage, its opened format blob, and the content and object stores on it.

The one entry point for everything above ``repo_format``: ``Repository.create`` and
``Repository.open``. ``close()`` flushes what was written.
"""

from __future__ import annotations

import secrets

from repo_format import constants as C
from repo_format import format_blob
from repo_format.content import ContentStore, start_signed_epochs
from repo_format.crypto import KdfParams
from repo_format.format_blob import FormatBlob, RepositoryParameters
from repo_format.index import MergedIndex
from repo_format.keyslots import ADMIN, ROOT_KEY_ID, Identity, PermissionRefused
from repo_format.local_cache import CacheSettings, LocalCache
from repo_format.manifest import ManifestStore
from repo_format.objects import ObjectStore, Splitter
from repo_format.storage.base import BlobStorage


LEGACY_ADMIN = Identity(ADMIN, ROOT_KEY_ID, b"", b"")  # the one password of a version-1 repository


def new_session_id() -> str:
    return secrets.token_hex(C.SESSION_ID_BYTES)


class Repository:
    def __init__(self, storage: BlobStorage, fmt: FormatBlob, session: str | None = None,
                 heartbeat_thread: bool = True, cache: CacheSettings | None = None,
                 committed: MergedIndex | None = None):
        """``cache``: where this repository's local cache lives (``CacheSettings``); None, the
        default for library use, runs without one (the CLI and the Ray workers pass one).
        ``committed``: an index the caller assembles itself instead of the one loaded on first
        use (check and repair read past damaged index blobs, where a load stops)."""
        self.storage = storage
        self.format = fmt
        self.session = session or new_session_id()
        self.cache_settings = cache
        self.cache = LocalCache.for_repository(fmt, cache) if cache is not None else None
        self.contents = ContentStore(storage, fmt, self.session, committed=committed,
                                     heartbeat_thread=heartbeat_thread, cache=self.cache)
        self.manifests = ManifestStore(storage, fmt.keys.manifest_aead(), self.session, self.cache,
                                       identity=fmt.identity, unique_id=fmt.unique_id,
                                       payload_keys=fmt.payload_keys)
        p = fmt.parameters
        self.objects = ObjectStore(
            self.contents, Splitter(p.chunk_avg, p.chunk_min, p.chunk_max, fmt.keys.chunker_seed())
        )

    @classmethod
    def create(cls, storage: BlobStorage, password: str, parameters: RepositoryParameters | None = None,
               kdf: KdfParams | None = None, version: int = C.FORMAT_VERSION) -> "Repository":
        fmt = format_blob.create(storage, password, parameters, kdf, version)
        start_signed_epochs(storage, fmt)
        return cls(storage, fmt)

    @classmethod
    def open(cls, storage: BlobStorage, password: str, key_id: str | None = None, **kwargs) -> "Repository":
        """Open with the admin's password or a key slot's (``key_id`` names the slot)."""
        return cls(storage, format_blob.read(storage, password, key_id), **kwargs)

    def objects_for(self, host: str) -> ObjectStore:
        """The object store a backup of ``host`` writes through: in format 3 its directory
        objects and chunk lists converge under the host's tree key (SPEC.md section 4a), which
        admins derive and a host key holds for its own host only."""
        keys = self.format.payload_keys
        if keys is None:
            return self.objects
        # (a registry read within the last minute: a sharded backup's many parts list once)
        generation = self.manifests.host_generation(host, max_age=60.0) if keys.master_key is not None else 0
        key = keys.tree_key(host, generation)
        if key is None:
            raise PermissionRefused(f"this {self.identity.role} key cannot write the trees of host {host!r}")
        return self.objects.for_host(self.contents.records.for_trees(key))

    @property
    def parameters(self) -> RepositoryParameters:
        return self.format.parameters

    @property
    def identity(self) -> Identity:
        """Who this client is: its role and key; a version-1 repository's one password is admin."""
        return self.format.identity or LEGACY_ADMIN

    @property
    def skip_unreadable(self) -> bool:
        """Whether this client passes over a manifest blob or raw index blob it cannot read
        (listing, restoring, backing up) instead of stopping (maintenance, check, repair):
        ``ManifestStore.skip_unreadable`` and ``EpochManager.skip_unreadable``, set together."""
        return self.manifests.skip_unreadable

    @skip_unreadable.setter
    def skip_unreadable(self, on: bool) -> None:
        self.manifests.skip_unreadable = self.contents.epochs.skip_unreadable = on

    def require(self, *roles: str, what: str) -> None:
        """Refuse (``PermissionRefused``) unless this client's key has one of ``roles``."""
        self.identity.require(*roles, what=what)

    def flush(self) -> str | None:
        return self.contents.flush()

    def close(self) -> None:
        """Flush what was written and retire this client's session marker; keep the local cache
        within its limit."""
        try:
            self.contents.close()
        finally:
            self.trim_cache()

    def trim_cache(self) -> None:
        if self.cache is not None:
            names = self.contents.epochs.loaded_names()
            self.cache.enforce_limit(names)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
