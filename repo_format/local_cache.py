"""The local cache of one repository: copies that save storage requests, never a source of truth.

``<base>/<repository id>/`` (``base`` is ``--cache-dir``, ``KDIST_CACHE_DIR``, or
``$XDG_CACHE_HOME/kdist`` / ``~/.cache/kdist``) holds:

- ``index/<blob name>``: the decrypted, validated plaintext of an index blob, followed by the
  sorted 64-bit keys of its ids, under a BLAKE3-keyed MAC (a key derived from the master key)
  that binds the blob's name. A process memory-maps these files and searches them in place, so
  its resident memory does not grow with the index; the pages are page cache.
- ``contents/<id>``: sealed metadata contents (directory objects, object lists) exactly as
  stored in their pack; the content's own AEAD and id check authenticate them when read.
- ``blobs/<name>``: small immutable blobs (manifests, epoch markers) exactly as stored; their
  AEAD, whose associated data is the blob's name, authenticates them when read.

Rules (SPEC.md, "The local cache"): every file is authenticated when a process first uses it
and discarded if it fails; files are written whole (a temporary file, then a rename), so two
processes on one host can share a cache and either may delete any file at any moment (a mapped
file stays readable after unlinking); a cache of another repository never authenticates under
this repository's key. A failure of the cache (full disk, no permission, a file deleted or
damaged) costs requests, never a run: every operation here degrades to a miss.

This module must never decide what is in the index: which blobs make up the index is decided
by listing the storage (``repo_format.epoch``); the cache only supplies their bytes.
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import secrets
import shutil
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3

from repo_format import clock
from repo_format import constants as C
from repo_format.errors import KdistError
from repo_format.index import IndexBlob, MappedPackTable

log = logging.getLogger("kdist.cache")

CACHE_DIR_ENV = "KDIST_CACHE_DIR"
NO_CACHE_ENV = "KDIST_NO_CACHE"
CACHE_LIMIT_ENV = "KDIST_CACHE_LIMIT"
DEFAULT_LIMIT = 10 * 1024**3
INDEX_DIR = "index"
CONTENTS_DIR = "contents"
BLOBS_DIR = "blobs"
VOUCHED_FILE = "vouched.sqlite"  # repo_format.vouched
# magic(4) | version u8 | reserved(3) | plaintext length u64 | entry count u64 | entries at u64 |
# pack count u64 | MAC(32)
FILE_HEADER = struct.Struct("<4sB3xQQQQ32s")
FILE_MAGIC = b"KDCI"
FILE_VERSION = 1
_MAC_AT = FILE_HEADER.size - 32
STALE_GRACE = 15 * 60  # seconds: an index file another process may still be about to open
_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
        "# This file marks a kdist cache directory (https://bford.info/cachedir/).\n")


class InvalidCacheSetting(KdistError, ValueError):
    """A cache setting (``--cache-limit`` / ``KDIST_CACHE_LIMIT``) that is not a size."""


def default_base() -> Path | None:
    """``KDIST_CACHE_DIR``, ``$XDG_CACHE_HOME/kdist`` or ``~/.cache/kdist``; None where there is
    no home directory to find (a container's user without one): then no cache."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "kdist"
    try:
        return Path.home() / ".cache" / "kdist"
    except (RuntimeError, KeyError):
        return None


_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1024**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1024**3, "GB": 1000**3, "GIB": 1024**3, "T": 1024**4, "TB": 1000**4, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """``"10GiB"``, ``"500M"``, ``"1000000"`` -> bytes."""
    raw = text.strip().upper().replace(" ", "")
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise InvalidCacheSetting(f"not a size: {text!r} (examples: 500MiB, 10GiB)") from None
    if unit not in _UNITS or not 0 <= value < 2**60:  # nan and inf too
        raise InvalidCacheSetting(f"not a size: {text!r} (examples: 500MiB, 10GiB)")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class CacheSettings:
    """Where caches live and how large one may grow; ``enabled=False`` is ``--no-cache``."""

    base: Path | None = None
    limit: int = DEFAULT_LIMIT
    enabled: bool = True

    @classmethod
    def from_environment(cls, cache_dir: str | None = None, no_cache: bool = False,
                         limit: str | None = None) -> "CacheSettings":
        no_cache = no_cache or os.environ.get(NO_CACHE_ENV, "") not in ("", "0")
        limit = limit or os.environ.get(CACHE_LIMIT_ENV)
        limit_bytes = parse_size(limit) if limit else DEFAULT_LIMIT
        if no_cache:
            return cls(None, limit_bytes, False)
        base = Path(cache_dir).expanduser() if cache_dir else default_base()
        if base is None:
            log.warning("kdist: no home directory and no KDIST_CACHE_DIR or XDG_CACHE_HOME: running without "
                        "a local cache")
        return cls(base, limit_bytes, base is not None)

    def directory(self, repository_id: bytes) -> Path:
        base = self.base or default_base()
        if base is None:
            raise InvalidCacheSetting("no cache directory: no home directory; set KDIST_CACHE_DIR")
        return base / repository_id.hex()


@dataclass
class CacheStats:
    index_hits: int = 0
    index_stored: int = 0
    content_hits: int = 0
    content_stored: int = 0
    discarded: int = 0  # files that failed authentication or were malformed
    errors: int = 0  # operations that failed on the file system (each a miss)


# a mapping without a descriptor of its own (Python 3.13); before, each holds one (kdist raises
# the open-file limit, kdist/allocator.py)
_NO_FD = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _little_endian(view: memoryview, code: str):
    """Little-endian unsigned integers read in place: a typed memoryview (numpy reads it without
    a copy), or on a big-endian machine a numpy array."""
    if sys.byteorder == "little":
        return view.cast(code)
    import numpy as np

    return np.frombuffer(view, dtype="<u8" if code == "Q" else "<u4")


def _tree_size(path: Path) -> tuple[int, int]:
    size = files = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                size += os.stat(os.path.join(root, n)).st_blocks * 512
                files += 1
            except OSError:
                pass
    return size, files


def _usage(directory: Path) -> dict:
    index, index_files = _tree_size(directory / INDEX_DIR)
    contents, content_files = _tree_size(directory / CONTENTS_DIR)
    blobs, blob_files = _tree_size(directory / BLOBS_DIR)
    vouched = 0  # repo_format.vouched: outside the limit and its total (a row per pack, and per content read back)
    for suffix in ("", "-wal", "-shm"):
        try:
            vouched += os.stat(directory / (VOUCHED_FILE + suffix)).st_blocks * 512
        except OSError:
            pass
    return {"index_bytes": index, "index_files": index_files, "contents_bytes": contents,
            "content_files": content_files, "blobs_bytes": blobs, "blob_files": blob_files,
            "vouched_bytes": vouched, "total_bytes": index + contents + blobs}


class LocalCache:
    """One repository's cache directory. Thread-safe; never raises for a file-system failure."""

    def __init__(self, directory: Path, repository_id: bytes, mac_key: bytes, limit: int = DEFAULT_LIMIT):
        self.directory = Path(directory)
        self.repository_id = repository_id
        self.limit = limit
        self._mac_key = mac_key
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._warned = False
        self._prepare()

    @classmethod
    def for_repository(cls, fmt, settings: CacheSettings) -> "LocalCache | None":
        if not settings.enabled:
            return None
        return cls(settings.directory(fmt.unique_id), fmt.unique_id, fmt.keys.local_cache_key(), settings.limit)

    # ---- files ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        try:
            self.directory.parent.parent.mkdir(parents=True, exist_ok=True)
            for d in (self.directory.parent, self.directory, self.directory / INDEX_DIR,
                      self.directory / CONTENTS_DIR, self.directory / BLOBS_DIR):  # private: it holds the index in plaintext
                d.mkdir(exist_ok=True, mode=0o700)
            tag = self.directory.parent / "CACHEDIR.TAG"
            if not tag.exists():
                tag.write_text(_TAG)
        except OSError as exc:
            self._failed("prepare", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        with self._lock:
            self.stats.errors += 1
            warn, self._warned = not self._warned, True
        if warn:  # once per process: the run goes on without what the cache would have saved
            log.warning("kdist: the local cache at %s is not usable (%s: %s); going on without it",
                        self.directory, what, exc.strerror or exc)

    def _write_file(self, path: Path, *parts) -> bool:
        """Write whole or not at all: a temporary file beside it, then a rename."""
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(6)}")
        try:
            if not path.parent.is_dir():  # the cache may have been deleted meanwhile
                self._prepare()
                path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                for p in parts:
                    f.write(p)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._failed("write", exc)
            return False

    def _discard(self, path: Path, why: str) -> None:
        log.warning("kdist: cache file %s discarded: %s", path.name, why)
        with self._lock:
            self.stats.discarded += 1
        try:
            path.unlink()
        except OSError:
            pass

    # ---- index blobs ---------------------------------------------------------------------
    def _index_path(self, name: str) -> Path:
        return self.directory / INDEX_DIR / name

    def _mac(self, name: str, header: bytes, *body) -> bytes:
        h = blake3.blake3(key=self._mac_key, max_threads=blake3.blake3.AUTO)
        raw = name.encode("ascii")
        h.update(len(raw).to_bytes(2, "big") + raw + self.repository_id + header[:_MAC_AT])
        for b in body:
            h.update(b)
        return h.digest()

    def store_index(self, name: str, blob: IndexBlob) -> IndexBlob | None:
        """Keep a decoded, validated index blob; returns it memory-mapped from the cache (so
        the caller can let go of the bytes it downloaded), or None if it could not be kept."""
        plaintext = blob._buf
        keys = blob.entry_key_bytes()
        offsets = blob.pack_name_offsets()
        pad = b"\0" * (-len(plaintext) % 8)
        header = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, len(plaintext), blob.count, blob._start,
                                  len(blob.packs), b"\0" * 32)
        mac = self._mac(name, header, plaintext, pad, keys, offsets)
        header = header[:_MAC_AT] + mac
        if not self._write_file(self._index_path(name), header, plaintext, pad, keys, offsets):
            return None
        with self._lock:
            self.stats.index_stored += 1
        return self.index_blob(name, count_hit=False, verify=False)  # just written from a checked blob

    def index_blob(self, name: str, count_hit: bool = True, verify: bool = True) -> IndexBlob | None:
        """The cached copy of an index blob, authenticated, or None (missing, damaged: fetch it)."""
        path = self._index_path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failed("open", exc)
            return None
        try:
            size = os.fstat(fd).st_size
            if size < FILE_HEADER.size:
                self._discard(path, "truncated")
                return None
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ, **_NO_FD)
        except OSError as exc:
            self._failed("map", exc)
            return None
        finally:
            os.close(fd)
        blob = self._open_mapped(name, path, mm, verify)
        if blob is not None and count_hit:
            with self._lock:
                self.stats.index_hits += 1
        return blob

    def _open_mapped(self, name: str, path: Path, mm: mmap.mmap, verify: bool = True) -> IndexBlob | None:
        view = memoryview(mm)
        magic, version, plen, count, start, npacks, mac = FILE_HEADER.unpack_from(view)
        keys_at = FILE_HEADER.size + plen + (-plen % 8)
        offsets_at = keys_at + 8 * count
        if (magic != FILE_MAGIC or version != FILE_VERSION or offsets_at + 4 * npacks != len(view)
                or start + count * C.INDEX_ENTRY.size != plen):
            self._discard(path, "not a cache file of this kdist version, or truncated")
            return None
        if verify and not hmac.compare_digest(self._mac(name, bytes(view[:FILE_HEADER.size]), view[FILE_HEADER.size:]), mac):
            self._discard(path, "failed authentication (damaged, or from another repository)")
            return None
        if verify and hasattr(mmap, "MADV_DONTNEED"):  # the MAC read every page: let them go until used
            mm.madvise(mmap.MADV_DONTNEED)
        plaintext = view[FILE_HEADER.size:FILE_HEADER.size + plen]
        packs = MappedPackTable(plaintext, _little_endian(view[offsets_at:offsets_at + 4 * npacks], "I"))
        keys = _little_endian(view[keys_at:keys_at + 8 * count], "Q")
        return IndexBlob.mapped(plaintext, start, count, packs, keys, view)

    def still_authentic(self, name: str, blob: IndexBlob) -> bool:
        """Authenticate a mapped blob's file again (a load reuses mapped blobs: their pages are
        the file's, which could have been changed in place since they were mapped). On failure
        the file is dropped; the caller fetches the blob again."""
        view = blob.source
        mac = bytes(view[_MAC_AT:FILE_HEADER.size])
        if hmac.compare_digest(self._mac(name, bytes(view[:FILE_HEADER.size]), view[FILE_HEADER.size:]), mac):
            blob.release_pages()  # (the MAC read every page)
            return True
        self._discard(self._index_path(name), "changed after it was mapped")
        return False

    def retain_index(self, names: set[str]) -> int:
        """Drop index files of blobs that are no longer part of the index (replaced by a
        compaction), once they are old enough that no other process is about to open them.
        Returns how many were dropped."""
        return self._retain(self.directory / INDEX_DIR, names)

    def _retain(self, directory: Path, names: set[str], prefix: str = "") -> int:
        dropped = 0
        cutoff = clock.system_time() - STALE_GRACE
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return 0
        for e in entries:
            if e.name in names or not e.name.startswith(prefix):  # (a temporary file this old is dead)
                continue
            try:
                if e.stat().st_mtime < cutoff:
                    os.unlink(e.path)
                    dropped += 1
            except OSError:
                pass
        return dropped

    # ---- small sealed blobs (manifests, epoch markers) -----------------------------------
    def _read_copy(self, path: Path, limit: int) -> bytes | None:
        """A cached file of at most ``limit`` bytes, or None (missing, unreadable, too long)."""
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failed("read", exc)
            return None
        if len(data) > limit:
            self._discard(path, "larger than it may be")
            return None
        return data

    def sealed_blob(self, name: str, limit: int) -> bytes | None:
        """A copy of a small immutable blob exactly as stored, or None. The caller opens it with
        the blob's AEAD (its name is the AAD) and calls ``drop_blob`` if that fails."""
        return self._read_copy(self.directory / BLOBS_DIR / name, limit)

    def store_blob(self, name: str, sealed: bytes) -> None:
        self._write_file(self.directory / BLOBS_DIR / name, sealed)

    def drop_blob(self, name: str) -> None:
        self._discard(self.directory / BLOBS_DIR / name, "failed authentication")

    def retain_blobs(self, prefix: str, names: set[str]) -> int:
        """Drop copies of blobs with this prefix that the listing no longer names (compacted)."""
        return self._retain(self.directory / BLOBS_DIR, names, prefix)

    # ---- metadata contents ---------------------------------------------------------------
    def _content_path(self, content_id: bytes) -> Path:
        h = content_id.hex()
        return self.directory / CONTENTS_DIR / h[:2] / h

    def content(self, content_id: bytes, packed_length: int) -> bytes | None:
        """A sealed content as stored in its pack, or None. Not authenticated here: the caller
        opens it with the content's AEAD and checks its id, and calls ``drop_content`` if that
        fails."""
        path = self._content_path(content_id)
        data = self._read_copy(path, packed_length)
        if data is None:
            return None
        if len(data) != packed_length:
            self._discard(path, "shorter than the index entry says")
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass  # deleted meanwhile, or a read-only cache: the copy read is as good
        with self._lock:
            self.stats.content_hits += 1
        return data

    def store_content(self, content_id: bytes, sealed: bytes) -> None:
        if self._write_file(self._content_path(content_id), sealed):
            with self._lock:
                self.stats.content_stored += 1

    def drop_content(self, content_id: bytes) -> None:
        self._discard(self._content_path(content_id), "failed authentication")

    # ---- authenticated places (repo_format.vouched) --------------------------------------
    def vouched_places(self):
        """The record of places this host authenticated, in ``vouched.sqlite`` (under this
        cache's MAC key)."""
        from repo_format.vouched import VouchedPlaces

        return VouchedPlaces(self.directory / VOUCHED_FILE, self._mac_key, self.repository_id)

    # ---- size ----------------------------------------------------------------------------
    def usage(self) -> dict:
        return {**_usage(self.directory), "limit_bytes": self.limit}

    def enforce_limit(self, needed: set[str] = frozenset()) -> int:
        """Evict until the cache fits its limit: least recently used contents first, then index
        files the current index does not use, then (the limit is below the index's size: every
        run will download it) the oldest of the rest. Returns the bytes freed."""
        files = []
        for sub in (CONTENTS_DIR, BLOBS_DIR, INDEX_DIR):
            for root, _dirs, names in os.walk(self.directory / sub):
                for n in names:
                    p = os.path.join(root, n)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    rank = 0 if sub != INDEX_DIR else (1 if n not in needed else 2)
                    files.append((rank, st.st_mtime, st.st_blocks * 512, p))
        total = sum(f[2] for f in files)
        freed = 0
        warned = False
        for rank, _mtime, size, path in sorted(files):
            if total - freed <= self.limit:
                break
            if rank == 2 and not warned:
                warned = True
                log.warning("kdist: the cache limit (%d bytes) is below the size of the index; "
                            "raise it (--cache-limit) or every run downloads the index again", self.limit)
            try:
                os.unlink(path)
                freed += size
            except OSError:
                pass
        return freed

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def list_caches(base: Path) -> list[dict]:
    """Every repository cache under ``base``: its id, size and when it was last written."""
    out = []
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries:
        if not e.is_dir() or len(e.name) != 32 or any(c not in "0123456789abcdef" for c in e.name):
            continue
        path = Path(e.path)
        u = _usage(path)
        try:
            newest = max((os.stat(r).st_mtime for r, _d, _n in os.walk(path)), default=0.0)
        except OSError:
            newest = 0.0
        out.append({"repository_id": e.name, "path": str(path), "index_bytes": u["index_bytes"],
                    "index_files": u["index_files"],  # every sealed copy together: directories, manifests
                    "contents_bytes": u["contents_bytes"] + u["blobs_bytes"],
                    "content_files": u["content_files"] + u["blob_files"],
                    "vouched_bytes": u["vouched_bytes"],  # outside the limit: repo_format.vouched
                    "total_bytes": u["total_bytes"], "last_written": newest})
    return out
