"""Backup and restore through the library: byte-for-byte trees, incremental reuse, bad input."""

from __future__ import annotations

import os

import msgpack
import pytest

from repo_format import constants as C
from kdist import uploader as uploader_module
from kdist.browse import diff, verify
from kdist.restore import Restorer
from kdist.snapshot import Snapshot, Source, list_snapshots, resolve_snapshot, SnapshotNotFound
from kdist.uploader import BackupOptions, SourceError, Uploader

from kdist_trees import build_tree, reopen, tree_state


def backup(repo, path, **opts):
    return Uploader(repo, BackupOptions(**opts)).backup(str(path))


def test_roundtrip_is_byte_for_byte(repo, storage, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    build_tree(str(src))
    snap = backup(repo, src)
    assert snap.totals["errors"] == 0
    stats = Restorer(reopen(storage)).restore(resolve_snapshot(reopen(storage).manifests, "latest"), str(dst))
    assert stats.errors == 0
    assert tree_state(str(dst)) == tree_state(str(src))
    # the sparse file stays sparse: fewer blocks allocated than its length
    st = os.stat(dst / "sparse")
    assert st.st_size == 2 * 1024 * 1024 + 3 and st.st_blocks * 512 < st.st_size


def test_unchanged_second_backup_reads_nothing_and_stores_no_data_pack(repo, storage, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    first = backup(repo, src)
    packs_before = {m.name for m in storage.list(C.DATA_PACK_PREFIX)}
    opened = []
    real_open = os.open
    monkeypatch.setattr(uploader_module.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    second = backup(reopen(storage), src)
    assert opened == []
    assert second.totals["files_read"] == 0 and second.totals["files_reused"] == first.totals["files"]
    assert {m.name for m in storage.list(C.DATA_PACK_PREFIX)} == packs_before
    assert second.root == first.root


def test_unchanged_directories_are_not_written_again(repo, storage, tmp_path, monkeypatch):
    """An unchanged directory's object is the previous one, reused without encoding it; a change
    deep down rewrites exactly the directories on the path to it, and the tree equals a fresh
    backup's."""
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    first = backup(repo, src)
    encoded = []
    real_encode = uploader_module.encode_directory
    monkeypatch.setattr(uploader_module, "encode_directory", lambda es, top=None, complete=True: (encoded.append(len(es)), real_encode(es, top, complete))[1])
    second = backup(reopen(storage), src)
    assert encoded == [] and second.root == first.root
    (src / "docs" / "deep" / "er" / "new.txt").write_text("new")
    third = backup(reopen(storage), src)
    assert len(encoded) == 4  # er, deep, docs and the root
    fresh = Uploader(reopen(storage), BackupOptions(reuse_previous=False)).backup(str(src))
    assert third.root == fresh.root != first.root
    os.chmod(src / "docs", 0o700)  # metadata of a directory: its parent (the root) changes
    encoded.clear()
    fourth = backup(reopen(storage), src)
    assert len(encoded) == 1 and fourth.root != third.root
    os.remove(src / "docs" / "deep" / "er" / "new.txt")  # a child less: er, deep, docs, root
    encoded.clear()
    fifth = backup(reopen(storage), src)
    assert len(encoded) == 4
    assert fifth.root == Uploader(reopen(storage), BackupOptions(reuse_previous=False)).backup(str(src)).root


def test_one_file_change_stores_only_that_files_new_chunks(repo, storage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    build_tree(str(src))
    backup(repo, src)
    r = reopen(storage)
    before = {e.content_id for e in r.contents.committed}
    big = src / "docs" / "deep" / "er" / "random.bin"
    data = bytearray(big.read_bytes())
    data[150_000:150_010] = b"0123456789"
    big.write_bytes(bytes(data))
    snap = backup(r, src)
    assert snap.totals["files_read"] == 1
    r2 = reopen(storage)
    new_data_ids = {e.content_id for e in r2.contents.committed
                    if e.content_id not in before and e.pack.startswith(C.DATA_PACK_PREFIX)}
    entry = [e for e in r2.objects.chunks(_file_oid(r2, snap, "docs/deep/er/random.bin"))]
    chunk_ids = {c for c, _ in entry}
    assert new_data_ids and new_data_ids <= chunk_ids
    assert len(new_data_ids) < len(chunk_ids)  # the unchanged chunks were deduplicated


def _file_oid(repo, snap, path):
    from kdist.restore import find_subtree
    return find_subtree(repo, snap, path).oid


def test_excludes_and_ignore_file(repo, tmp_path):
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "cache").mkdir()
    (src / "keep" / "a.txt").write_text("a")
    (src / "keep" / "b.tmp").write_text("b")
    (src / "cache" / "c").write_text("c")
    (src / "keep" / ".kdistignore").write_text("# comment\nsecret*\n")
    (src / "keep" / "secret.key").write_text("s")
    snap = backup(repo, src, excludes=["*.tmp", "cache"])
    from kdist.browse import walk
    from kdist.restore import find_subtree
    paths = {p for p, _ in walk(repo, find_subtree(repo, snap, None), "", True)}
    assert paths == {"keep", "keep/a.txt"}


def test_unreadable_file_and_directory_are_reported_and_skipped(repo, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "locked-dir").mkdir(parents=True)
    (src / "ok.txt").write_text("fine")
    (src / "locked.txt").write_text("no")
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path, *a, **k):
        if str(path).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **k)

    def deny_scandir(path):
        if str(path).endswith("locked-dir"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(uploader_module.os, "open", deny_open)
    monkeypatch.setattr(uploader_module.os, "scandir", deny_scandir)
    snap = backup(repo, src)
    assert snap.totals["errors"] == 2
    assert {os.path.basename(e["path"]) for e in snap.errors} == {"locked.txt", "locked-dir"}
    assert all("Permission denied" in e["error"] for e in snap.errors)
    dst = tmp_path / "dst"
    Restorer(repo).restore(snap, str(dst))
    assert (dst / "ok.txt").read_text() == "fine" and not (dst / "locked.txt").exists()


def test_noatime_is_tried_only_where_it_can_work(repo, tmp_path, monkeypatch):
    """O_NOATIME needs the file's ownership (or root): for someone else's files the first open
    would fail every time, so it is not tried."""
    if not uploader_module._NOATIME:
        pytest.skip("this system has no O_NOATIME")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(100 + i))
    (src / "big").write_bytes(os.urandom(200_000))  # read as a stream, through the same open
    flags = []
    real_open = os.open
    monkeypatch.setattr(uploader_module.os, "open", lambda p, f, *a, **k: (flags.append(f), real_open(p, f, *a, **k))[1])
    backup(repo, src)
    assert len(flags) == 4 and all(f & uploader_module._NOATIME for f in flags)  # ours (or root): tried
    flags.clear()
    monkeypatch.setattr(uploader_module, "_EUID", os.stat(src / "f0").st_uid + 1)  # someone else's files
    backup(repo, src, reuse_previous=False)
    assert len(flags) == 4 and not any(f & uploader_module._NOATIME for f in flags)


@pytest.mark.parametrize("lane", ["batched", "pool"])
def test_file_deleted_or_changed_during_backup_is_reported(repo, tmp_path, monkeypatch, lane):
    """Files within one chunk are read whole, in batches by one thread (up to BATCH_FILE_SIZE)
    or each by a pool thread; both report the same changes."""
    if lane == "pool":
        monkeypatch.setattr(uploader_module, "BATCH_FILE_SIZE", 0)
    src = tmp_path / "src"
    src.mkdir()
    (src / "vanishing").write_text("x" * 100)
    (src / "rewritten").write_bytes(os.urandom(1_000))  # within chunk_min: read whole, as one chunk
    (src / "growing-big").write_bytes(os.urandom(100_000))  # read as a stream
    (src / "outgrown").write_bytes(b"small")  # small when walked, a stream when read
    real_open = uploader_module.open_source

    def meddle(path, *owner):
        if path.endswith("vanishing"):
            os.unlink(path)
        if path.endswith("outgrown") and os.path.getsize(path) == 5:
            with open(path, "ab") as f:
                f.write(os.urandom(70_000))
        if path.endswith("rewritten"):  # changed in place after the walk's stat
            with open(path, "r+b") as f:
                f.write(b"more")
            os.utime(path, ns=(0, 10**9))
        return real_open(path, *owner)

    real_write_stream = repo.objects.write_stream

    def grow(stream, *a, **k):
        with open(src / "growing-big", "ab") as f:  # the file changes while it is read
            f.write(b"more")
        return real_write_stream(stream, *a, **k)

    monkeypatch.setattr(uploader_module, "open_source", meddle)
    monkeypatch.setattr(repo.objects, "write_stream", grow)
    snap = backup(repo, src)
    errors = {os.path.basename(e["path"]): e["error"] for e in snap.errors}
    assert "No such file" in errors["vanishing"]
    assert "changed while it was being read" in errors["rewritten"]
    assert "changed while it was being read" in errors["growing-big"]
    assert "outgrown" not in errors  # it grew before it was opened: read whole, consistently
    restored = tmp_path / "restored"
    Restorer(repo).restore(snap, str(restored))
    assert (restored / "outgrown").read_bytes() == (src / "outgrown").read_bytes()
    assert len((restored / "outgrown").read_bytes()) == 70_005


def test_missing_source_is_a_source_error(repo, tmp_path):
    with pytest.raises(SourceError, match="cannot back up"):
        backup(repo, tmp_path / "does-not-exist")


def test_checkpoints_are_written_during_a_backup_and_retired_after(repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
    written = []
    real_put = repo.manifests.put
    repo.manifests.put = lambda labels, payload, **k: written.append(labels["checkpoint"]) or real_put(labels, payload, **k)
    snap = backup(repo, src, checkpoint_interval=1e-9)
    assert written.count("1") >= 1 and written[-1] == "0"
    assert snap.totals["checkpoints"] == written.count("1")
    # checkpoints are tombstoned once the final snapshot exists
    assert [s.id for s in list_snapshots(repo.manifests, include_checkpoints=True)] == [snap.id]


def _craft_snapshot(repo, entries: list[dict]) -> Snapshot:
    """A hostile snapshot: raw directory entries that never passed kdist's own validation."""
    data_oid = repo.objects.write_bytes(b"owned")
    for e in entries:
        e.setdefault("oid", data_oid)
    root = repo.objects.write_bytes(msgpack.packb({"v": 1, "entries": entries}), metadata=True)
    snap = Snapshot(source=Source("h", "u", "/x"), root=root, start=0, end=0)
    rec = repo.manifests.put(snap.labels(), snap.payload())
    snap.id = rec.id
    return snap


@pytest.mark.parametrize("name", ["../escape", "/tmp/absolute", "a/b", "..", ".", "", "nul\x00byte"])
def test_restore_refuses_names_that_escape_the_target(repo, tmp_path, name):
    snap = _craft_snapshot(repo, [{"name": name, "type": "f", "size": 5}])
    dst = tmp_path / "target"
    stats_or_error = None
    try:
        stats_or_error = Restorer(repo).restore(snap, str(dst))
    except Exception as exc:  # refusing the whole directory object is also acceptable
        stats_or_error = exc
    assert not (tmp_path / "escape").exists() and not os.path.exists("/tmp/absolute")
    assert list(dst.iterdir()) == []
    if not isinstance(stats_or_error, Exception):
        assert stats_or_error.errors == 1
        assert "unsafe name" in stats_or_error.error_list[0]["error"]


def test_restore_refuses_a_symlink_and_a_directory_of_the_same_name(repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sub = repo.objects.write_bytes(msgpack.packb({"v": 1, "entries": [
        {"name": "planted", "type": "f", "size": 5, "oid": repo.objects.write_bytes(b"owned")}]}), metadata=True)
    snap = _craft_snapshot(repo, [
        {"name": "link", "type": "l", "target": str(outside), "oid": ""},
        {"name": "link", "type": "d", "oid": sub},
    ])
    stats = Restorer(repo).restore(snap, str(tmp_path / "target"))
    assert stats.errors == 1 and "duplicate" in stats.error_list[0]["error"]
    assert list(outside.iterdir()) == []


def test_restore_never_follows_an_existing_symlink_in_the_target(repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "target"
    dst.mkdir()
    os.symlink(outside, dst / "sub")
    sub = repo.objects.write_bytes(msgpack.packb({"v": 1, "entries": [
        {"name": "planted", "type": "f", "size": 5, "oid": repo.objects.write_bytes(b"owned")}]}), metadata=True)
    snap = _craft_snapshot(repo, [{"name": "sub", "type": "d", "oid": sub}])
    for policy in ("never", "always"):
        stats = Restorer(repo, overwrite=policy).restore(snap, str(dst))
        assert stats.errors == 1 and "symlink" in stats.error_list[0]["error"]
        assert list(outside.iterdir()) == []


def test_overwrite_policies(repo, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("new content")
    snap = backup(repo, src)
    dst.mkdir()
    (dst / "f").write_text("old")
    assert Restorer(repo, overwrite="never").restore(snap, str(dst)).skipped_existing == 1
    assert (dst / "f").read_text() == "old"
    Restorer(repo, overwrite="if-changed").restore(snap, str(dst))
    assert (dst / "f").read_text() == "new content"
    assert Restorer(repo, overwrite="if-changed").restore(snap, str(dst)).skipped_existing == 1
    os.symlink(tmp_path / "elsewhere", dst / "g")
    (src / "g").write_text("g")
    snap2 = backup(repo, src)
    Restorer(repo, overwrite="always").restore(snap2, str(dst))
    assert not os.path.islink(dst / "g") and (dst / "g").read_text() == "g"
    assert not (tmp_path / "elsewhere").exists()


def test_corrupted_pack_fails_only_the_files_in_it(repo, storage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    snap = backup(repo, src)
    r = reopen(storage)
    victim = next(e for e in r.contents.committed if e.pack.startswith(C.DATA_PACK_PREFIX))
    blob = bytearray(storage.get(victim.pack))
    blob[victim.offset + 20] ^= 0xFF
    storage.put(victim.pack, bytes(blob))
    dst = tmp_path / "dst"
    stats = Restorer(r).restore(snap, str(dst))
    assert 1 <= stats.errors < 6
    assert all("failed authentication" in e["error"] for e in stats.error_list)
    failed = {os.path.basename(e["path"]) for e in stats.error_list}
    for i in range(6):
        name = f"f{i}"
        if name in failed:
            assert not (dst / name).exists()  # no partial file left looking complete
        else:
            assert (dst / name).read_bytes() == (src / name).read_bytes()
    report = verify(r, snap.root)
    assert {os.path.basename(p["path"]) for p in report.problems} == failed


def test_diff_and_latest(repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("1")
    (src / "b").write_text("2")
    s1 = backup(repo, src)
    (src / "a").write_text("changed")
    (src / "b").unlink()
    (src / "c").mkdir()
    (src / "c" / "d").write_text("4")
    s2 = backup(repo, src)
    assert diff(repo, s1.root, s2.root) == [("M", "a"), ("-", "b"), ("+", "c"), ("+", "c/d")]
    assert resolve_snapshot(repo.manifests, "latest").id == s2.id
    assert resolve_snapshot(repo.manifests, s1.id[:10]).id == s1.id
    with pytest.raises(SnapshotNotFound, match="no snapshot"):
        resolve_snapshot(repo.manifests, "ffffffffffff")
    with pytest.raises(SnapshotNotFound, match="no snapshot"):
        resolve_snapshot(repo.manifests, "")
    for suffix in ("1", "2"):
        repo.manifests.put(s1.labels(), s1.payload(), manifest_id="abcd" + suffix * 28)
    with pytest.raises(SnapshotNotFound, match="ambiguous"):
        resolve_snapshot(repo.manifests, "abcd")
    assert resolve_snapshot(repo.manifests, "abcd1").id == "abcd" + "1" * 28
