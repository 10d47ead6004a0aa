"""Index sets in a signed repository: each rule that keeps a host's sets from counting, shown
to matter by switching it off (the attacks on a whole fleet are in test_hostile_host.py)."""

from __future__ import annotations

import os
import secrets

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from test_hostile_host import SAFETY, Fleet  # noqa: E402

from repo_format import constants as C  # noqa: E402
from repo_format.epoch import EpochView  # noqa: E402
from repo_format.errors import CorruptionError, KdistError  # noqa: E402
from repo_format.index import IndexEntry, encode_index, seal_index  # noqa: E402

from kdist.check import check_repository  # noqa: E402


@pytest.fixture
def fleet(tmp_path, ticking_time):
    return Fleet(tmp_path, ticking_time)


def entry(n: int, pack: str = "p" + "0" * 32 + "-" + "1" * 16) -> IndexEntry:
    return IndexEntry(bytes([n]) * 32, pack, 0, 10, 10, 0, 1_000_000 + n)


def ids(repo) -> set[bytes]:
    return {e.content_id for e in repo.contents.epochs.load_index()}


def test_a_host_key_writes_no_set(fleet):
    with pytest.raises(KdistError, match="only the root and maintenance keys may write index sets"):
        fleet.open("alice").contents.epochs.write_set(C.COMPACTED_PREFIX, 0, [entry(1)])


def test_a_member_other_than_the_signed_one_is_refused(fleet, monkeypatch):
    """Storage that let someone replace a member after maintenance signed the set: readers refuse
    the blob (without the digest check they would read the stranger's entries)."""
    maint = fleet.open("maint")
    st = maint.contents.epochs.write_set(C.RANGE_PREFIX, 0, [entry(1)])
    name = st.names()[0]
    fleet.storage.put(name, seal_index(maint.contents.epochs._aead, name, encode_index([entry(2)])))
    with pytest.raises(CorruptionError, match=f"index set member {name} is not the blob its set's signature names"):
        fleet.open("bob").contents.epochs.load_index()
    monkeypatch.setattr(EpochView, "digests", lambda self: {})
    assert bytes([2]) * 32 in ids(fleet.open("bob"))


def test_a_member_of_another_count_displaces_no_set(fleet, monkeypatch):
    """A two-member set, and alice's one-member set under the same id (listed first): the signed
    set still counts, alice's does not, and names that spell a number otherwise are no set."""
    monkeypatch.setattr(C, "INDEX_BLOB_MAX_ENTRIES", 1)
    maint = fleet.open("maint")
    epoch = maint.contents.epochs.refresh().current + 50  # a range above everything
    st = maint.contents.epochs.write_set(C.RANGE_PREFIX, epoch, [entry(1), entry(2)])
    assert st.count == 2
    alice = fleet.open("alice")
    for name in (f"{C.RANGE_PREFIX}{epoch}_{st.set_id}_0of1", f"{C.RANGE_PREFIX}0{epoch}_{st.set_id}_0of2",
                 f"{C.RANGE_PREFIX}{epoch}_{st.set_id}_00of2"):
        alice.storage.put(name, seal_index(alice.contents.epochs._aead, name, encode_index([])))
    view = fleet.open("bob").contents.epochs.refresh()
    assert view.best_range().names() == st.names()
    assert [(s.set_id, s.count) for s in view.ignored_sets] == [(st.set_id, 1)]
    assert ids(fleet.open("bob")) == {bytes([1]) * 32, bytes([2]) * 32}


def test_a_taken_member_name_abandons_the_set(fleet, monkeypatch):
    """A set whose member name someone took first is never signed: it does not count."""
    maint = fleet.open("maint")
    storage = maint.contents.epochs.storage
    real = storage.put_if_absent
    monkeypatch.setattr(storage, "put_if_absent", lambda name, data: not name.endswith("_1of2") and real(name, data))
    monkeypatch.setattr(C, "INDEX_BLOB_MAX_ENTRIES", 1)
    with pytest.raises(KdistError, match="exists already: the set is abandoned"):
        maint.contents.epochs.write_set(C.RANGE_PREFIX, 99, [entry(1), entry(2)])
    assert not [m for m in fleet.storage.list(C.RANGE_PREFIX) if C.SET_SIGNATURE_INFIX in m.name]


def test_sets_from_before_signed_sets_are_signed_and_later_unsigned_ones_do_not_count(fleet):
    """A signed repository made before signed sets (no ``xv_`` blob): its unsigned set counts; the
    first maintenance run with signed sets signs it before it puts the signed-sets blob (so no
    rule depends on when a blob was stored), and an unsigned set stored after does not count;
    ``repo check`` names that one."""
    for m in fleet.storage.list(C.SIGNED_SETS_PREFIX):
        fleet.storage.delete(m.name)
    maint = fleet.open("maint")

    def unsigned_range(epoch: int, entries: list) -> str:  # as kdist before signed sets wrote one
        name = f"{C.RANGE_PREFIX}{epoch}_{secrets.token_hex(8)}_0of1"
        fleet.storage.put(name, seal_index(maint.contents.epochs._aead, name, encode_index(entries)))
        return name

    old = unsigned_range(40, [entry(1)])
    assert fleet.open("bob").contents.epochs.refresh().best_range().names() == [old]
    epochs = maint.contents.epochs
    assert epochs.sign_epochs(epochs.refresh())  # what a maintenance run does first
    late = unsigned_range(41, [])
    fleet.t[0] += SAFETY.cleanup_margin
    view = fleet.open("bob").contents.epochs.refresh()
    assert view.signed_sets and view.best_range().names() == [old] and view.best_range().digests
    assert [s.names() for s in view.ignored_sets] == [[late]]
    assert bytes([1]) * 32 in ids(fleet.open("bob"))
    forgeries = [p.message for p in check_repository(fleet.storage, maint.format).problems if p.kind == "forgery"]
    assert any(late.rsplit("_", 1)[0] in f for f in forgeries), forgeries
    assert not any(old.rsplit("_", 1)[0] in f for f in forgeries)


def test_a_set_loses_its_signatures_before_its_members(fleet):
    """Deleting a set deletes its signatures first, and none of its members while a signature
    stays (Object Lock refused it): a signature listed over members that are gone would vouch
    for whatever a host puts under their names, which readers then refuse as corrupt."""
    from kdist.gc.index_maintenance import _delete_in_order

    maint = fleet.open("maint")
    st = maint.contents.epochs.write_set(C.RANGE_PREFIX, 60, [entry(1)])
    view = maint.contents.epochs.refresh()
    listed = view.best_range()
    assert listed.blobs()[0] == listed.signature and listed.signature.name == st.signature.name
    kept = _delete_in_order(listed.blobs(), lambda name, t: C.SET_SIGNATURE_INFIX not in name)  # the lock
    assert kept == listed.blobs()
    for name in st.names():  # had the members gone first, alice could put others under their names
        fleet.storage.delete(name)
        fleet.storage.put(name, seal_index(maint.contents.epochs._aead, name, encode_index([entry(9)])))
    with pytest.raises(CorruptionError, match="is not the blob its set's signature names"):
        fleet.open("bob").contents.epochs.load_index()


def test_maintenance_reclaims_sets_that_do_not_count(fleet):
    """alice's sets and a stray signature are deleted a cleanup margin after they were stored;
    maintenance's own signed sets stay in use."""
    alice = fleet.open("alice")
    forged = f"{C.COMPACTED_PREFIX}0_{secrets.token_hex(8)}_0of1"
    alice.storage.put(forged, seal_index(alice.contents.epochs._aead, forged, encode_index([])))
    stray = f"{C.RANGE_PREFIX}7_{secrets.token_hex(8)}{C.SET_SIGNATURE_INFIX}{secrets.token_hex(8)}"
    alice.storage.put(stray, b"\x80")
    fleet.gc_cycles()
    left = {m.name for m in fleet.storage.list(C.INDEX_FAMILY_PREFIX)}
    assert forged not in left and stray not in left
    view = fleet.open("bob").contents.epochs.refresh()
    assert view.best_range() is not None and view.best_range().digests is not None
    fleet.assert_intact()
