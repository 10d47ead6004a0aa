"""Metadata a restore gives back bit for bit: hard links (as links, within the restored tree),
extended attributes in every namespace (user.*, ACLs, file capabilities and trusted.* as root),
and the top-level directory's own mode, owner, attributes and times. The suite runs as root in
CI, where every item is covered; as another user the root-only parts are left out of the tree."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import tarfile

import msgpack
import pytest

from repo_format.errors import CorruptionError

from kdist.restore import Restorer
from kdist.restore_plan import writable_xattrs
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
        m.setattr(uploader, "encode_directory", lambda entries, top=None: _old_writer(encode_directory(entries, top)))
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
    stats = Restorer(repo, overwrite="never").restore(snap, str(dst))
    assert stats.left_different == 2  # "a" differs; "sub/a-again" is not a link to what is there now
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
