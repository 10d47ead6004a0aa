"""A format 3 repository (SPEC.md section 4a) backs up, deduplicates across hosts,
restores, checks and reads back with convergent content records: references carry the seed
that opens each record, no plaintext is stored, and check certifies records it cannot open.
The simulator runs maintenance on it (tests/simulation, ``format_version=3``)."""

from __future__ import annotations

import os

import pytest

from kdist.check import check_repository
from kdist.restore import Restorer
from kdist.snapshot import read_directory
from kdist.uploader import BackupOptions, Uploader
from repo_format import constants as C
from repo_format.crypto import KdfParams
from repo_format.errors import KdistError, UnsupportedVersion
from repo_format.format_blob import RepositoryParameters
from repo_format.repository import Repository
from repo_format.storage.memory import MemoryStorage
from repo_format.storage.wrappers import AppendOnlyStorage

from kdist_trees import PASSWORD, build_tree, tree_state

SMALL = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_avg=16 * 1024,
                             chunk_min=4 * 1024, chunk_max=64 * 1024)


@pytest.fixture
def format3():
    storage = MemoryStorage()
    Repository.create(storage, PASSWORD, SMALL, KdfParams.weak_for_tests(), version=3).close()
    return storage


def _backup(storage, src, host):
    repo = Repository.open(AppendOnlyStorage(storage), PASSWORD)
    try:
        snap = Uploader(repo, BackupOptions(host=host)).backup(str(src))
        assert snap.totals["errors"] == 0
        return snap, repo.contents.stats
    finally:
        repo.close()


def test_two_hosts_back_up_deduplicate_and_restore(format3, tmp_path):
    storage = format3
    marker = os.urandom(4096)  # incompressible: stored as is, were it stored in the clear
    shared = os.urandom(300 * 1024)
    for host in ("alice", "bob"):
        src = tmp_path / host
        build_tree(src, big_size=1024)
        (src / "shared").write_bytes(shared)
        (src / "marker").write_bytes(marker if host == "alice" else b"")
        (src / "empty").write_bytes(b"")
    a, _stats = _backup(storage, tmp_path / "alice", "alice")
    b, bob_writes = _backup(storage, tmp_path / "bob", "bob")
    assert bob_writes.bytes_original < len(shared) // 2  # the shared file's chunks: stored by alice

    repo = Repository.open(storage, PASSWORD)
    assert repo.format.version == 3 and repo.contents.records.ref_size == 64
    entries = {e.name: e for e in read_directory(repo.objects, a.root)}
    assert len(entries["marker"].oid.lstrip("I")) == 128  # id and seed
    bobs = {e.name: e for e in read_directory(repo.objects, b.root)}
    # the shared file's chunks are one set of records; its chunk lists are each host's own
    # (SPEC.md section 4a: trees converge under their host's tree key)
    assert repo.objects.chunks(entries["shared"].oid) == repo.objects.chunks(bobs["shared"].oid)
    assert entries["shared"].oid != bobs["shared"].oid
    for host, snap in (("alice", a), ("bob", b)):
        stats = Restorer(repo).restore(snap, str(tmp_path / f"{host}-restored"))
        assert stats.errors == 0
        assert tree_state(str(tmp_path / f"{host}-restored")) == tree_state(str(tmp_path / host))
    assert not any(marker[1000:1064] in storage.get(m.name) for m in storage.list(""))

    report = check_repository(storage, repo.format, read_data=100, seed=1)
    assert report.healthy, report.problems[:3]
    assert report.counts["contents_read"] > 0
    repo.close()


def test_check_names_a_damaged_record_it_cannot_open(format3, tmp_path):
    storage = format3
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(20_000))
    _backup(storage, src, "alice")
    repo = Repository.open(storage, PASSWORD)
    data_pack = next(m.name for m in storage.list(C.DATA_PACK_PREFIX))
    blob = bytearray(storage.get(data_pack))
    blob[100] ^= 1
    storage.delete(data_pack)
    storage.put(data_pack, bytes(blob))
    report = check_repository(storage, repo.format, read_data=100, seed=1)
    assert any(p.kind == "content" and "does not match its record" in p.message for p in report.problems)
    repo.close()


def test_repair_stores_lost_contents_again_from_the_source(format3, tmp_path):
    """Repair finds a lost content in the source by its id, which format 3 gets by sealing."""
    from kdist.repair import repair_repository

    storage = format3
    src = tmp_path / "src"
    build_tree(src, big_size=50_000)
    snap, _stats = _backup(storage, src, "alice")
    for m in storage.list(C.DATA_PACK_PREFIX):
        storage.delete(m.name)
    repo = Repository.open(storage, PASSWORD)
    assert not check_repository(storage, repo.format).healthy
    report = repair_repository(storage, repo.format, source=str(src))
    assert report.reuploaded > 0 and report.still_missing == 0
    repo.close()
    repo = Repository.open(storage, PASSWORD)
    assert Restorer(repo).restore(snap, str(tmp_path / "restored")).errors == 0
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(src))
    repo.close()


@pytest.mark.parametrize("by_tree_key", [True, False], ids=["host-tree-keys", "mutation-fleet-key-only"])
def test_repair_finds_a_lost_chunk_list_under_its_hosts_tree_key(format3, tmp_path, monkeypatch, by_tree_key):
    """A chunk list converges under its host's tree key (SPEC.md section 4a): repair, looking
    for lost contents in a source, seals the source's chunk lists under each snapshot host's
    key. Under the fleet's convergence key alone it would never find it."""
    from kdist.repair import repair_repository
    from repo_format.sealed_payloads import PayloadKeys

    storage = format3
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(300_000))  # many chunks: a chunk list
    _backup(storage, src, "alice")
    (src / "new").write_bytes(b"a new root directory, in a pack of its own")
    snap, _stats = _backup(storage, src, "alice")
    repo = Repository.open(storage, PASSWORD)
    big = {e.name: e for e in read_directory(repo.objects, snap.root)}["big"]
    indirect, ref = repo.objects.parse(big.oid)
    cid = ref[:C.CONTENT_ID_SIZE]
    lost = repo.contents.index.lookup(cid).pack
    assert indirect and repo.contents.index.lookup(repo.objects.parse(snap.root)[1][:C.CONTENT_ID_SIZE]).pack != lost
    storage.delete(lost)
    repo.close()
    if not by_tree_key:
        monkeypatch.setattr(PayloadKeys, "tree_key", lambda self, host, generation=0: None)
    repo = Repository.open(storage, PASSWORD)
    report = repair_repository(storage, repo.format, source=str(src))
    repo.close()
    assert cid in report.before.missing
    assert (cid in report.after.missing) != by_tree_key
    assert any("no tree key" in n for n in report.notes) != by_tree_key  # (as a maintenance key's repair says)


@pytest.mark.parametrize("bad", ["wrong-seed", "format-2-size", "format-3-size-in-format-2"])
def test_check_with_read_data_opens_records_with_the_references_snapshots_hold(format3, tmp_path, bad):
    """A file whose reference names a stored record but does not open it (another seed), or has
    the other format's size: restore fails on it, so check must not call the repository healthy."""
    from kdist.snapshot import Entry, Snapshot, Source, encode_directory

    if bad == "format-3-size-in-format-2":
        format3 = MemoryStorage()
        Repository.create(format3, PASSWORD, SMALL, KdfParams.weak_for_tests()).close()
    repo = Repository.open(format3, PASSWORD)
    good = repo.objects.write_bytes(b"hello world")
    oid = {"wrong-seed": good[:64] + "00" * 32, "format-2-size": good[:64],
           "format-3-size-in-format-2": good + "00" * 32}[bad]
    root = repo.objects.write_bytes(encode_directory([Entry("f", "f", size=11, oid=oid, mode=0o644)]),
                                    metadata=True)
    repo.flush()
    snap = Snapshot(source=Source("h", "u", "/x"), root=root, start=1.0, end=2.0)
    repo.manifests.put(snap.labels(), snap.payload())
    repo.close()
    repo = Repository.open(format3, PASSWORD)
    assert Restorer(repo).restore(snap, str(tmp_path / "dst")).errors == 1
    report = check_repository(format3, repo.format, read_data=100, seed=1)
    assert not report.healthy
    said = "does not open with its reference's seed" if bad == "wrong-seed" else "malformed"
    assert any(said in p.message for p in report.problems), report.problems
    repo.close()


def test_only_admin_keys_hold_the_master_key(format3, tmp_path):
    """Format 3 needs the master key for no content record: host and maintenance key slots hold
    the hash and fleet secrets only, and a host still backs up and restores."""
    from kdist.keys import add_key
    from repo_format.keyslots import ADMIN, HOST, MAINTENANCE, open_slot, slot_name

    admin = Repository.open(format3, PASSWORD)
    assert admin.format.keys.master_key is not None and admin.format.keys.fleet_secret is not None
    slots = {role: add_key(admin, f"{role}-pw", role, "alice" if role == HOST else "",
                           kdf=KdfParams.weak_for_tests()).slot for role in (ADMIN, MAINTENANCE, HOST)}
    for role, slot in slots.items():
        payload = open_slot(admin.format.unique_id, slot_name(slot), format3.get(slot_name(slot)), f"{role}-pw")
        assert ("master_key" in payload) == (role == ADMIN)
        assert payload["fleet_secret"] == admin.format.keys.fleet_secret
    host = Repository.open(AppendOnlyStorage(format3), f"{HOST}-pw", key_id=slots[HOST])
    assert host.format.keys.master_key is None
    with pytest.raises(KdistError, match="no content key"):
        host.format.keys.content_aead()
    src = tmp_path / "src"
    build_tree(src, big_size=10_000)
    snap = Uploader(host, BackupOptions(host="alice")).backup(str(src))
    assert Restorer(host).restore(snap, str(tmp_path / "mine")).errors == 0
    host.close()
    assert Restorer(admin).restore(snap, str(tmp_path / "admin")).errors == 0
    assert tree_state(str(tmp_path / "mine")) == tree_state(str(tmp_path / "admin")) == tree_state(str(src))
    admin.close()


@pytest.mark.parametrize("hints", [True, False], ids=["by-seed", "mutation-without-the-previous-references"])
def test_a_changed_file_seals_only_its_changed_chunks(format3, tmp_path, monkeypatch, hints):
    """Format 3 must seal a content to learn its id: the unchanged chunks of a changed file are
    found instead by the seeds of its previous version's references (a keyed hash each)."""
    from repo_format.convergent import ConvergentRecords
    from repo_format.objects import ObjectStore

    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(2 * 2**20))
    (src / "disk.img").write_bytes(data)
    _backup(format3, src, "alice")
    data[2**20:2**20 + 100] = os.urandom(100)
    (src / "disk.img").write_bytes(data)
    if not hints:
        monkeypatch.setattr(ObjectStore, "known_chunks", lambda self, oid: None)
    sealed = []
    real_seal = ConvergentRecords.seal
    monkeypatch.setattr(ConvergentRecords, "seal", lambda self, d, level, ref=None: sealed.append(len(d)) or
                        real_seal(self, d, level))
    snap, stats = _backup(format3, src, "alice")
    data_chunks = [n for n in sealed if n >= SMALL.chunk_min]
    assert stats.bytes_original < 4 * SMALL.chunk_max  # in both: only the changed chunks are stored
    assert (len(data_chunks) <= 4) == hints, sealed
    repo = Repository.open(format3, PASSWORD)
    assert Restorer(repo).restore(snap, str(tmp_path / "dst")).errors == 0
    assert (tmp_path / "dst" / "disk.img").read_bytes() == bytes(data)
    repo.close()


def test_check_names_a_snapshot_sealed_to_none_of_the_readers(format3, tmp_path):
    """A host's record that the readers cannot open is left out of maintenance's view (only what
    that snapshot alone reaches is at stake): an admin's check says so."""
    from kdist.keys import add_key
    from repo_format.sealed_payloads import PayloadKeys

    admin = Repository.open(format3, PASSWORD)
    slot = add_key(admin, "alice-pw", "host", "alice", kdf=KdfParams.weak_for_tests()).slot
    alice = Repository.open(AppendOnlyStorage(format3), "alice-pw", key_id=slot)
    keys = alice.manifests.payload_keys
    alice.manifests.payload_keys = PayloadKeys(keys.host_public("alice"), keys.privates, "alice")  # herself only
    src = tmp_path / "src"
    build_tree(src, big_size=1000)
    snap = Uploader(alice, BackupOptions(host="alice")).backup(str(src))
    alice.close()
    report = check_repository(format3, admin.format)
    assert any(p.kind == "snapshot" and snap.id in p.message and "none of the readers" in p.message
               for p in report.problems), report.problems
    admin.close()


def test_no_blob_holds_a_format_3_secret_in_the_clear(format3, tmp_path):
    """The fleet secret, the master key, the hash secret, their subkeys, the payload and tree keys are
    stored sealed only (the format blob, key slots): no blob holds one in the clear."""
    from kdist.keys import add_key
    from repo_format.crypto import derive_subkey
    from repo_format.convergent import tree_key
    from repo_format.sealed_payloads import host_private, readers_private

    admin = Repository.open(format3, PASSWORD)
    k = admin.format.keys
    slot = add_key(admin, "alice-pw", "host", "alice", kdf=KdfParams.weak_for_tests()).slot
    alice = Repository.open(AppendOnlyStorage(format3), "alice-pw", key_id=slot)
    src = tmp_path / "src"
    build_tree(src, big_size=5000)
    Uploader(alice, BackupOptions(host="alice")).backup(str(src))
    alice.close()
    found = {"master key": k.master_key, "fleet secret": k.fleet_secret, "hash secret": k.hash_secret,
             "readers' payload key": readers_private(k.master_key),
             "alice's payload key": host_private(k.master_key, "alice"),
             "alice's tree key": tree_key(k.master_key, "alice")}
    for info in (C.HKDF_INFO_INDEX, C.HKDF_INFO_MANIFEST, C.HKDF_INFO_NAME, C.HKDF_INFO_RECORD_ID,
                 C.HKDF_INFO_CONVERGENCE):
        found[info.decode()] = derive_subkey(k.hash_secret if b"v3" in info else k.fleet_secret, info)
    blobs = {m.name: format3.get(m.name) for m in format3.list("")}
    assert any(n.startswith(C.KEY_SLOT_PREFIX) for n in blobs) and len(blobs) > 10
    for name, data in blobs.items():
        for what, secret in found.items():
            assert secret not in data and secret.hex().encode() not in data, f"the {what} is in blob {name}"
    admin.close()
