"""Metadata a restore gives back bit for bit: hard links (as links, within the restored tree),
extended attributes in every namespace (user.*, ACLs, file capabilities and trusted.* as root),
and the top-level directory's own mode, owner, attributes and times. The suite runs as root in
CI, where every item is covered; as another user the root-only parts are left out of the tree."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

import msgpack
import pytest

from repo_format.errors import CorruptionError

from kdist.restore import Restorer, find_subtree
from kdist.restore_plan import plan_restore, writable_xattrs
from kdist.snapshot import (
    DIR_VERSION, DIR_VERSION_LINKS, DIR_VERSION_SPECIAL, Entry, decode_listing, encode_directory, read_directory,
    read_listing,
)
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import (
    CAPABILITY, FILE_ACL, ROOT, TOP_MTIME, cli_env, full_metadata, rich_tree, run_cli, without_socket,
)

def test_round_trip_is_exact_top_level_directory_included(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "restored" / "here"
    rich_tree(src)
    before = full_metadata(src)
    args = ["--repo", str(tmp_path / "repo")]
    run_cli("repo", "create", *args)
    out = json.loads(run_cli("snapshot", "create", *args, src, "--json").stdout)[0]  # exit 0: fifo and socket
    assert out["totals"]["errors"] == 0
    got = json.loads(run_cli("snapshot", "restore", *args, "latest", dst, "--json").stdout)
    assert got["errors"] == 0 and got["hardlinks"] == 3 and got["xattrs_skipped"] == 0
    nodes, groups = full_metadata(dst)
    want_nodes, want_groups = without_socket(before)
    assert groups == want_groups == [["a", "b", "sub/a-again"], ["c-link", "sub/c"]]
    assert nodes == want_nodes  # every mode, owner, mtime, attribute, ACL and capability; "." too
    assert nodes["."]["mode"] == 0o700 and nodes["."]["mtime_ns"] == TOP_MTIME
    assert os.stat(dst / "disk.img").st_blocks == os.stat(src / "disk.img").st_blocks  # the same holes
    if ROOT:
        assert (nodes["."]["uid"], nodes["."]["gid"]) == (4321, 8765)
        assert ("security.capability", CAPABILITY) in nodes["ping"]["xattrs"]
    assert full_metadata(src) == before  # the backup changed nothing in the source
    again = json.loads(run_cli("snapshot", "restore", *args, "latest", dst, "--json").stdout)
    assert again["files"] == 0 and again["hardlinks"] == 0 and again["errors"] == 0  # it all matches already
    assert full_metadata(dst) == (nodes, groups)


def test_a_directory_restored_into_a_new_target_gives_it_its_metadata_an_existing_one_keeps_its_own(repo, tmp_path):
    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    Restorer(repo).restore(snap, str(tmp_path / "new"), "sub")
    sub = full_metadata(src / "sub")[0]["."]
    assert full_metadata(tmp_path / "new")[0]["."] == sub
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    Restorer(repo).restore(snap, str(existing))
    st = os.stat(existing)
    assert st.st_mode & 0o7777 == 0o755 and os.listxattr(existing) == []  # it may be /tmp: left as it is
    assert (existing / "a").read_bytes() == b"linked data\n"


def test_the_root_object_changes_when_only_the_top_directory_does(repo, tmp_path):
    """A root whose children are all as before is reused only if its own metadata is too."""
    src = tmp_path / "src"
    rich_tree(src)
    first = Uploader(repo, BackupOptions()).backup(str(src))
    same = Uploader(repo, BackupOptions()).backup(str(src))
    assert same.root == first.root
    os.chmod(src, 0o750)
    os.utime(src, ns=(TOP_MTIME, TOP_MTIME))
    changed = Uploader(repo, BackupOptions()).backup(str(src))
    assert changed.root != first.root
    assert read_listing(repo.objects, changed.root).top.mode == 0o750
    Restorer(repo).restore(changed, str(tmp_path / "dst"))
    assert os.stat(tmp_path / "dst").st_mode & 0o7777 == 0o750


def _old_writer(data: bytes) -> bytes:
    """A directory object as kdist before attributes and links wrote it."""
    doc = msgpack.unpackb(data, raw=False)
    for e in doc["entries"]:
        e.pop("xattrs", None)
        e.pop("dev", None)
    doc.pop("x")
    doc.pop("self", None)
    doc["v"] = DIR_VERSION_SPECIAL if any(e["type"] in "psbc" for e in doc["entries"]) else DIR_VERSION
    return msgpack.packb(doc, use_bin_type=True)


def test_a_snapshot_from_before_attributes_is_followed_by_one_that_has_them(repo, tmp_path, monkeypatch):
    """Unchanged files of a previous snapshot whose writer did not record attributes and links
    are taken with their data (not read again) but not with its entries' metadata."""
    import kdist.uploader as uploader

    src = tmp_path / "src"
    rich_tree(src)
    with monkeypatch.context() as m:
        m.setattr(uploader, "encode_directory", lambda entries, top=None, complete=True: _old_writer(encode_directory(entries, top)))
        old = Uploader(repo, BackupOptions()).backup(str(src))
    assert not read_listing(repo.objects, old.root).complete
    assert all(not e.xattrs and not e.dev for e in read_directory(repo.objects, old.root))
    up = Uploader(repo, BackupOptions())
    new = up.backup(str(src))
    assert up.stats.files_read == 0 and up.stats.files_reused == up.stats.files  # no data read again
    listing = read_listing(repo.objects, new.root)
    entries = {e.name: e for e in listing.entries}
    assert listing.complete and listing.top.xattrs == [(b"user.top", b"the top directory's own")]
    assert (b"user.linked", b"on every link") in entries["a"].xattrs
    assert entries["a"].dev == entries["b"].dev == os.stat(src / "a").st_dev
    Restorer(repo).restore(new, str(tmp_path / "dst"))
    assert full_metadata(tmp_path / "dst") == without_socket(full_metadata(src))


def test_a_link_group_whose_first_file_is_left_different_gets_the_data_not_a_link_to_it(repo, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    Restorer(repo).restore(snap, str(dst))
    os.unlink(dst / "a")
    (dst / "a").write_bytes(b"someone else's\n")
    os.unlink(dst / "b")
    plan = plan_restore(repo, find_subtree(repo, snap, None), str(dst), "never")
    stats = Restorer(repo, overwrite="never").restore(snap, str(dst))
    assert stats.left_different == 2  # "a" differs; "sub/a-again" is not a link to what is there now
    assert [c for c in plan.changes if c[0] != "not made"] == [("left", "a"), ("create", "b"), ("left", "sub/a-again")]
    assert (dst / "a").read_bytes() == b"someone else's\n"
    assert (dst / "b").read_bytes() == b"linked data\n"
    assert os.stat(dst / "b").st_ino != os.stat(dst / "a").st_ino
    stats = Restorer(repo).restore(snap, str(dst))  # if-changed: the target is made to match
    assert stats.errors == 0
    nodes, groups = full_metadata(dst)
    want_nodes, want_groups = without_socket(full_metadata(src))
    assert groups == want_groups
    assert {k: v for k, v in nodes.items() if k != "."} == {k: v for k, v in want_nodes.items() if k != "."}


def test_links_whose_first_file_cannot_be_restored_still_get_the_data(repo, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    (dst / "a").mkdir(parents=True)  # the first of the group is blocked by a directory
    stats = Restorer(repo).restore(snap, str(dst))
    assert [e["path"] for e in stats.error_list] == [str(dst / "a")]
    assert (dst / "b").read_bytes() == (dst / "sub" / "a-again").read_bytes() == b"linked data\n"
    assert os.stat(dst / "b").st_ino == os.stat(dst / "sub" / "a-again").st_ino


def test_attributes_this_user_may_not_write_are_counted_and_those_that_fail_reported(repo, tmp_path, monkeypatch):
    e = Entry("f", "f", xattrs=[(b"security.capability", CAPABILITY), (b"system.posix_acl_access", FILE_ACL),
                                (b"trusted.k", b"v"), (b"user.a", b"1")])
    assert writable_xattrs(e, owner=True) == (e.xattrs, 0)
    assert writable_xattrs(e, owner=False) == ([(b"system.posix_acl_access", FILE_ACL), (b"user.a", b"1")], 2)
    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    real = os.setxattr

    def no_user_namespace(node, name, value, *a, **kw):
        if (name if isinstance(name, str) else os.fsdecode(name)).startswith("user."):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        return real(node, name, value, *a, **kw)

    monkeypatch.setattr(os, "setxattr", no_user_namespace)
    stats = Restorer(repo).restore(snap, str(tmp_path / "dst"))
    failed = sorted((os.path.relpath(x["path"], tmp_path / "dst"), x["error"]) for x in stats.error_list)
    assert failed == [(".", "cannot set extended attribute user.top: Operation not supported"),
                      ("a", "cannot set extended attribute user.linked: Operation not supported"),
                      ("plain", "cannot set extended attribute user.big: Operation not supported"),
                      ("plain", "cannot set extended attribute user.note: Operation not supported"),
                      ("sub", "cannot set extended attribute user.dir: Operation not supported")]
    assert (tmp_path / "dst" / "plain").read_bytes() == b"plain\n"  # the file itself is restored
    assert os.getxattr(tmp_path / "dst" / "acl", "system.posix_acl_access") == FILE_ACL


def test_dump_writes_links_as_links_and_attributes_as_pax_records(repo, tmp_path):
    from kdist.find import write_tar
    from kdist.restore import find_subtree

    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    buf = io.BytesIO()
    write_tar(repo, find_subtree(repo, snap, None), "", buf)
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(buf.getvalue()))}
    links = {n: m.linkname for n, m in members.items() if m.islnk()}
    assert links == {"b": "a", "c-link": "sub/c", "sub/a-again": "a"} or links == {
        "b": "a", "sub/c": "c-link", "sub/a-again": "a"}
    headers = members["plain"].pax_headers
    assert headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == b"\x00binary\xffvalue"
    if shutil.which("tar") and b"--xattrs" in subprocess.run(["tar", "--help"], capture_output=True).stdout:
        out = tmp_path / "untarred"
        out.mkdir()
        subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "-x", "-C", str(out)], input=buf.getvalue(),
                       check=True)
        assert os.getxattr(out / "plain", "user.note") == b"\x00binary\xffvalue"
        assert os.stat(out / "b").st_ino == os.stat(out / "a").st_ino


def test_diff_reports_a_change_of_attributes(repo, tmp_path):
    from kdist.browse import diff

    src = tmp_path / "src"
    rich_tree(src)
    first = Uploader(repo, BackupOptions()).backup(str(src))
    os.setxattr(src / "plain", "user.note", b"changed")
    second = Uploader(repo, BackupOptions()).backup(str(src))
    assert diff(repo, first.root, second.root) == [("M", "plain")]


def _object(entries: list[dict], version: int, **doc) -> bytes:
    return msgpack.packb({"v": version, "entries": entries, "x": True, **doc}, use_bin_type=True)


@pytest.mark.parametrize("entry, version", [
    ({"name": "f", "type": "f", "xattrs": [[b"user.a", b"1"]]}, DIR_VERSION),  # attributes need version 3
    ({"name": "f", "type": "f", "xattrs": [[b"user.a", b"1"]]}, DIR_VERSION_SPECIAL),
    ({"name": "f", "type": "f", "dev": 5, "nlink": 2}, DIR_VERSION),
    ({"name": "f", "type": "f", "xattrs": [[b"user.b", b"1"], [b"user.a", b"1"]]}, DIR_VERSION_LINKS),  # unsorted
    ({"name": "f", "type": "f", "xattrs": [[b"user.a", b"1"], [b"user.a", b"2"]]}, DIR_VERSION_LINKS),  # twice
    ({"name": "f", "type": "f", "xattrs": [[b"user.\x00a", b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": [[b"u" * 256, b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": [[b"user.a", b"1" * 65537]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": [["user.a", b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": [[b"user.a"]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": {b"user.a": b"1"}}, DIR_VERSION_LINKS),
    ({"name": "d", "type": "d", "dev": 5}, DIR_VERSION_LINKS),  # links are kept for files
    ({"name": "f", "type": "f", "dev": -1}, DIR_VERSION_LINKS),
    # attributes a node of that kind cannot have: never set on it by a restore
    ({"name": "l", "type": "l", "target": "x", "xattrs": [[b"security.capability", b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "l", "type": "l", "target": "x", "xattrs": [[b"system.posix_acl_access", b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "d", "type": "d", "xattrs": [[b"security.capability", b"1"]]}, DIR_VERSION_LINKS),
    ({"name": "f", "type": "f", "xattrs": [[b"system.posix_acl_default", b"1"]]}, DIR_VERSION_LINKS),
])
def test_malformed_attributes_and_links_are_corruption(entry, version):
    with pytest.raises(CorruptionError):
        decode_listing(_object([entry], version))


@pytest.mark.parametrize("doc", [
    {"self": {"type": "f"}}, {"self": {"type": "d", "name": "x"}}, {"self": {"type": "d", "oid": "ab"}},
    {"self": [1]}, {"self": {"type": "d", "mode": -1}}, {"x": 1}, {"v": 4},
    {"v": DIR_VERSION, "self": {"type": "d", "xattrs": [[b"user.a", b"1"]]}},
])
def test_a_malformed_top_or_version_is_corruption(doc):
    with pytest.raises(CorruptionError):
        decode_listing(msgpack.packb({"v": DIR_VERSION_LINKS, "entries": [], **doc}, use_bin_type=True))


def test_versions_are_the_lowest_that_hold_the_entries():
    def version(*entries, top=None):
        return msgpack.unpackb(encode_directory(list(entries), top))["v"]

    assert version(Entry("f", "f")) == DIR_VERSION  # older kdist still reads a tree without either
    assert version(Entry("f", "f"), top=Entry("", "d", mode=0o700)) == DIR_VERSION  # older kdist ignores "self"
    assert version(Entry("p", "p")) == DIR_VERSION_SPECIAL
    assert version(Entry("f", "f", xattrs=[(b"user.a", b"")])) == DIR_VERSION_LINKS
    assert version(Entry("f", "f", dev=1, nlink=2)) == DIR_VERSION_LINKS
    assert version(Entry("f", "f"), top=Entry("", "d", xattrs=[(b"user.a", b"")])) == DIR_VERSION_LINKS
    old = decode_listing(msgpack.packb({"v": 1, "entries": [{"name": "f", "type": "f"}]}, use_bin_type=True))
    assert not old.complete and old.top is None


def _snapshot_of(repo, entries: list[Entry]):
    from kdist.snapshot import Snapshot, Source

    root = repo.objects.write_bytes(encode_directory(entries), metadata=True)
    return Snapshot(source=Source("h", "u", "/x"), root=root, start=0, end=0)


def test_a_first_file_swapped_before_its_links_are_made_is_not_linked(repo, tmp_path, monkeypatch):
    """Someone who can write where the group's first file was restored puts another file (a
    link to one outside) in its place: the later files of the group get the snapshot's data,
    never a link to what was swapped in."""
    import kdist.restore as restore_module

    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    outside = tmp_path / "outside"
    outside.write_bytes(b"the attacker's\n")
    dst = tmp_path / "dst"
    real = restore_module.Restorer._restore_file

    def then_swap(self, d, e, group=None):
        written = real(self, d, e, group)
        if e.name == "a" and group is not None:
            os.unlink(os.path.join(d.path, "a"))
            os.link(outside, os.path.join(d.path, "a"))
        return written

    monkeypatch.setattr(restore_module.Restorer, "_restore_file", then_swap)
    stats = Restorer(repo).restore(snap, str(dst))
    assert stats.errors == 0
    for name in ("b", "sub/a-again"):
        assert (dst / name).read_bytes() == b"linked data\n"
        assert os.stat(dst / name).st_ino != os.stat(outside).st_ino
    assert os.stat(dst / "b").st_ino == os.stat(dst / "sub" / "a-again").st_ino  # still one group
    assert outside.read_bytes() == b"the attacker's\n"


def test_an_existing_file_linked_elsewhere_is_replaced_never_changed(repo, tmp_path):
    """A file in the target with another name outside it (someone linked it there) is never
    settled in place: that would chmod and chown the outside file too."""
    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    dst = tmp_path / "dst"
    dst.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"linked data\n")  # the snapshot's bytes, other metadata
    os.chmod(outside, 0o600)
    os.link(outside, dst / "a")
    before = os.stat(outside)
    Restorer(repo).restore(snap, str(dst))
    after = os.stat(outside)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert after.st_nlink == 1 and os.stat(dst / "a").st_ino != after.st_ino
    assert full_metadata(dst)[1] == [["a", "b", "sub/a-again"], ["c-link", "sub/c"]]


def test_files_of_one_group_that_differ_are_restored_each_with_its_own_data(repo, tmp_path):
    data = [repo.objects.write_bytes(b"one"), repo.objects.write_bytes(b"two!")]
    snap = _snapshot_of(repo, [Entry("x", "f", size=3, oid=data[0], dev=7, inode=9, nlink=2, mode=0o644),
                               Entry("y", "f", size=4, oid=data[1], dev=7, inode=9, nlink=2, mode=0o644)])
    stats = Restorer(repo).restore(snap, str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "x").read_bytes() == b"one" and (tmp_path / "dst" / "y").read_bytes() == b"two!"
    assert stats.hardlinks == 0 and stats.errors == 0


def test_an_existing_acl_the_snapshot_has_not_is_removed(repo, tmp_path):
    src = tmp_path / "src"
    rich_tree(src)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    dst = tmp_path / "dst"
    Restorer(repo).restore(snap, str(dst))
    os.setxattr(dst / "plain", "system.posix_acl_access", FILE_ACL)  # a grant the snapshot does not make
    stats = Restorer(repo).restore(snap, str(dst))
    assert "system.posix_acl_access" not in os.listxattr(dst / "plain")
    assert stats.errors == 0 and stats.files == 0  # kept (same bytes), its metadata made right


def test_a_snapshot_without_the_top_directory_leaves_a_new_target_as_made(repo, tmp_path, monkeypatch):
    """kdist before the root's own metadata stored none: the target is not given a made-up one
    (mode 0755 and mtime 0, owned by root)."""
    import kdist.uploader as uploader

    src = tmp_path / "src"
    rich_tree(src)
    with monkeypatch.context() as m:
        m.setattr(uploader, "encode_directory", lambda entries, top=None, complete=True: _old_writer(encode_directory(entries, top)))
        old = Uploader(repo, BackupOptions()).backup(str(src))
    Restorer(repo).restore(old, str(tmp_path / "dst"))
    st = os.stat(tmp_path / "dst")
    assert st.st_mtime_ns > TOP_MTIME and (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


@pytest.mark.parametrize("size", [6, 300_000])  # a file read whole, and one read as a stream
def test_attributes_that_cannot_be_read_are_read_again_next_time(repo, tmp_path, monkeypatch, size):
    src = tmp_path / "src"
    rich_tree(src)
    with open(src / "plain", "r+b") as f:
        f.truncate(size)
    real = os.getxattr

    def refused(path, name, *a, **kw):
        if str(path).endswith("plain") and name == "user.note":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(path, name, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "getxattr", refused)
        up = Uploader(repo, BackupOptions())
        first = up.backup(str(src))
    assert [e["error"] for e in up.error_list] == ["cannot read extended attribute user.note: Permission denied"]
    plain = {e.name: e for e in read_directory(repo.objects, first.root)}["plain"]
    assert b"user.note" not in dict(plain.xattrs) and plain.ctime_ns == 0  # never taken for unchanged
    second = Uploader(repo, BackupOptions()).backup(str(src))
    plain = {e.name: e for e in read_directory(repo.objects, second.root)}["plain"]
    assert dict(plain.xattrs)[b"user.note"] == b"\x00binary\xffvalue"


def test_a_symlinked_root_gives_its_directory_s_attributes(repo, tmp_path):
    src = tmp_path / "src"
    rich_tree(src)
    os.symlink(src, tmp_path / "via-link")
    snap = Uploader(repo, BackupOptions()).backup(str(tmp_path / "via-link"))
    assert read_listing(repo.objects, snap.root).top.xattrs == [(b"user.top", b"the top directory's own")]


def test_dump_leaves_out_an_attribute_tar_cannot_name_and_says_so(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.setxattr(src / "f", b"user.\xff", b"v")
    args = ["--repo", str(tmp_path / "repo")]
    run_cli("repo", "create", *args)
    run_cli("snapshot", "create", *args, src)
    got = run_cli("snapshot", "dump", *args, "latest", "/")
    assert got.stderr.startswith("kdist: warning: f: extended attribute") and "its name is not UTF-8" in got.stderr
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(got.stdout_bytes))] == ["f"]


def test_a_restore_by_another_user_makes_links_in_read_only_directories(repo, tmp_path):
    """As a user without root (a child process that drops to nobody): links are made before
    their directory gets its read-only mode, and attributes outside user.* and ACLs are counted,
    not written."""
    if not ROOT:
        pytest.fail("this test drops to another user: it runs as root (as CI does)")
    src = tmp_path / "src"
    (src / "ro").mkdir(parents=True)
    (src / "data").write_bytes(b"shared\n")
    os.link(src / "data", src / "ro" / "again")
    os.setxattr(src / "data", "trusted.k", b"root only")
    os.chmod(src / "ro", 0o555)
    snap = Uploader(repo, BackupOptions()).backup(str(src))
    with tempfile.TemporaryDirectory() as reachable:  # (pytest's own directories are root's alone)
        os.chmod(reachable, 0o755)
        _restore_as_nobody(repo, snap, pathlib.Path(reachable) / "mine")


def _restore_as_nobody(repo, snap, mine) -> None:
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, restoring with the repository opened by root
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            stats = Restorer(repo, workers=2).restore(snap, str(mine / "r"))
            os.write(write, json.dumps(stats.as_dict()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read()
    assert os.waitpid(pid, 0)[1] == 0
    stats = json.loads(out)
    assert stats["errors"] == 0 and stats["hardlinks"] == 1 and stats["xattrs_skipped"] == 1  # trusted.k
    r = mine / "r"
    assert os.stat(r / "ro" / "again").st_ino == os.stat(r / "data").st_ino
    assert os.stat(r / "ro").st_mode & 0o777 == 0o555 and os.stat(r / "data").st_uid == 65534
