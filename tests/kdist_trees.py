"""Helpers shared by the snapshot-layer tests (a module of its own so tests can import it)."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct

from repo_format.repository import Repository

PASSWORD = "test-password"


def reopen(storage) -> Repository:
    return Repository.open(storage, PASSWORD)


def build_tree(root, big_size: int = 300 * 1024) -> None:
    """A tree with files, empty files and dirs, symlinks, odd names, modes and a sparse file."""
    os.makedirs(os.path.join(root, "docs", "deep", "er"))
    os.makedirs(os.path.join(root, "empty-dir"))
    with open(os.path.join(root, "docs", "readme.txt"), "w") as f:
        f.write("hello kdist\n" * 100)
    with open(os.path.join(root, "docs", "deep", "er", "random.bin"), "wb") as f:
        f.write(os.urandom(big_size))
    open(os.path.join(root, "empty-file"), "wb").close()
    for name in ("ünïcödé ✓.txt", "with space", "new\nline", "-dash", "a'quote\"", "tab\tname"):
        with open(os.path.join(root, name), "w") as f:
            f.write(name * 3)
    raw_name = os.fsdecode(b"latin1-\xe9t\xe9")  # not valid UTF-8
    with open(os.path.join(root, raw_name), "w") as f:
        f.write("bytes name")
    os.symlink("docs/readme.txt", os.path.join(root, "link-to-readme"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.seek(2 * 1024 * 1024)
        f.write(b"end")
    script = os.path.join(root, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o750)
    os.chmod(os.path.join(root, "docs", "readme.txt"), 0o640)
    os.utime(os.path.join(root, "docs", "readme.txt"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def tree_state(root) -> dict:
    """Everything a restore must reproduce: type, mode, mtime, size, content hash, link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            item = {"mode": stat.S_IMODE(st.st_mode), "type": stat.S_IFMT(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
                item["mtime_ns"] = st.st_mtime_ns
            elif stat.S_ISREG(st.st_mode):
                item["mtime_ns"] = st.st_mtime_ns
                with open(p, "rb") as f:
                    item["sha256"] = hashlib.sha256(f.read()).hexdigest()
            else:
                item["mtime_ns"] = st.st_mtime_ns
            state[rel] = item
    return state


def cli_env(monkeypatch) -> None:
    """The environment of a CLI test: the test password, the weak test KDF, no repository,
    endpoint, time limit, transfer limit or metrics target inherited from the shell (an exported
    KDIST_TIMEOUT would stop the test run itself)."""
    monkeypatch.setenv("KDIST_PASSWORD", PASSWORD)
    monkeypatch.setenv("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
    for var in ("KDIST_REPO", "KDIST_ENDPOINT_URL", "KDIST_PASSWORD_FILE", "KDIST_TIMEOUT", "KDIST_REQUEST_TIMEOUT",
                "KDIST_LIMIT_UPLOAD", "KDIST_LIMIT_DOWNLOAD", "KDIST_METRICS_FILE", "KDIST_PUSHGATEWAY"):
        monkeypatch.delenv(var, raising=False)


def run_cli(*args, code=0, **kw):
    """Run ``kdist ARGS`` in-process; assert its exit code."""
    from click.testing import CliRunner

    from kdist.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr if hasattr(result, "stderr") else "")
    return result


def full_metadata(root) -> tuple[dict, list]:
    """Everything ``stat`` and the extended attributes say of each node under ``root``, the
    top-level directory (``"."``) included, and the hard-link groups (sorted lists of paths of
    one inode): what a restore must reproduce bit for bit. Times but the mtime (set by restore)
    and inode numbers are left out; a directory's link count is its subdirectories'."""
    nodes, groups = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = [(dirpath, ".")] if dirpath == str(root) else []
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            here.append((p, os.path.relpath(p, root)))
        for p, rel in here:
            st = os.lstat(p)
            xattrs = sorted((n, os.getxattr(p, n, follow_symlinks=False))
                            for n in os.listxattr(p, follow_symlinks=False))
            item = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                    "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "xattrs": xattrs, "rdev": st.st_rdev}
            if stat.S_ISREG(st.st_mode):
                item["nlink"] = st.st_nlink
                with open(p, "rb") as f:
                    item["sha256"] = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
            nodes[rel] = item
    return nodes, sorted(sorted(g) for g in groups.values())


ROOT = os.geteuid() == 0
TOP_MTIME = 1_234_567_890_123_456_789


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_*: version 2, then (tag, perm,
    id) entries (tags: 1 owner, 2 named user, 4 group, 0x10 mask, 0x20 other)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ANY = 0xFFFFFFFF
FILE_ACL = acl((1, 6, ANY), (2, 4, 1000), (4, 4, ANY), (0x10, 6, ANY), (0x20, 4, ANY))
DEFAULT_ACL = acl((1, 7, ANY), (2, 5, 1001), (4, 5, ANY), (0x10, 7, ANY), (0x20, 5, ANY))
# file capabilities, VFS_CAP_REVISION_2 with the effective bit: cap_net_raw (13) permitted
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def rich_tree(root) -> None:
    """Two link groups across directories, extended attributes (binary values, on files and
    directories), an access and a default ACL, a symlink, a fifo, a socket and a sparse file; as
    root also a character device, a file capability, a trusted.* attribute and other owners. The top directory is private,
    owned by someone else (as root), with an attribute and an old mtime."""
    sub = root / "sub"
    sub.mkdir(parents=True)
    (root / "a").write_bytes(b"linked data\n")
    os.link(root / "a", root / "b")
    os.link(root / "a", sub / "a-again")
    (sub / "c").write_bytes(b"second group\n" * 100)
    os.link(sub / "c", root / "c-link")
    (root / "plain").write_bytes(b"plain\n")
    os.setxattr(root / "plain", "user.note", b"\x00binary\xffvalue")
    os.setxattr(root / "plain", "user.big", bytes(range(256)) * 12)
    os.setxattr(root / "a", "user.linked", b"on every link")
    (root / "acl").write_bytes(b"acl\n")
    os.setxattr(root / "acl", "system.posix_acl_access", FILE_ACL)
    os.setxattr(sub, "system.posix_acl_default", DEFAULT_ACL)
    os.setxattr(sub, "user.dir", b"a directory's")
    os.symlink("plain", root / "to-plain")
    os.mkfifo(root / "queue", 0o620)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "control.sock"))
    s.close()
    with open(root / "disk.img", "wb") as f:  # sparse: 4 KiB of data in 8 MiB
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"island" * 682)
    if ROOT:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        (root / "ping").write_bytes(b"#!/bin/sh\n")
        os.chmod(root / "ping", 0o755)
        os.setxattr(root / "ping", "security.capability", CAPABILITY)
        os.setxattr(root / "plain", "trusted.k", b"root only")
        os.chown(root / "plain", 1234, 5678)
        os.chown(sub, 2345, 6789)
        os.chown(root, 4321, 8765)
    os.utime(sub, ns=(1_500_000_000_000_000_000,) * 2)
    os.setxattr(root, "user.top", b"the top directory's own")
    os.chmod(root, 0o700)
    os.utime(root, ns=(TOP_MTIME, TOP_MTIME))



def without_socket(meta: tuple[dict, list]) -> tuple[dict, list]:
    nodes, groups = meta
    return {k: v for k, v in nodes.items() if os.path.basename(k) != "control.sock"}, groups
