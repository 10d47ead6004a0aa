"""Rebuild index entries from packs alone (``kdist index rebuild``, ``repo repair``).

Every pack ends in its own sealed local index, so the index blobs are a cache that can be
recreated: list the packs, read each local index, and write the entries as new index blobs.
Reading is all this module does to packs; it never deletes or rewrites one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from repo_format import constants as C
from repo_format.errors import BlobNotFound, CorruptionError, UnsupportedVersion
from repo_format.format_blob import FormatBlob
from repo_format.index import IndexEntry, MergedIndex, stamp_after, wins
from repo_format.pack import read_local_index
from repo_format.storage.base import BlobStorage


@dataclass
class RebuildResult:
    entries: list[IndexEntry] = field(default_factory=list)
    packs_read: int = 0
    damaged_packs: dict[str, str] = field(default_factory=dict)  # name -> reason


def entries_from_packs(storage: BlobStorage, fmt: FormatBlob, workers: int = 8,
                       names: Iterable[str] | None = None) -> RebuildResult:
    """Every entry of every pack's local index (of the named packs only, if ``names`` is given)."""
    aead = fmt.keys.index_aead()
    if names is None:
        names = [m.name for prefix in C.PACK_PREFIXES for m in storage.list(prefix)]

    def read(name):
        try:
            return name, read_local_index(storage, name, aead), None
        except (CorruptionError, UnsupportedVersion, BlobNotFound) as exc:
            return name, [], str(exc)

    result = RebuildResult()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, entries, problem in pool.map(read, names):
            if problem is not None:
                result.damaged_packs[name] = problem
            else:
                result.packs_read += 1
                result.entries.extend(entries)
    return result


def entries_to_write(from_packs: Iterable[IndexEntry], index: MergedIndex, now_us: int,
                     unusable: Callable[[IndexEntry], bool] = lambda e: False) -> list[IndexEntry]:
    """The entries a rebuild writes: one for each content the index lacks, and one for each
    content whose winning entry is ``unusable`` (its pack gone or too short) that another pack
    still holds, timestamped after that winner so that it wins. Deleted winners are left alone:
    content GC decides about them."""
    out: dict[bytes, IndexEntry] = {}
    for e in from_packs:
        current = index.lookup(e.content_id)
        if current is not None:
            if current.deleted or not unusable(current) or unusable(e) or e.pack == current.pack:
                continue
            e = replace(e, timestamp_us=max(now_us, stamp_after(current.timestamp_us)))
        best = out.get(e.content_id)
        if best is None or wins(e, best):
            out[e.content_id] = e
    return list(out.values())
