"""Objects: byte streams of any size, split by a content-defined chunker into contents.

An object id is the hex content id of its only chunk, or ``I`` + the hex id of an *indirect*
content: a metadata content listing the object's chunks ``[(id, length), ...]`` (msgpack), where
an id of None is a *hole*: that many zero bytes, not stored (a sparse file's). The
chunker is FastCDC 2020 (pyfastcdc, compiled, releases the GIL) with a gear table seeded from the
repository's secret, so chunk boundaries do not reveal plaintext to someone without the key.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
import threading
from typing import TYPE_CHECKING, BinaryIO

import msgpack

from repo_format import constants as C
from repo_format.content import ContentStore
from repo_format.errors import CorruptionError, KdistError, is_outage

if TYPE_CHECKING:
    import pyfastcdc

_READ_BLOCK = 8 * 1024 * 1024


class Splitter:
    """Content-defined chunking with one FastCDC object and one read buffer per thread.

    ``split`` reads into a reused buffer and cuts it with ``cut_buf``: pyfastcdc's ``cut_stream``
    allocates a fresh buffer per stream (about 0.5 ms, the whole cost of backing up a 1 KiB file)
    and cuts at less than half the speed. A cut point depends only on the bytes from the chunk's
    start, so cutting a buffer and carrying its unfinished last chunk into the next one gives the
    same chunks as cutting the whole stream at once.
    """

    def __init__(self, avg: int, minimum: int, maximum: int, seed: int):
        self._args = (avg, minimum, maximum, seed)
        self.min_size = minimum  # no cut comes earlier: data this long or shorter is one chunk
        self.max_size = maximum
        self._max = maximum
        self._local = threading.local()

    def _cdc(self) -> pyfastcdc.FastCDC:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            import pyfastcdc  # only writers chunk: reading commands do not load it (start-up time)

            avg, mn, mx, seed = self._args
            cdc = self._local.cdc = pyfastcdc.FastCDC(avg, min_size=mn, max_size=mx, seed=seed)
        return cdc

    def _buffer(self) -> bytearray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(max(_READ_BLOCK, 2 * self._max))
        return buf

    def split(self, stream: BinaryIO):
        """Yield memoryviews of consecutive chunks; each is valid until the next is yielded (and
        only while no other ``split`` runs in the same thread: they share its buffer)."""
        cdc, buf = self._cdc(), self._buffer()
        view = memoryview(buf)
        filled, eof = 0, False
        while not eof:
            while filled < len(buf):  # fill the buffer, or reach the end of the stream
                n = stream.readinto(view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            if not filled:
                break
            start = 0
            for chunk in cdc.cut_buf(view[:filled]):
                if not eof and chunk.offset + chunk.length == filled:
                    break  # the last cut of a full buffer may move once more data is seen
                yield chunk.data
                start = chunk.offset + chunk.length
            view[:filled - start] = view[start:filled]  # carry the unfinished chunk over
            filled -= start
        view.release()


def parse_object_id(oid: str, ref_size: int | None = None) -> tuple[bool, bytes]:
    """Return ``(indirect, reference)``: the reference of the object's content (its chunk list's,
    for an indirect object), whose first ``CONTENT_ID_SIZE`` bytes are the content id (format 3
    adds the seed, ``repo_format.records``). ``CorruptionError`` for a malformed id, or for one
    whose reference is not ``ref_size`` bytes (the repository's: every reader of an object
    passes it, so that none takes an id another refuses)."""
    if type(oid) is not str:
        raise CorruptionError(f"malformed object id of type {type(oid).__name__}")
    indirect = oid.startswith(C.INDIRECT_OBJECT_PREFIX)
    hexpart = oid[1:] if indirect else oid
    try:
        cid = bytes.fromhex(hexpart)
    except ValueError:
        raise CorruptionError(f"malformed object id {oid[:80]!r}") from None
    if len(cid) not in C.REFERENCE_SIZES or ref_size is not None and len(cid) != ref_size:
        raise CorruptionError(f"malformed object id {oid[:80]!r}")
    return indirect, cid


def sparse_extents(fd: int, size: int) -> list[tuple[int, int, bool]] | None:
    """A file's first ``size`` bytes as ``(offset, length, data)`` runs of data and holes, from
    SEEK_DATA/SEEK_HOLE; None when it has no hole there, or its file system cannot say. Moves
    the descriptor's offset: callers read by offset (``pread``), or seek back."""
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nothing but a hole from here on
                    raise
                data = size
            if data > pos:
                runs.append((pos, data - pos, False))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            runs.append((data, hole - data, True))
            pos = hole
    except (OSError, AttributeError):  # no SEEK_DATA on this system or file system
        return None
    return runs if any(not is_data for _o, _n, is_data in runs) else None


class _Range(io.RawIOBase):
    """``length`` bytes from ``offset`` of something read by position: ``read_at(view, pos)``
    fills ``view`` from ``pos`` and returns how many bytes it gave."""

    def __init__(self, read_at, offset: int, length: int):
        super().__init__()
        self._read_at, self._pos, self._end = read_at, offset, offset + length

    @classmethod
    def of_file(cls, fd: int, offset: int, length: int) -> "_Range":
        """Of a file, with ``preadv``: the descriptor's own offset is neither used nor moved."""
        return cls(lambda view, pos: os.preadv(fd, [view], pos), offset, length)

    @classmethod
    def of_stream(cls, stream, offset: int, length: int) -> "_Range":
        """Of a seekable stream (an ``ObjectReader``)."""
        def read_at(view, pos):
            stream.seek(pos)
            return stream.readinto(view)
        return cls(read_at, offset, length)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self._end - self._pos)
        if want <= 0:
            return 0
        with memoryview(b) as view:
            n = self._read_at(view[:want], self._pos)
        self._pos += n
        return n


class ObjectStore:
    """Objects (files, directory objects) as contents: one content, or a chunk list of them.
    ``trees``: the codec of the metadata contents it writes (directory objects, chunk lists);
    None, the repository's own. Format 3 writes a host's with its tree key (``for_host``)."""

    def __init__(self, contents: ContentStore, splitter: Splitter, trees=None):
        self.contents = contents
        self.splitter = splitter
        self.trees = trees

    def for_host(self, trees) -> "ObjectStore":
        """The same objects, writing metadata contents with ``trees`` (a host's tree codec)."""
        return ObjectStore(self.contents, self.splitter, trees)

    def write_stream(self, stream: BinaryIO, metadata: bool = False, on_chunk=None,
                     known: dict[bytes, bytes] | None = None) -> tuple[str, int]:
        """Store a stream; return ``(object id, length)``. ``on_chunk(n)`` is told each chunk's
        size; ``known``: references by seed to deduplicate against first (``known_chunks``)."""
        chunks: list[tuple[bytes, int]] = []
        for data in self.splitter.split(stream):
            chunks.append((self._write(data, metadata, known), len(data)))
            if on_chunk is not None:
                on_chunk(len(data))
        return self._finish(chunks, metadata), sum(n for _, n in chunks)

    def write_file(self, f, on_chunk=None, known: dict[bytes, bytes] | None = None) -> tuple[str, int]:
        """Store a regular file open as ``f`` (unbuffered, at its start), as every backup and
        repair stores one: with fewer blocks than bytes it may have holes, which are listed,
        never read (``sparse_extents``); else it is read as a stream. ``known``: see
        ``known_chunks``."""
        fd = f.fileno()
        st = os.fstat(fd)
        runs = sparse_extents(fd, st.st_size) if st.st_blocks * 512 < st.st_size else None
        if runs is not None:
            return self.write_sparse(fd, runs, on_chunk, known)
        os.lseek(fd, 0, os.SEEK_SET)  # (sparse_extents moved it)
        return self.write_stream(f, on_chunk=on_chunk, known=known)

    def write_sparse(self, fd: int, runs: list[tuple[int, int, bool]], on_chunk=None,
                     known: dict[bytes, bytes] | None = None) -> tuple[str, int]:
        """Store a sparse file by its ``runs`` (``sparse_extents``): each run of data is cut
        and stored as a stream of its own; a hole is listed, never read or hashed."""
        return self._write_runs(lambda offset, length: _Range.of_file(fd, offset, length), runs, on_chunk, known)

    def known_chunks(self, oid: str) -> dict[bytes, bytes] | None:
        """Format 3: the references of object ``oid``'s chunks by their seeds, for writing a new
        version of its file (``write_file(known=...)``: an unchanged chunk is then deduplicated
        by its seed, not sealed); None in formats 1 and 2 (their ids cost a hash already), or if
        the object's chunk list cannot be read."""
        if self.contents.records.ref_size == C.CONTENT_ID_SIZE:
            return None
        try:
            return {c[C.CONTENT_ID_SIZE:]: c for c, _n in self.chunks(oid) if c is not None}
        except KdistError as exc:
            if is_outage(exc):
                raise
            return None

    def copy_from(self, source: "ObjectStore", oid: str, on_chunk=None) -> tuple[str, int]:
        """Store object ``oid`` of another repository here: its bytes read (each content
        authenticated by the source) and cut by this repository's chunker, as a backup of the
        same file here would cut them; its holes listed as holes."""
        chunks = source.chunks(oid)
        with source.open(oid) as reader:
            if all(c is not None for c, _n in chunks):
                return self.write_stream(reader, on_chunk=on_chunk)
            runs: list[tuple[int, int, bool]] = []
            pos = 0
            for c, n in chunks:
                if runs and runs[-1][2] and c is not None:  # data after data: one run
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, True)
                else:
                    runs.append((pos, n, c is not None))
                pos += n
            return self._write_runs(lambda offset, length: _Range.of_stream(reader, offset, length), runs, on_chunk)

    def _write_runs(self, open_run, runs: list[tuple[int, int, bool]], on_chunk,
                    known: dict[bytes, bytes] | None = None) -> tuple[str, int]:
        chunks: list[tuple[bytes | None, int]] = []
        for offset, length, is_data in runs:
            if not is_data:
                chunks.append((None, length))
                continue
            for data in self.splitter.split(open_run(offset, length)):
                chunks.append((self._write(data, False, known), len(data)))
                if on_chunk is not None:
                    on_chunk(len(data))
        return self._finish(chunks, False), sum(n for _, n in chunks)

    def _write(self, data, metadata: bool, known=None) -> bytes:
        return self.contents.write(data, metadata=metadata, known=known, records=self.trees if metadata else None)

    def write_bytes(self, data: bytes, metadata: bool = False) -> str:
        if len(data) <= self.splitter.min_size:  # one chunk, uncut: no need to run the chunker
            return self._write(data, metadata).hex()
        return self.write_stream(io.BytesIO(data), metadata)[0]

    def _finish(self, chunks: list[tuple[bytes | None, int]], metadata: bool) -> str:
        if not chunks:
            return self._write(b"", metadata).hex()
        if len(chunks) == 1 and chunks[0][0] is not None:
            return chunks[0][0].hex()
        holes = any(c is None for c, _n in chunks)
        listing = msgpack.packb({"v": C.OBJECT_LIST_VERSION_HOLES if holes else C.OBJECT_LIST_VERSION,
                                 "chunks": [[c, n] for c, n in chunks]})
        return C.INDIRECT_OBJECT_PREFIX + self._write(listing, True).hex()

    def same_content(self, oid: str, fd: int) -> bool:
        """Whether the file open at ``fd`` holds exactly object ``oid``'s bytes: read piece by
        piece along the object's chunk list and hashed, so nothing is downloaded (but an
        indirect object's list). A hole of the object must read as zeros (a hole in the file is
        skipped, not read). Stops at the first piece that differs."""
        pos = 0
        size = os.fstat(fd).st_size
        for cid, n in self.chunks(oid):
            if n < 0:  # a content the index does not hold: nothing to compare with
                return False
            if pos + n > size or (cid is not None and n > self.splitter.max_size):
                return False  # (a length no chunk of this file can have: never read into memory)
            if cid is None:
                if not _zeros(fd, pos, n):
                    return False
            else:
                data = _pread_all(fd, n, pos)
                if len(data) != n or not self.contents.matches(cid, data):
                    return False
            pos += n
        return os.pread(fd, 1, pos) == b""

    def parse(self, oid: str) -> tuple[bool, bytes]:
        """``parse_object_id`` for this repository's references."""
        return parse_object_id(oid, self.contents.records.ref_size)

    def chunks(self, oid: str) -> list[tuple[bytes | None, int]]:
        """The object's chunk list ``[(reference, length)]`` (a reference starts with its content
        id); a reference of None is a hole of that many zero bytes."""
        indirect, cid = self.parse(oid)
        size = self.contents.records.ref_size
        if not indirect:
            entry = self.contents.lookup(cid)
            length = entry.original_length if entry is not None else -1
            return [(cid, length)]
        try:
            listing = msgpack.unpackb(self.contents.read(cid), raw=False)
            version = listing["v"]
            if version not in (C.OBJECT_LIST_VERSION, C.OBJECT_LIST_VERSION_HOLES):
                raise CorruptionError(f"object {oid} has unknown list version {version}")
            chunks = [(c, n) for c, n in listing["chunks"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(f"object {oid} has a malformed chunk list") from exc
        # exact types: bytes(n) of a hostile integer would allocate n bytes, int() of inf raises;
        # a hole (version 2 only) is at least one byte long
        holes = version == C.OBJECT_LIST_VERSION_HOLES
        if not all((type(c) is bytes and len(c) == size or holes and c is None and n)
                   and type(n) is int and 0 <= n < 2**63 for c, n in chunks):
            raise CorruptionError(f"object {oid} has a malformed chunk list")
        return chunks

    def open(self, oid: str) -> "ObjectReader":
        return ObjectReader(self, oid)

    def read_all(self, oid: str, holes: bool = True) -> bytes:
        """The object's bytes. ``holes`` False: a metadata object, which never has holes (a
        listed hole of a terabyte would be read into memory): one is corruption."""
        if not holes and any(c is None for c, _n in self.chunks(oid)):
            raise CorruptionError(f"object {oid} has holes, which a metadata object never has")
        with self.open(oid) as r:
            return r.read()


def _pread_all(fd: int, n: int, pos: int) -> bytes:
    """``n`` bytes from ``pos`` (fewer only at the end of the file)."""
    data = os.pread(fd, n, pos)
    while 0 < len(data) < n:
        more = os.pread(fd, n - len(data), pos + len(data))
        if not more:
            break
        data += more
    return data


def _zeros(fd: int, pos: int, n: int) -> bool:
    """Whether the file's bytes ``pos .. pos + n`` exist and are all zero: its holes there are
    skipped (SEEK_DATA), only its data is read."""
    end = pos + n
    if os.fstat(fd).st_size < end:
        return False
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole to the end of the file
                return True
            if exc.errno != errno.EINVAL:  # EINVAL: no SEEK_DATA here; read it all
                raise
        if pos >= end:
            return True
        data = os.pread(fd, min(end - pos, _READ_BLOCK), pos)
        if not data or data.count(0) != len(data):
            return False
        pos += len(data)
    return True


class ObjectReader(io.RawIOBase):
    """A seekable reader over an object; every chunk is authenticated as it is read."""

    def __init__(self, store: ObjectStore, oid: str):
        super().__init__()
        self._store = store
        self._chunks = store.chunks(oid)
        self._starts = []
        pos = 0
        for _, n in self._chunks:
            self._starts.append(pos)
            pos += max(n, 0)
        self.length = pos if all(n >= 0 for _, n in self._chunks) else None
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size() + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _size(self) -> int:
        if self.length is None:  # a single chunk not in the index: reading it raises the error
            self._chunk(0)
            self.length = len(self._cached[1])
        return self.length

    def _chunk(self, i: int) -> bytes:
        if self._cached is None or self._cached[0] != i:
            cid, n = self._chunks[i]
            if cid is None:  # a hole: its zeros are made as they are read (readinto)
                raise AssertionError("a hole is not read")
            data = self._store.contents.read(cid)
            if n >= 0 and len(data) != n:
                raise CorruptionError(f"chunk {cid.hex()} has length {len(data)}, expected {n}")
            self._cached = (i, data)
        return self._cached[1]

    def readinto(self, b) -> int:
        size = self._size()
        if self._pos >= size:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        start = self._pos - self._starts[i]
        if self._chunks[i][0] is None:  # a hole: at most the caller's buffer of zeros, whatever its length
            n = min(len(b), self._chunks[i][1] - start)
            b[:n] = bytes(n)
            self._pos += n
            return n
        data = self._chunk(i)
        n = min(len(b), len(data) - start)
        b[:n] = data[start:start + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes (fewer only at the end of the object), or to the end for ``-1``.

        ``readinto`` stops at a chunk boundary; ``read`` goes on, so callers get what they asked
        for, as from a regular file.
        """
        if size is None or size < 0:
            size = None
        out = bytearray()
        while size is None or len(out) < size:
            piece = super().read(_READ_BLOCK if size is None else size - len(out))
            if not piece:
                break
            out += piece
        return bytes(out)
