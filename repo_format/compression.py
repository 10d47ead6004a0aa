"""Content compression: zstd, kept uncompressed when compression does not shrink the content.

zstd compressor objects are not thread-safe, so each thread keeps its own (one per level).
Decompression is bounded by the original length recorded in the index, so a hostile blob cannot
make a reader allocate more than that.
"""

from __future__ import annotations

import threading

import zstandard

from repo_format import constants as C
from repo_format.errors import CorruptionError

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def compress(data, level: int) -> tuple[int, bytes | memoryview]:
    """Return ``(compression, payload)``; ``COMPRESSION_NONE`` with the data when zstd does not help."""
    if level <= 0 or len(data) < 64:
        return C.COMPRESSION_NONE, data
    out = _compressor(level).compress(data)
    if len(out) >= len(data):
        return C.COMPRESSION_NONE, data
    return C.COMPRESSION_ZSTD, out


def decompress(compression: int, payload, original_length: int) -> bytes:
    if compression == C.COMPRESSION_NONE:
        if len(payload) != original_length:
            raise CorruptionError("stored content has the wrong length")
        return bytes(payload)
    if compression == C.COMPRESSION_ZSTD:
        try:
            # The frame header's own size wins over max_output_size: check it before allocating.
            declared = zstandard.frame_content_size(payload)
            if declared not in (original_length, -1):
                raise CorruptionError("compressed content declares the wrong length")
            out = _decompressor().decompress(payload, max_output_size=original_length)
        except zstandard.ZstdError as exc:
            raise CorruptionError(f"content failed to decompress: {exc}") from None
        if len(out) != original_length:
            raise CorruptionError("content decompressed to the wrong length")
        return out
    raise CorruptionError(f"unknown compression {compression}")
