"""Hostile repositories: tampered, swapped, replayed and forged blobs are refused cleanly.

Two attackers. One can write the storage but has no key: raw-byte tampering, blobs copied under
other names, old blobs put back. The other is a compromised writer that holds the keys and seals
whatever plaintext it likes (``Insider``): absurd counts, out-of-range fields, deep trees, names
and symlinks meant to escape a restore. Either way kdist must answer with a ``KdistError`` that
the CLI maps to its exit code, never a traceback, never an unbounded allocation, and never a
write outside the restore target.

What tests/format/test_tamper_detection.py, tests/format/test_format_blob.py and the restore
tests of tests/backup/test_backup_restore.py already cover (byte flips and truncation of packs,
index blobs and the format blob, packs and index blobs under other names, unsafe names given as
text, an existing symlink where a directory goes) is not repeated here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
import zlib

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")  # as the other test folders do

import msgpack  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from kdist.browse import diff, verify, walk  # noqa: E402
from kdist.cli import exit_codes  # noqa: E402
from kdist.cli.main import cli  # noqa: E402
from kdist.restore import MAX_DEPTH, Restorer, find_subtree  # noqa: E402
from kdist.snapshot import (MAX_TREE_DEPTH, Entry, Snapshot, Source, decode_directory,  # noqa: E402
                            encode_directory, list_snapshots, resolve_snapshot)
from kdist.uploader import BackupOptions, Uploader  # noqa: E402
from repo_format import constants as C  # noqa: E402
from repo_format import format_blob  # noqa: E402
from repo_format import manifest as manifest_module  # noqa: E402
from repo_format.content import load_committed_index  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.errors import CorruptionError, KdistError  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import IndexEntry, encode_index, index_blob_name, seal_index  # noqa: E402
from repo_format.pack import read_local_index  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage import FilesystemStorage  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402

PASSWORD = "hostile-input-password"
SMALL = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024,
                             chunk_avg=16 * 1024, chunk_min=4 * 1024, chunk_max=64 * 1024)
# Exit codes a refused hostile input may give: never 1 (an unexpected error, i.e. a bug).
CLEAN_REFUSALS = {exit_codes.PARTIAL, exit_codes.CORRUPTION, exit_codes.NOT_FOUND}


# ---- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    monkeypatch.setenv("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
    for var in ("KDIST_REPO", "KDIST_ENDPOINT_URL", "KDIST_PASSWORD_FILE", "KDIST_DEBUG"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fs_repo(env, tmp_path):
    """A filesystem repository (weak KDF, small packs): ``(repository, its directory)``."""
    where = tmp_path / "repo"
    repo = Repository.create(FilesystemStorage(where, create=True), PASSWORD, SMALL, KdfParams.weak_for_tests())
    yield repo, where
    try:
        repo.close()
    except KdistError:  # some tests leave the repository hostile on purpose
        pass


@pytest.fixture
def mem_repo():
    return Repository.create(MemoryStorage(), PASSWORD, SMALL, KdfParams.weak_for_tests())


def kdist(*args, code: int | set[int]):
    """Run the CLI in-process; the run must end in an exit code, never an uncaught exception."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {result.exception!r} (a traceback from the CLI)")
    codes = code if isinstance(code, set) else {code}
    assert result.exit_code in codes, (result.exit_code, result.output)
    return result


def kdist_process(*args, env_extra=None) -> subprocess.CompletedProcess:
    """The CLI as a real process (through ``main()``): its stderr must hold no traceback."""
    environ = {**os.environ, **(env_extra or {})}
    p = subprocess.run([sys.executable, "-m", "kdist.cli.main", *map(str, args)], env=environ,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


class Insider:
    """A compromised writer: it holds the keys and seals whatever plaintext it likes."""

    def __init__(self, repo: Repository):
        self.repo = repo

    def data(self, data: bytes = b"owned") -> str:
        return self.repo.objects.write_bytes(data)

    def directory(self, entries: list) -> str:
        """A directory object of raw entry maps (a valid file oid is added where none is given)."""
        for e in entries:
            if isinstance(e, dict):
                e.setdefault("oid", self.data())
        return self.repo.objects.write_bytes(msgpack.packb({"v": 1, "entries": entries}), metadata=True)

    def snapshot(self, root_oid: str, **payload) -> str:
        """Publish a snapshot of ``root_oid``; ``payload`` replaces fields of its manifest payload."""
        self.repo.flush()
        snap = Snapshot(source=Source("host", "user", "/src"), root=root_oid, start=1.0, end=2.0)
        raw = {**msgpack.unpackb(snap.payload()), **payload}
        return self.repo.manifests.put(snap.labels(), msgpack.packb(raw)).id

    def manifest_blob(self, doc) -> str:
        name = f"{C.MANIFEST_PREFIX}{os.urandom(12).hex()}-{self.repo.session}"
        self.repo.storage.put(name, self.repo.format.keys.manifest_aead().seal(msgpack.packb(doc), name.encode()))
        return name

    def index_blob(self, plaintext: bytes, epoch: int = 0) -> str:
        name = index_blob_name(self.repo.format.keys.name_hasher(), plaintext, epoch, self.repo.session)
        self.repo.storage.put(name, seal_index(self.repo.format.keys.index_aead(), name, plaintext))
        return name

    def chunk_list(self, listing) -> str:
        cid = self.repo.contents.write(msgpack.packb(listing), metadata=True)
        return C.INDIRECT_OBJECT_PREFIX + cid.hex()


def backup(repo: Repository, src) -> Snapshot:
    return Uploader(repo, BackupOptions(checkpoint_interval=0)).backup(str(src))


def small_tree(root, files: int = 3):
    root.mkdir()
    for i in range(files):
        (root / f"f{i}").write_bytes(os.urandom(20_000) + b"%d" % i)
    return root


def peak_allocation(fn) -> tuple[object, int]:
    """``(result or raised KdistError, peak bytes allocated by Python meanwhile)``."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except KdistError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- raw bytes, no key: manifests ----------------------------------------------------------

def test_every_manifest_blob_byte_flip_and_truncation_is_corruption(mem_repo):
    repo = mem_repo
    Insider(repo).snapshot(Insider(repo).directory([]))
    (name,) = [m.name for m in repo.storage.list(C.MANIFEST_PREFIX)]
    original = repo.storage.get(name)
    damaged = [bytes(original[:p]) + bytes([original[p] ^ 0x01]) + original[p + 1:] for p in range(len(original))]
    damaged += [original[:n] for n in range(len(original))] + [original + b"\0"]
    for raw in damaged:
        repo.storage.put(name, raw)
        with pytest.raises(CorruptionError, match=name):
            list_snapshots(repo.manifests)


def test_manifest_blob_under_another_name_fails_authentication(fs_repo, tmp_path):
    repo, where = fs_repo
    Insider(repo).snapshot(Insider(repo).directory([]))
    (name,) = [m.name for m in repo.storage.list(C.MANIFEST_PREFIX)]
    sealed = repo.storage.get(name)
    for other in (f"m{'ab' * 12}-{repo.session}", f"m_{'cd' * 12}-{repo.session}",
                  name.replace(repo.session, "0123456789abcdef")):
        repo.storage.put(other, sealed)
        with pytest.raises(CorruptionError, match=other):
            list_snapshots(repo.manifests)
        # listing passes over it, naming it; maintenance, which would take its records for gone, refuses
        out = kdist("snapshot", "list", "--repo", where, code=0)
        assert other in out.stderr and "passed over" in out.stderr and "1 snapshot(s)" in out.stdout
        out = kdist("gc", "run", "--repo", where, "--dry-run", code=exit_codes.CORRUPTION)
        assert other in out.stderr and "authentication" in out.stderr
        repo.storage.delete(other)
    assert len(list_snapshots(repo.manifests)) == 1


def test_oversized_manifest_and_format_blobs_are_refused_without_reading_them_whole(mem_repo, monkeypatch):
    repo = mem_repo
    reads = []
    real_get = repo.storage.get
    monkeypatch.setattr(repo.storage, "get", lambda name, offset=0, length=-1: (
        reads.append((name, length)), real_get(name, offset, length))[1])
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BLOB", 4096)
    huge = f"m{'ef' * 12}-{repo.session}"
    repo.storage.put(huge, os.urandom(1 << 20))
    with pytest.raises(CorruptionError, match="implausibly large"):
        repo.manifests.read_blob(huge)
    assert reads == [(huge, 4097)]
    reads.clear()
    repo.storage.put(C.FORMAT_BLOB_NAME, b"KDISTREP" + os.urandom(8 << 20))
    with pytest.raises(CorruptionError, match="impossible size"):
        format_blob.read(repo.storage, PASSWORD)
    assert reads == [(C.FORMAT_BLOB_NAME, format_blob.MAX_FORMAT_BLOB_SIZE + 1)]


# ---- raw bytes, no key: index blobs and packs under other names ----------------------------

def test_index_blob_under_another_name_fails_authentication_or_is_no_set(mem_repo):
    repo = mem_repo
    repo.contents.write(b"indexed content")
    name = repo.flush()
    sealed = repo.storage.get(name)
    other = name.replace("xn0_", "xn1_")  # the next epoch: a writer may write there, so it is read
    repo.storage.put(other, sealed)
    with pytest.raises(CorruptionError, match=other):
        load_committed_index(repo.storage, repo.format)
    repo.storage.delete(other)
    # an epoch far ahead of every marker is no writer's: not even read (gc/README, argument 4)
    ahead = name.replace("xn0_", "xn7_")
    repo.storage.put(ahead, sealed)
    assert ahead not in repo.contents.epochs.refresh().assembly()
    assert len(list(load_committed_index(repo.storage, repo.format))) == 1
    repo.storage.delete(ahead)
    # under a set's name it is not even read: a signed repository's sets count only when signed
    for other in (f"xs0_{'12' * 8}_0of1", f"xr0_{'34' * 8}_0of1"):
        repo.storage.put(other, sealed)
        view = repo.contents.epochs.refresh()
        assert [s.names() for s in view.ignored_sets] == [[other]]
        assert other not in view.assembly()
        assert len(list(load_committed_index(repo.storage, repo.format))) == 1
        repo.storage.delete(other)


def test_swapped_pack_fails_only_the_files_in_it_through_the_cli(fs_repo, tmp_path):
    """Two valid data packs, one copied over the other: the files in the overwritten pack fail
    authentication (restore exit 3, verify exit 13); the others restore; no traceback."""
    repo, where = fs_repo
    src = small_tree(tmp_path / "src", files=30)  # 600 KB: more than two 256 KiB data packs
    backup(repo, src)
    packs = sorted(m.name for m in repo.storage.list(C.DATA_PACK_PREFIX))
    assert len(packs) >= 2
    repo.storage.put(packs[1], repo.storage.get(packs[0]))
    out = kdist("snapshot", "restore", "--repo", where, "latest", tmp_path / "dst", code=exit_codes.PARTIAL)
    assert "failed authentication" in out.stderr
    restored = {p.name for p in (tmp_path / "dst").iterdir()}
    assert 0 < len(restored) < 30
    assert all((tmp_path / "dst" / n).read_bytes() == (src / n).read_bytes() for n in restored)
    kdist("snapshot", "verify", "--repo", where, "latest", code=exit_codes.CORRUPTION)


# ---- raw bytes, no key: replayed blobs -----------------------------------------------------

def test_replayed_manifest_of_a_forgotten_snapshot_stays_forgotten(fs_repo, tmp_path):
    repo, where = fs_repo
    snap = backup(repo, small_tree(tmp_path / "src"))
    (old,) = [m.name for m in repo.storage.list(C.MANIFEST_PREFIX)]
    old_bytes = repo.storage.get(old)
    kdist("snapshot", "forget", "--repo", where, "--id", snap.id[:8], code=0)
    # compaction merges everything (the tombstone too) into one blob and deletes the rest
    now = time.time() + 60
    repo.manifests.compact(now, settle=0, min_blobs=0)
    repo.manifests.compact(now + 1, settle=0, min_blobs=0)
    assert old not in {m.name for m in repo.storage.list(C.MANIFEST_PREFIX)}
    repo.storage.put(old, old_bytes)  # the attacker puts the forgotten snapshot's blob back
    assert list_snapshots(repo.manifests) == []
    out = kdist("snapshot", "list", "--repo", where, code=0)
    assert "no snapshots" in out.stdout
    kdist("snapshot", "restore", "--repo", where, snap.id[:8], tmp_path / "dst", code=exit_codes.NOT_FOUND)


def test_replayed_old_index_blob_does_not_resurrect_deleted_contents(mem_repo):
    """An old index blob put back never wins: its entries are older than the deletion markers
    that superseded them, and a raw blob of an epoch with a complete compacted set is not read.
    (A resurrected live entry would let a backup deduplicate against a deleted pack.)"""
    repo = mem_repo
    cid = repo.contents.write(b"content that maintenance deleted")
    first = repo.flush()
    old_bytes = repo.storage.get(first)
    live = repo.contents.lookup(cid)
    dead = IndexEntry(cid, live.pack, live.offset, live.packed_length, live.original_length,
                      live.compression, live.timestamp_us + 1, deleted=True)
    epochs = repo.contents.epochs
    epochs.write_index([dead])
    repo.storage.delete(first)  # as compaction cleanup would
    repo.storage.put(first, old_bytes)  # replayed
    assert load_committed_index(repo.storage, repo.format).lookup(cid).deleted
    # the epoch compacted into a set holding only the deletion; the raw blobs are gone, then one is replayed
    for m in list(repo.storage.list(C.INDEX_PREFIX)):
        repo.storage.delete(m.name)
    epochs.write_set("xs", 0, [dead])
    repo.storage.put(first, old_bytes)
    assert load_committed_index(repo.storage, repo.format).lookup(cid).deleted
    fresh = Repository.open(repo.storage, PASSWORD)
    assert not fresh.contents.contains(cid)  # a new backup stores it again rather than dedup


def test_forged_or_copied_epoch_markers_are_ignored(mem_repo):
    """Without the key an attacker cannot move the epoch (and so what readers assemble): a
    random blob or a valid marker copied under another epoch's name is not a marker."""
    repo = mem_repo
    epochs = repo.contents.epochs
    assert epochs.write_marker(1)
    (genuine,) = [m.name for m in repo.storage.list("xe1_")]
    repo.storage.put("xe9_" + "0" * 16, os.urandom(40))
    repo.storage.put("xe8_" + genuine[-16:], repo.storage.get(genuine))
    repo.storage.put("xe7", os.urandom(40))
    assert epochs.refresh().current == 1
    repo.contents.write(b"written after the forgery")
    assert repo.flush().startswith("xn1_")


# ---- forged plaintext: absurd counts and lengths -------------------------------------------

@pytest.mark.parametrize("count,packs", [(2**32 - 1, 1), (C.MAX_INDEX_ENTRIES + 1, 1), (1, 2**32 - 1), (3, 0)],
                         ids=["2^32-1 entries", "one above the cap", "2^32-1 packs", "count mismatch"])
def test_index_with_absurd_counts_is_refused_before_allocating(mem_repo, count, packs):
    repo = mem_repo
    plaintext = C.INDEX_HEADER.pack(C.INDEX_MAGIC, C.INDEX_VERSION, 0, 0, count, packs) + b"\0" * 64
    name = Insider(repo).index_blob(plaintext)
    err, peak = peak_allocation(lambda: Repository.open(repo.storage, PASSWORD).contents.committed)
    assert isinstance(err, CorruptionError) and name in str(err), err
    assert peak < 16 << 20


def test_index_naming_a_pack_outside_the_storage_is_corruption(mem_repo):
    repo = mem_repo
    raw = encode_index([IndexEntry(b"\1" * 32, "p" + "0" * 15, 0, 40, 12, 0, 1)])
    name = Insider(repo).index_blob(raw.replace(b"p" + b"0" * 15, b"../../etc/passwd"))  # same length
    with pytest.raises(CorruptionError, match=f"index blob {name}: .*invalid blob name"):
        Repository.open(repo.storage, PASSWORD).contents.committed  # the index loads on first use


@pytest.mark.parametrize("offset,length", [(2**64 - 1, 100), (0, 2**32 - 1), (10, 10), (2**40, 2**28 + 1)])
def test_pack_postamble_pointing_outside_the_pack_is_reported_by_index_rebuild(fs_repo, tmp_path, offset, length):
    repo, where = fs_repo
    backup(repo, small_tree(tmp_path / "src", files=1))
    (pack,) = [m.name for m in repo.storage.list(C.DATA_PACK_PREFIX)]
    raw = bytearray(repo.storage.get(pack))
    post = C.PACK_POSTAMBLE.pack(C.PACK_MAGIC, C.PACK_VERSION, offset, length, 0)
    raw[-24:] = post[:-4] + zlib.crc32(post[:-4]).to_bytes(4, "big")
    repo.storage.put(pack, bytes(raw))
    err, peak = peak_allocation(lambda: read_local_index(repo.storage, pack, repo.format.keys.index_aead()))
    assert isinstance(err, CorruptionError) and "outside the pack" in str(err)
    assert peak < 16 << 20
    out = kdist("index", "rebuild", "--repo", where, "--dry-run", code=0)
    assert f"damaged pack {pack}" in out.stderr


def test_file_entry_claiming_a_huge_size_or_chunk_length_is_a_clean_error(fs_repo, tmp_path):
    repo, where = fs_repo
    spy = Insider(repo)
    data = spy.data(b"twelve bytes")
    cid = bytes.fromhex(data)
    listing = spy.chunk_list({"v": 1, "chunks": [[cid, 2**62], [cid, 12]]})
    sid = spy.snapshot(spy.directory([
        {"name": "huge-size", "type": "f", "size": 2**63 - 1, "oid": data},
        {"name": "huge-chunk", "type": "f", "size": 2**62 + 12, "oid": listing},
    ]))
    dst = tmp_path / "dst"
    out = kdist("snapshot", "restore", "--repo", where, sid[:8], dst, code=exit_codes.PARTIAL)
    assert "2 item(s) could not be restored" in out.stderr
    assert list(dst.iterdir()) == []  # no partial file left looking complete
    out = kdist("snapshot", "cat", "--repo", where, sid[:8], "huge-chunk", code=exit_codes.CORRUPTION)
    assert "has length 12, expected" in out.stderr


# ---- forged plaintext: manifests, snapshots, chunk lists -----------------------------------

def _record(**change):
    return {"id": "a" * 32, "labels": {"type": "snapshot"}, "ts": 1, "payload": b"", "deleted": False, **change}


@pytest.mark.parametrize("doc", [
    {"v": 1, "records": [_record(payload=2**31)]},  # bytes(2**31): a 2 GiB allocation
    {"v": 1, "records": [_record(payload=2**63)]},
    {"v": 1, "records": [_record(payload="text")]},
    {"v": 1, "records": [_record(ts=float("inf"))]},
    {"v": 1, "records": [_record(ts="12")]},
    {"v": 1, "records": [_record(labels=[["type", "snapshot"]])]},
    {"v": 1, "records": [_record(id=["a"])]},
    {"v": 1, "records": [_record(deleted="no")]},
    {"v": 1, "records": [_record(), 5]},
    {"v": 1, "records": {"a": 1}},
    {"v": 3, "records": []},
    {"v": 2, "records": [{"r": 5, "k": "root", "s": b""}]},
    {"v": 2, "records": [{"r": msgpack.packb(_record(payload=2**63)), "k": "root", "s": b""}]},
    {"v": 2, "body": 5, "k": "root", "s": b""},
    [1, {"v": 1}],
], ids=["payload 2^31", "payload 2^63", "payload str", "ts inf", "ts str", "labels list", "id list",
        "deleted str", "record int", "records map", "version 3", "signed record not bytes",
        "signed record payload 2^63", "compacted body not bytes", "not a map"])
def test_forged_manifest_records_are_corruption_without_allocating(mem_repo, doc):
    repo = mem_repo
    name = Insider(repo).manifest_blob(doc)
    err, peak = peak_allocation(lambda: repo.manifests.read_blob(name))
    assert isinstance(err, CorruptionError) and name in str(err), err
    assert peak < 16 << 20


SNAPSHOT_FORGERIES = {
    "root int": {"root": 5}, "root not an id": {"root": "../../etc"}, "totals list": {"totals": [1]},
    "totals str value": {"totals": {"bytes": "many"}}, "end str": {"end": "x"}, "end 1e300": {"end": 1e300},
    "start nan": {"start": float("nan")}, "tags ints": {"tags": [1, 2]}, "source list": {"source": ["h", "u", "p"]},
    "source int path": {"source": {"host": "h", "user": "u", "path": 3}}, "checkpoint str": {"checkpoint": "0"},
    "unknown field": {"evil": 1}, "errors str": {"errors": "x"},
}


@pytest.mark.parametrize("change", SNAPSHOT_FORGERIES.values(), ids=SNAPSHOT_FORGERIES.keys())
def test_forged_snapshot_payload_is_refused_by_every_command(fs_repo, tmp_path, change):
    repo, where = fs_repo
    spy = Insider(repo)
    sid = spy.snapshot(spy.directory([]), **change)
    with pytest.raises(CorruptionError, match=sid):
        list_snapshots(repo.manifests)
    kdist("snapshot", "list", "--repo", where, code=exit_codes.CORRUPTION)
    kdist("snapshot", "restore", "--repo", where, "latest", tmp_path / "dst", code=exit_codes.CORRUPTION)
    kdist("gc", "run", "--repo", where, "--dry-run", code=exit_codes.CORRUPTION)
    assert not (tmp_path / "dst").exists() or list((tmp_path / "dst").iterdir()) == []


@pytest.mark.parametrize("listing", [
    {"v": 1, "chunks": [[2**31, 5]]},  # bytes(2**31) would allocate 2 GiB
    {"v": 1, "chunks": [[2**63, 5]]},
    {"v": 1, "chunks": [[b"\1" * 32, float("inf")]]},
    {"v": 1, "chunks": [[b"\1" * 32, -1]]},
    {"v": 1, "chunks": [[b"\1" * 32, "7"]]},
    {"v": 1, "chunks": [["1" * 32, 7]]},
    {"v": 1, "chunks": [[b"\1" * 31, 7]]},
    {"v": 1, "chunks": [[b"\1" * 32]]},
    {"v": 1, "chunks": 7},
    {"v": 9, "chunks": []},
    [1, 2],
], ids=["id 2^31", "id 2^63", "length inf", "length -1", "length str", "id str", "id 31 bytes", "no length",
        "chunks int", "version 9", "not a map"])
def test_forged_chunk_list_is_corruption_without_allocating(mem_repo, listing):
    repo = mem_repo
    oid = Insider(repo).chunk_list(listing)
    err, peak = peak_allocation(lambda: repo.objects.chunks(oid))
    assert isinstance(err, CorruptionError) and oid in str(err), err
    assert peak < 16 << 20


# ---- forged plaintext: directory objects ---------------------------------------------------

def _entry(**change):
    return {"name": "a", "type": "f", "size": 5, **change}


DIRECTORY_FORGERIES = {
    "name bytes ..": _entry(name=b".."), "name bytes with /": _entry(name=b"x/../../y"),
    "name bytes NUL": _entry(name=b"a\0b"), "name bytes empty": _entry(name=b""),
    "name too long": _entry(name="x" * 4097), "name int": _entry(name=7),
    "type unknown": _entry(type="c"), "type list": _entry(type=["f"]),
    "mtime 2^64-1": _entry(mtime_ns=2**64 - 1), "mtime float": _entry(mtime_ns=1.5),
    "uid 2^64-1": _entry(uid=2**64 - 1), "gid -1": _entry(gid=-1), "mode 2^32": _entry(mode=2**32),
    "size -1": _entry(size=-1), "mode bool": _entry(mode=True), "inode str": _entry(inode="7"),
    "nlink list": _entry(nlink=[1]), "user int": _entry(user=0), "oid int": _entry(oid=7),
    "oid huge": _entry(oid="I" + "0" * 10_000), "symlink target NUL": _entry(type="l", target="x\0y", oid=""),
    "symlink target empty": _entry(type="l", target="", oid=""),
    "symlink target too long": _entry(type="l", target="x" * 5000, oid=""),
    "summary list": _entry(type="d", summary=[1]), "summary str count": _entry(type="d", summary={"files": "1"}),
    "unknown field": _entry(evil=1), "timestamp ext": _entry(mtime_ns=msgpack.Timestamp(1, 0)),
    "entry list": ["a", "f"], "entry int": 5,
}


@pytest.mark.parametrize("entry", DIRECTORY_FORGERIES.values(), ids=DIRECTORY_FORGERIES.keys())
def test_forged_directory_entry_is_corruption(entry):
    raw = msgpack.packb({"v": 1, "entries": [entry]}, datetime=False)
    with pytest.raises(CorruptionError):
        decode_directory(raw)


@pytest.mark.parametrize("doc", [
    {"v": 1, "entries": [_entry(), _entry()]}, {"v": 1, "entries": [_entry(name="a"), _entry(name=b"a")]},
    {"v": 4, "entries": []}, {"v": 1, "entries": 5}, {"v": 1}, [1], "text", None,
], ids=["duplicate", "duplicate str and bytes", "version 4", "entries int", "no entries", "list", "str", "nil"])
def test_forged_directory_object_is_corruption(doc):
    with pytest.raises(CorruptionError):
        decode_directory(msgpack.packb(doc))


@pytest.mark.parametrize("name", ["mtime 2^64-1", "uid 2^64-1", "symlink target NUL", "symlink target empty",
                                  "mode 2^32", "name bytes with /"])
def test_forged_entries_restore_nothing_and_exit_cleanly(fs_repo, tmp_path, name):
    """Before the decoder checked these, restore died with OverflowError or ValueError (os.utime,
    os.fchown, os.symlink) and a traceback."""
    repo, where = fs_repo
    spy = Insider(repo)
    sid = spy.snapshot(spy.directory([dict(DIRECTORY_FORGERIES[name]), {"name": "ok", "type": "f", "size": 5}]))
    dst = tmp_path / "target"
    out = kdist("snapshot", "restore", "--repo", where, sid[:8], dst, code=exit_codes.PARTIAL)
    assert "malformed" in out.stderr or "unsafe name" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["repo", "target"] and os.listdir(dst) == []
    kdist("snapshot", "ls", "--repo", where, sid[:8], "-r", code=exit_codes.CORRUPTION)
    kdist("snapshot", "verify", "--repo", where, sid[:8], code=exit_codes.CORRUPTION)
    out = kdist("gc", "run", "--repo", where, "--dry-run", code=exit_codes.CORRUPTION)
    assert "refusing to collect garbage" in out.stderr


# ---- deep trees ----------------------------------------------------------------------------

def _chain(repo: Repository, depth: int) -> str:
    """A snapshot whose tree is ``d/d/d/.../leaf``, ``depth`` directories deep."""
    spy = Insider(repo)
    oid = repo.objects.write_bytes(encode_directory([Entry("leaf", "f", size=5, oid=spy.data())]), metadata=True)
    for _ in range(depth):
        oid = repo.objects.write_bytes(encode_directory([Entry("d", "d", mode=0o755, oid=oid)]), metadata=True)
    return spy.snapshot(oid)


def test_directory_chain_10000_deep_ls_verify_diff_refuse_cleanly_and_gc_walks_it(fs_repo, tmp_path):
    repo, where = fs_repo
    deep = _chain(repo, 10_000)
    empty = Insider(repo).snapshot(Insider(repo).directory([]))
    out = kdist("snapshot", "ls", "--repo", where, deep[:8], "-r", code=exit_codes.CORRUPTION)
    assert f"nesting deeper than {MAX_TREE_DEPTH}" in out.stderr
    out = kdist("snapshot", "verify", "--repo", where, deep[:8], code=exit_codes.CORRUPTION)
    assert f"nesting deeper than {MAX_TREE_DEPTH}" in out.stderr
    out = kdist("snapshot", "diff", "--repo", where, empty[:8], deep[:8], code=exit_codes.CORRUPTION)
    assert f"nesting deeper than {MAX_TREE_DEPTH}" in out.stderr
    kdist("snapshot", "ls", "--repo", where, deep[:8], "d/d/d", code=0)  # one level: fine
    kdist("gc", "run", "--repo", where, "--dry-run", code=0)  # garbage collection must walk all of it
    snap = resolve_snapshot(repo.manifests, deep[:8])
    shallow = _chain(repo, MAX_TREE_DEPTH)
    rows = walk(repo, find_subtree(repo, resolve_snapshot(repo.manifests, shallow), None), "", True)
    assert len(rows) == MAX_TREE_DEPTH + 1  # a tree just within the limit lists completely
    with pytest.raises(CorruptionError, match="nesting deeper"):
        walk(repo, find_subtree(repo, resolve_snapshot(repo.manifests, _chain(repo, MAX_TREE_DEPTH + 1)), None),
             "", True)
    assert verify(repo, snap.root).problems[0]["error"].startswith("directory nesting deeper")
    assert diff(repo, snap.root, snap.root) == []


@pytest.fixture
def deep_dirs(tmp_path):
    """Where a test restores directory chains up to MAX_DEPTH deep; removed with ``rm -rf``
    afterwards: pytest's own clean-up of ``tmp_path`` recurses once per level and fails on them."""
    where = tmp_path / "restores"
    where.mkdir()
    yield where
    subprocess.run(["rm", "-rf", str(where)], check=False)


def test_deep_directory_chains_restore_without_recursion_error(fs_repo, deep_dirs):
    repo, _ = fs_repo
    within = resolve_snapshot(repo.manifests, _chain(repo, 600))
    stats = Restorer(repo).restore(within, str(deep_dirs / "within"))
    assert stats.errors == 0 and (deep_dirs / "within" / "/".join(["d"] * 600) / "leaf").read_bytes() == b"owned"
    deep = resolve_snapshot(repo.manifests, _chain(repo, 10_000))
    stats = Restorer(repo).restore(deep, str(deep_dirs / "deep"))
    assert stats.errors >= 1 and f"deeper than {MAX_DEPTH}" in stats.error_list[0]["error"]
    assert not (deep_dirs / "deep" / "/".join(["d"] * (MAX_DEPTH + 2))).exists()


def test_cli_restore_of_a_deep_chain_prints_no_traceback(fs_repo, deep_dirs):
    """Through ``main()``: whatever the restorer does with 10,000 levels, the user sees one line
    and an exit code, not a Python traceback."""
    repo, where = fs_repo
    sid = _chain(repo, 10_000)
    p = kdist_process("snapshot", "restore", "--repo", where, sid[:8], deep_dirs / "dst")
    assert p.returncode in CLEAN_REFUSALS | {exit_codes.FAILURE}, p.stderr
    assert p.stderr.startswith("kdist:") or "could not be restored" in p.stderr


# ---- names and symlinks during restore -----------------------------------------------------

def test_names_with_control_characters_and_raw_bytes_restore_inside_the_target(fs_repo, tmp_path):
    """Control characters are legal in POSIX names: kept as they are, never a way out."""
    repo, where = fs_repo
    names = ["\x1b[31mred\x1b[0m", "new\nline", "cr\rname", "bell\x07", "del\x7f", "tab\tname", " lead-space"]
    spy = Insider(repo)
    entries = [{"name": n, "type": "f", "size": 5} for n in names]
    entries.append({"name": b"latin1-\xe9t\xe9", "type": "f", "size": 5})
    sid = spy.snapshot(spy.directory(sorted(entries, key=lambda e: os.fsencode(e["name"]))))
    dst = tmp_path / "target"
    kdist("snapshot", "restore", "--repo", where, sid[:8], dst, code=0)
    restored = set(os.listdir(os.fsencode(dst)))
    assert restored == {os.fsencode(n) for n in names} | {b"latin1-\xe9t\xe9"}
    assert all(open(os.path.join(os.fsencode(dst), n), "rb").read() == b"owned" for n in restored)
    assert sorted(os.listdir(tmp_path)) == ["repo", "target"]
    listing = subprocess.run(  # a UTF-8 terminal's strict stdout (as en_US.UTF-8 gives); names print as raw bytes
        [sys.executable, "-m", "kdist.cli.main", "snapshot", "ls", "--repo", str(where), sid[:8]],
        capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert listing.returncode == 0 and b"Traceback" not in listing.stderr, listing.stderr
    # raw bytes of a non-UTF-8 name print as they are; control characters print escaped, one line
    # per entry (tests/backup/test_cli_text.py)
    assert b"latin1-\xe9t\xe9" in listing.stdout and b"new\\nline" in listing.stdout
    assert len(listing.stdout.splitlines()) == len(names) + 1 and b"\x1b" not in listing.stdout


@pytest.mark.parametrize("order", ["symlink first", "file first"])
def test_symlink_and_file_of_the_same_name_are_refused(mem_repo, tmp_path, order):
    """The symlink would make the file write through it, outside the target."""
    repo = mem_repo
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    spy = Insider(repo)
    pair = [{"name": "a", "type": "l", "target": str(outside / "victim"), "oid": ""},
            {"name": "a", "type": "f", "size": 5}]
    sid = spy.snapshot(spy.directory(pair if order == "symlink first" else pair[::-1]))
    for policy in ("never", "always", "if-changed"):
        stats = Restorer(repo, overwrite=policy).restore(resolve_snapshot(repo.manifests, sid), str(tmp_path / "t"))
        assert stats.errors == 1 and "duplicate" in stats.error_list[0]["error"]
    assert (outside / "victim").read_bytes() == b"untouched"
    assert list((tmp_path / "t").iterdir()) == []


def test_restoring_a_second_snapshot_through_a_symlink_the_first_left_is_refused(mem_repo, tmp_path):
    """Snapshot A restores a symlink ``sub -> outside``; snapshot B has a directory ``sub`` with a
    file. Restoring A then B into one target must not write B's file through A's symlink."""
    repo = mem_repo
    outside = tmp_path / "outside"
    outside.mkdir()
    spy = Insider(repo)
    a = spy.snapshot(spy.directory([{"name": "sub", "type": "l", "target": str(outside), "oid": ""}]))
    b = spy.snapshot(spy.directory([{"name": "sub", "type": "d", "oid": spy.directory([
        {"name": "planted", "type": "f", "size": 5}])}]))
    dst = tmp_path / "target"
    assert Restorer(repo).restore(resolve_snapshot(repo.manifests, a), str(dst)).symlinks == 1
    for policy in ("never", "always", "if-changed"):
        stats = Restorer(repo, overwrite=policy).restore(resolve_snapshot(repo.manifests, b), str(dst))
        assert stats.errors == 1 and "symlink" in stats.error_list[0]["error"]
    assert list(outside.iterdir()) == []
    # nor may --path reach through the symlink entry
    with pytest.raises(KdistError, match="not in the snapshot"):
        Restorer(repo).restore(resolve_snapshot(repo.manifests, a), str(tmp_path / "t2"), "sub/planted")


@pytest.mark.parametrize("policy", ["never", "always", "if-changed"])
def test_existing_symlink_to_an_identical_file_outside_is_never_written_through(mem_repo, tmp_path, policy):
    """The target holds ``dir/f -> /outside/f`` where the outside file has exactly the size and
    mtime the snapshot records: ``if-changed`` must not take it for the restored file, and no
    policy may write into it."""
    repo = mem_repo
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "f"
    victim.write_bytes(b"VICTIM")
    os.utime(victim, ns=(10**18, 10**18))
    spy = Insider(repo)
    sid = spy.snapshot(spy.directory([{"name": "dir", "type": "d", "mode": 0o755, "oid": spy.directory([
        {"name": "f", "type": "f", "size": 6, "mtime_ns": 10**18, "mode": 0o644, "oid": spy.data(b"stored")}])}]))
    dst = tmp_path / "target"
    (dst / "dir").mkdir(parents=True)
    os.symlink(victim, dst / "dir" / "f")
    stats = Restorer(repo, overwrite=policy).restore(resolve_snapshot(repo.manifests, sid), str(dst))
    assert victim.read_bytes() == b"VICTIM"
    if policy == "never":
        assert stats.skipped_existing == 1 and os.path.islink(dst / "dir" / "f")
    else:  # the symlink itself is replaced by the restored file
        assert stats.errors == 0 and not os.path.islink(dst / "dir" / "f")
        assert (dst / "dir" / "f").read_bytes() == b"stored"


# ---- the CLI as a process ------------------------------------------------------------------

def test_hostile_repositories_give_exit_codes_not_tracebacks(fs_repo, tmp_path):
    """A few of the above through ``python -m kdist.cli.main``, the way a user meets them."""
    repo, where = fs_repo
    spy = Insider(repo)
    spy.snapshot(spy.directory([_entry(uid=2**64 - 1), _entry(name="b", type="l", target="x\0y", oid="")]))
    p = kdist_process("snapshot", "restore", "--repo", where, "latest", tmp_path / "dst")
    assert p.returncode == exit_codes.PARTIAL and "malformed" in p.stderr
    spy.snapshot(spy.directory([]), end="soon")
    p = kdist_process("snapshot", "list", "--repo", where)
    assert p.returncode == exit_codes.CORRUPTION and "malformed (time)" in p.stderr
    repo.storage.put(C.FORMAT_BLOB_NAME, repo.storage.get(C.FORMAT_BLOB_NAME)[:-1])
    p = kdist_process("snapshot", "list", "--repo", where)
    assert p.returncode == exit_codes.CORRUPTION and "format blob" in p.stderr


@pytest.mark.parametrize("payload", [
    {"start": "x", "end": 1.0, "content_gc_completed": True},
    {"start": 1.0, "end": 1.0, "pack_candidates": [["p" + "0" * 32]]},
    {"start": float("inf"), "end": 1.0, "steps": [1]},
], ids=["start str", "pack candidate without size", "start inf, steps list"])
def test_forged_maintenance_record_is_corruption(fs_repo, payload):
    repo, where = fs_repo
    repo.manifests.put({"type": "maintenance-run"}, msgpack.packb(payload))
    kdist("maintenance", "status", "--repo", where, code=exit_codes.CORRUPTION)
    kdist("maintenance", "run", "--repo", where, code=exit_codes.CORRUPTION)
