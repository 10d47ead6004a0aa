"""Sparse files: a backup finds their holes with SEEK_DATA/SEEK_HOLE and neither reads nor
hashes them (the object lists each hole by its length, version 2); a restore makes the same holes
(a file system with the same block size gives the same blocks); readers of the object (cat,
dump, the restore's comparison) see the holes' zeros; GC and check know a hole is no content."""

from __future__ import annotations

import os

import msgpack
import pytest

from repo_format import constants as C
from repo_format.crypto import KdfParams
from repo_format.errors import CorruptionError
from repo_format.format_blob import RepositoryParameters
from repo_format.objects import sparse_extents
from repo_format.repository import Repository
from repo_format.safety import SAFETY_FULL
from repo_format.storage.memory import MemoryStorage

from kdist.check import check_repository
from kdist.gc.run import MaintenanceOptions, run_maintenance
from kdist.restore import Restorer, find_subtree
from kdist.snapshot import read_directory
from kdist.tree import object_contents
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import PASSWORD, reopen

MIB = 1024 * 1024
BLOCK = 4096
GC_SAFETY = SAFETY_FULL.scaled(1 / 3600)  # margins of seconds: GC cycles pass in virtual time
GC_PARAMS = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_avg=16 * 1024,
                                 chunk_min=4 * 1024, chunk_max=64 * 1024, extra={"safety": GC_SAFETY.to_dict()})


def sparse_file(path, size: int, islands: dict[int, bytes]) -> None:
    """A file of ``size`` bytes with data only at the given offsets (each island one block at
    most and block-aligned, so the file system's extents are exactly these)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in islands.items():
            f.seek(offset)
            f.write(data)


def holes_supported(tmp_path) -> bool:
    p = tmp_path / "probe"
    sparse_file(p, 4 * MIB, {MIB: b"x" * BLOCK})
    fd = os.open(p, os.O_RDONLY)
    try:
        return sparse_extents(fd, 4 * MIB) is not None
    finally:
        os.close(fd)
        p.unlink()


@pytest.fixture
def src(tmp_path):
    if not holes_supported(tmp_path):  # tmpfs, ext4, xfs and btrfs all report holes
        pytest.fail("the test directory's file system does not report holes (SEEK_DATA)")
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "disk.img", 64 * MIB, {0: b"boot" * 1024, 20 * MIB: os.urandom(BLOCK),
                                             63 * MIB: b"tail" * 1024})
    sparse_file(src / "ends-in-a-hole", 8 * MIB, {BLOCK: b"data" * 1024})
    sparse_file(src / "all-hole", 16 * MIB, {})
    (src / "dense").write_bytes(os.urandom(MIB))
    return src


def test_holes_are_neither_read_nor_stored_and_come_back_as_holes(repo, src, tmp_path):
    up = Uploader(repo, BackupOptions())
    snap = up.backup(str(src))
    data_bytes = 3 * BLOCK + BLOCK + MIB  # the islands and the dense file: all that is read
    assert up.stats.bytes_read == data_bytes and up.stats.bytes == 64 * MIB + 8 * MIB + 16 * MIB + MIB
    assert up.stats.errors == 0
    dst = tmp_path / "dst"
    stats = Restorer(repo).restore(snap, str(dst))
    assert stats.errors == 0
    for name in ("disk.img", "ends-in-a-hole", "all-hole", "dense"):
        a, b = os.stat(src / name), os.stat(dst / name)
        assert (b.st_size, b.st_blocks) == (a.st_size, a.st_blocks), name  # the same holes, exactly
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert os.stat(dst / "all-hole").st_blocks == 0
    again = Restorer(repo).restore(snap, str(dst))  # compared with holes skipped: all match
    assert again.files == 0 and again.unchanged == 4


def test_readers_see_zeros_and_a_changed_hole_is_noticed(repo, src, tmp_path):
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    entries = {e.name: e for e in read_directory(repo.objects, snap.root)}
    oid = entries["disk.img"].oid
    with repo.objects.open(oid) as r:  # what cat and dump read
        r.seek(20 * MIB - 10)
        got = r.read(BLOCK + 20)
    assert got == (src / "disk.img").read_bytes()[20 * MIB - 10:21 * MIB - 10 + BLOCK + 20 - MIB]
    assert repo.objects.read_all(entries["ends-in-a-hole"].oid) == (src / "ends-in-a-hole").read_bytes()
    fd = os.open(src / "disk.img", os.O_RDWR)
    try:
        assert repo.objects.same_content(oid, fd)
        os.pwrite(fd, b"\x01", 40 * MIB)  # a byte in a hole
        assert not repo.objects.same_content(oid, fd)
    finally:
        os.close(fd)
    assert find_subtree(repo, snap, "disk.img").size == 64 * MIB


def test_gc_keeps_and_check_passes_a_snapshot_with_holes(src, tmp_path, virtual_time):
    """The reach of an object with holes is its stored contents only: maintenance keeps the
    snapshot whole (while it collects a forgotten one) and check finds nothing missing."""
    storage = MemoryStorage(clock=lambda: virtual_time[0])
    Repository.create(storage, PASSWORD, GC_PARAMS, KdfParams.weak_for_tests()).close()
    repo = reopen(storage)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "junk").write_bytes(os.urandom(50_000))
    gone = Uploader(repo, BackupOptions()).backup(str(tmp_path / "other"))
    junk = [c for e in read_directory(repo.objects, gone.root) for c in object_contents(repo.objects, e.oid)]
    disk = next(e for e in read_directory(repo.objects, snap.root) if e.name == "disk.img")
    assert any(c is None for c, _n in repo.objects.chunks(disk.oid))
    repo.manifests.delete([gone.id])
    repo.close()
    for _ in range(4):
        virtual_time[0] += 3 * GC_SAFETY.pack_age + GC_SAFETY.drop_margin
        repo = reopen(storage)
        run_maintenance(repo, MaintenanceOptions(full=True))
        repo.close()
    repo = reopen(storage)
    assert not any(repo.contents.contains_many(junk))  # GC ran, and collected
    assert all(repo.contents.contains_many(object_contents(repo.objects, disk.oid)))
    assert check_repository(repo.storage, repo.format, read_data=100).healthy
    Restorer(repo).restore(snap, str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "disk.img").read_bytes() == (src / "disk.img").read_bytes()


def _listing(version: int, chunks: list) -> bytes:
    return msgpack.packb({"v": version, "chunks": chunks}, use_bin_type=True)


@pytest.mark.parametrize("version, chunks", [
    (C.OBJECT_LIST_VERSION, [[None, 10], [b"\x01" * 32, 5]]),  # a hole needs version 2
    (C.OBJECT_LIST_VERSION_HOLES, [[None, 0], [b"\x01" * 32, 5]]),  # a hole is at least a byte
    (C.OBJECT_LIST_VERSION_HOLES, [[None, -1], [b"\x01" * 32, 5]]),
    (C.OBJECT_LIST_VERSION_HOLES, [[None, 2**63], [b"\x01" * 32, 5]]),
    (C.OBJECT_LIST_VERSION_HOLES, [[b"", 10]]),
    (3, [[b"\x01" * 32, 5], [b"\x02" * 32, 5]]),
])
def test_malformed_hole_lists_are_corruption(repo, version, chunks):
    oid = C.INDIRECT_OBJECT_PREFIX + repo.contents.write(_listing(version, chunks), metadata=True).hex()
    with pytest.raises(CorruptionError):
        repo.objects.chunks(oid)


def test_a_huge_hole_reads_in_small_pieces(repo):
    """A listed hole of a terabyte is read like any other bytes, a buffer at a time."""
    data = repo.contents.write(b"end")
    oid = C.INDIRECT_OBJECT_PREFIX + repo.contents.write(
        _listing(C.OBJECT_LIST_VERSION_HOLES, [[None, 2**40], [data, 3]]), metadata=True).hex()
    with repo.objects.open(oid) as r:
        r.seek(2**39)
        assert r.read(MIB) == bytes(MIB)
        r.seek(2**40 - 2)
        assert r.read() == b"\0\0end"
    assert repo.objects.chunks(oid) == [(None, 2**40), (data, 3)]


def test_a_file_without_holes_is_stored_as_before(repo, tmp_path):
    """Only a file with holes gets a version-2 list: a dense one's object is what kdist before
    holes wrote (and deduplicates against it)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dense").write_bytes(os.urandom(3 * MIB))
    fd = os.open(tmp_path / "src" / "dense", os.O_RDONLY)
    try:
        assert sparse_extents(fd, 3 * MIB) is None
        os.lseek(fd, 0, os.SEEK_SET)  # (it moved the offset)
        with os.fdopen(os.dup(fd), "rb") as f:
            plain = repo.objects.write_stream(f)[0]
    finally:
        os.close(fd)
    snap = Uploader(repo, BackupOptions()).backup(str(tmp_path / "src"))
    (entry,) = read_directory(repo.objects, snap.root)
    assert entry.oid == plain
    listing = msgpack.unpackb(repo.contents.read(bytes.fromhex(plain[1:])), raw=False)
    assert listing["v"] == C.OBJECT_LIST_VERSION


def test_a_hostile_hole_past_any_file_size_is_reported_not_made(repo, tmp_path):
    """A listed hole of 2^62 bytes: where the file system cannot hold it (ext4) that file is
    reported and removed, where it can (tmpfs) it is made, all holes; the others restore."""
    from kdist.snapshot import Snapshot, Source, encode_directory, Entry

    hole = C.INDIRECT_OBJECT_PREFIX + repo.contents.write(
        _listing(C.OBJECT_LIST_VERSION_HOLES, [[None, 2**62]]), metadata=True).hex()
    ok = repo.objects.write_bytes(b"fine")
    root = repo.objects.write_bytes(encode_directory([Entry("huge", "f", size=2**62, oid=hole, mode=0o644),
                                                      Entry("ok", "f", size=4, oid=ok, mode=0o644)]), metadata=True)
    snap = Snapshot(source=Source("h", "u", "/x"), root=root, start=0, end=0)
    stats = Restorer(repo).restore(snap, str(tmp_path / "dst"))
    if stats.errors:
        assert [os.path.basename(e["path"]) for e in stats.error_list] == ["huge"]
        assert sorted(os.listdir(tmp_path / "dst")) == ["ok"]
    else:
        st = os.stat(tmp_path / "dst" / "huge")
        assert (st.st_size, st.st_blocks) == (2**62, 0)
    assert (tmp_path / "dst" / "ok").read_bytes() == b"fine"


def test_a_hostile_chunk_length_is_never_read_into_memory(repo, tmp_path):
    """The restore's comparison of an existing file with a chunk list claiming a terabyte-long
    chunk says "different" without reading a terabyte; a directory object with a hole (which no
    writer makes) is corruption, not a zero bomb."""
    from kdist.snapshot import read_directory

    data = repo.contents.write(b"0123456789")
    oid = C.INDIRECT_OBJECT_PREFIX + repo.contents.write(
        _listing(C.OBJECT_LIST_VERSION, [[data, 2**40], [data, 10]]), metadata=True).hex()
    (tmp_path / "f").write_bytes(b"0123456789" * 2)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert not repo.objects.same_content(oid, fd)
    finally:
        os.close(fd)
    holey = C.INDIRECT_OBJECT_PREFIX + repo.contents.write(
        _listing(C.OBJECT_LIST_VERSION_HOLES, [[None, 2**40], [data, 10]]), metadata=True).hex()
    with pytest.raises(CorruptionError, match="metadata object never has"):
        read_directory(repo.objects, holey)


def test_repair_stores_a_sparse_file_as_the_backup_did(tmp_path):
    """repo repair --source re-uploads lost data cut as a backup cuts it: a sparse file's runs
    and holes give the same contents again."""
    from repo_format.storage import open_storage

    from kdist.check import check_repository
    from kdist.repair import repair_repository

    storage = open_storage(str(tmp_path / "repo"), create=True)
    repo = Repository.create(storage, PASSWORD, GC_PARAMS, KdfParams.weak_for_tests())
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "disk.img", 16 * MIB, {0: os.urandom(BLOCK), 9 * MIB: os.urandom(BLOCK)})
    Uploader(repo, BackupOptions()).backup(str(src))
    repo.close()
    for m in storage.list(C.DATA_PACK_PREFIX):  # every data pack lost
        storage.delete(m.name)
    assert not check_repository(storage, repo.format).healthy
    report = repair_repository(storage, repo.format, str(src), dry_run=False)
    assert report.still_missing == 0 and report.healthy
