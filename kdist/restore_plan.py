"""What a restore does with what already exists in its target: the comparison behind the
``--overwrite`` policies, and ``snapshot restore --dry-run``'s plan.

An existing file *matches* its snapshot entry when its bytes are the entry's (same size, then
cut and hashed as a backup would and compared with the stored chunk list: the file is read,
nothing is downloaded) and its mode and mtime (and owner, for root) are the entry's. A symlink
matches when its target is the same. Policies (``Restorer``):
- ``if-changed`` (the default): a file whose bytes match is kept and gets the entry's metadata;
  anything else is replaced. The target then matches the snapshot, and a second restore into it
  reads the target but writes and downloads nothing.
- ``always``: every existing file or symlink is replaced.
- ``never``: what exists stays; what differs from the snapshot is counted and makes the restore
  exit 3, so a restore that left differences says so.
A directory where a file goes (or a file where a directory goes) is never replaced: reported.
Never writes anything itself.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from dataclasses import dataclass, field

from repo_format.errors import CorruptionError
from repo_format.repository import Repository

from kdist.snapshot import (
    DEVICE_TYPES, MAX_TREE_DEPTH, SPECIAL_TYPES, TYPE_BLOCK_DEVICE, TYPE_CHAR_DEVICE, TYPE_DIR, TYPE_FIFO, TYPE_FILE,
    TYPE_SOCKET, TYPE_SYMLINK, Entry, check_entry_name, read_directory,
)

OVERWRITE_POLICIES = ("if-changed", "always", "never")
DEFAULT_OVERWRITE = "if-changed"

ABSENT, SAME, METADATA, DIFFERENT, IN_THE_WAY = "absent", "same", "metadata", "different", "in the way"
_KIND = {TYPE_FIFO: statmod.S_IFIFO, TYPE_SOCKET: statmod.S_IFSOCK, TYPE_CHAR_DEVICE: statmod.S_IFCHR,
         TYPE_BLOCK_DEVICE: statmod.S_IFBLK, TYPE_SYMLINK: statmod.S_IFLNK}


def existing_state(repo: Repository, dir_fd: int, e: Entry, owner: bool, compare: bool = True,
                   settle: bool = False, outcome: list | None = None, identity: list | None = None) -> str:
    """How what exists at ``e.name`` in directory ``dir_fd`` stands to entry ``e`` (not a
    directory): ABSENT, SAME, METADATA (the same bytes, other mode, mtime or owner), DIFFERENT, or
    IN_THE_WAY (a directory). Without ``compare`` only ABSENT, IN_THE_WAY or DIFFERENT.

    The node compared is opened once, without following a symlink and without blocking (a fifo
    or device swapped in is never read), checked to be the one listed, and, with ``settle``, a
    METADATA one gets the entry's metadata through that same descriptor: nothing is done by
    name to whatever may have taken its place. A file of several links is DIFFERENT (keeping it
    would change the others' metadata; and their names may be outside the target), unless the
    entry is one of a link group too and the file already matches it whole (kept untouched:
    never settled); and so is one this user cannot open: replacing it needs only the directory.
    A symlink is compared by its target alone. Extended attributes the entry has that this user
    may write must be there with the entry's values, and ACLs it does not have must not be
    (other attributes on the node are left alone). ``outcome`` receives what settling returned
    (``set_metadata``), ``identity`` the (st_dev, st_ino) of a file found SAME or METADATA."""
    try:
        st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return ABSENT
    if statmod.S_ISDIR(st.st_mode):
        return IN_THE_WAY
    if not compare:
        return DIFFERENT
    if e.type == TYPE_SYMLINK:
        return SAME if statmod.S_ISLNK(st.st_mode) and os.readlink(e.name, dir_fd=dir_fd) == e.target else DIFFERENT
    special = e.type in SPECIAL_TYPES
    kind = _KIND[e.type] if special else statmod.S_IFREG
    if (statmod.S_IFMT(st.st_mode) != kind or (st.st_nlink != 1 and not e.dev)
            or (not special and st.st_size != e.size)):
        return DIFFERENT
    if e.type in DEVICE_TYPES and st.st_rdev != e.rdev:
        return DIFFERENT
    try:
        fd = os.open(e.name, (os.O_PATH if special else os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY) | os.O_NOFOLLOW,
                     dir_fd=dir_fd)
    except OSError:  # gone, swapped for a symlink (ELOOP), or not readable by this user
        return DIFFERENT
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, statmod.S_IFMT(now.st_mode)) != (st.st_dev, st.st_ino, kind):
            return DIFFERENT  # replaced since it was listed
        if not special and not repo.objects.same_content(e.oid, fd):
            return DIFFERENT
        node = f"/proc/self/fd/{fd}" if special else fd
        same_meta = (statmod.S_IMODE(now.st_mode) == e.mode & 0o7777 and now.st_mtime_ns == e.mtime_ns
                     and (not owner or (now.st_uid, now.st_gid) == (e.uid, e.gid))
                     and _has_xattrs(node, writable_xattrs(e, owner)[0]) and not _extra_acls(node, e))
        if identity is not None:
            identity.append((now.st_dev, now.st_ino))
        if same_meta:
            return SAME
        if now.st_nlink != 1:  # settling it would change a node other names (perhaps outside) share
            return DIFFERENT
        if settle:
            got = set_metadata(node, e, owner)
            if outcome is not None:
                outcome.append(got)
        return METADATA
    finally:
        os.close(fd)


# The namespaces of extended attributes a user may write on files it owns: its own, and ACLs.
# Root writes every namespace (security.* holds file capabilities and SELinux labels; trusted.*).
USER_XATTR_PREFIXES = (b"user.", b"system.posix_acl_access", b"system.posix_acl_default")


def writable_xattrs(e: Entry, owner: bool) -> tuple[list[tuple[bytes, bytes]], int]:
    """The entry's extended attributes a restore by this user writes, and how many it skips."""
    if owner:
        return e.xattrs, 0
    mine = [(n, v) for n, v in e.xattrs if n.startswith(USER_XATTR_PREFIXES)]
    return mine, len(e.xattrs) - len(mine)


_ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")


def _extra_acls(node: int | str, e: Entry) -> list[bytes]:
    """The ACLs ``node`` has that the entry has not: access the restore must not leave."""
    try:
        names = [os.fsencode(n) for n in os.listxattr(node)]
    except OSError:
        return []
    have = {n for n, _v in e.xattrs}
    return [n for n in names if n in _ACLS and n not in have]


def _has_xattrs(node: int | str, pairs: list[tuple[bytes, bytes]]) -> bool:
    for name, value in pairs:
        try:
            if os.getxattr(node, name) != value:
                return False
        except OSError:
            return False
    return True


def set_metadata(node: int | str, e: Entry, owner: bool) -> tuple[int, list[str]]:
    """The entry's owner (as root), extended attributes, mode and mtime on ``node``: a
    descriptor, or the ``/proc/self/fd`` path of an ``O_PATH`` one (a fifo, device or symlink
    is never opened for I/O; the kernel acts on the node itself). Attributes come after the
    owner (chown clears file capabilities) and before the mode (an ACL sets the group bits it
    masks with); ACLs the entry has not are removed.

    Returns how many attributes this user may not write (skipped), and a message for each that
    could not be written: the node is restored, those are reported (an OSError from the owner,
    mode or times raises: the node is not as the snapshot says)."""
    if owner:
        os.chown(node, e.uid, e.gid)
    pairs, skipped = writable_xattrs(e, owner)
    failed = []
    for name in _extra_acls(node, e) if e.type != TYPE_SYMLINK else ():
        try:
            os.removexattr(node, name)
        except OSError as exc:
            failed.append(f"cannot remove ACL {os.fsdecode(name)}: {exc.strerror}")
    for name, value in pairs:
        try:
            os.setxattr(node, name, value)
        except OSError as exc:
            failed.append(f"cannot set extended attribute {os.fsdecode(name)}: {exc.strerror}")
    if e.type != TYPE_SYMLINK:  # a symlink has no mode of its own (Linux)
        os.chmod(node, e.mode & 0o7777)
    os.utime(node, ns=(e.mtime_ns, e.mtime_ns))
    return skipped, failed


def made_node(dir_fd: int, e: Entry, owner: bool) -> tuple[int, list[str]]:
    """Give the fifo, device or symlink just made at ``e.name`` the entry's metadata, once it
    is checked to be that kind of node (not something else put in its place meanwhile)."""
    fd = os.open(e.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if statmod.S_IFMT(st.st_mode) != _KIND[e.type] or (e.type in DEVICE_TYPES and st.st_rdev != e.rdev):
            raise OSError(errno.EEXIST, "replaced while it was restored")
        return set_metadata(f"/proc/self/fd/{fd}", e, owner)
    finally:
        os.close(fd)


# what a restore does, by policy and state: create, replace, keep (set metadata), left (differs), blocked
_ACTION = {
    ABSENT: ("create", "create", "create"),
    SAME: ("keep", "replace", "keep"),
    METADATA: ("keep", "replace", "left"),
    DIFFERENT: ("replace", "replace", "left"),
    IN_THE_WAY: ("blocked", "blocked", "blocked"),
}


def action(state: str, policy: str) -> str:
    return _ACTION[state][OVERWRITE_POLICIES.index(policy)]


@dataclass
class RestorePlan:
    """``--dry-run``: what a restore with ``policy`` would do, path by path (kept files that
    already match are only counted)."""

    policy: str
    changes: list = field(default_factory=list)  # (action, path), in walk order
    counts: dict = field(default_factory=dict)

    def add(self, what: str, path: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        if what != "keep":
            self.changes.append((what, path))

    @property
    def differences_left(self) -> int:
        return self.counts.get("left", 0) + self.counts.get("blocked", 0)


def plan_restore(repo: Repository, entry: Entry, target: str, policy: str) -> RestorePlan:
    """What restoring ``entry`` (a snapshot's subtree, or one file) into ``target`` would do."""
    plan = RestorePlan(policy)
    owner = hasattr(os, "geteuid") and os.geteuid() == 0
    groups: dict = {}
    if entry.type != TYPE_DIR:
        _plan_dir(repo, plan, target, "", [entry], owner, policy, groups)
        return plan
    stack = [("", entry.oid, 0)]
    while stack:
        rel, oid, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise CorruptionError(f"directory nesting deeper than {MAX_TREE_DEPTH} at {rel!r}")
        subdirs = _plan_dir(repo, plan, os.path.join(target, rel), rel, read_directory(repo.objects, oid),
                            owner, policy, groups)
        stack += [(os.path.join(rel, s.name), s.oid, depth + 1) for s in reversed(subdirs)]
    return plan


def _plan_dir(repo: Repository, plan: RestorePlan, here: str, rel: str, entries: list[Entry], owner: bool,
              policy: str, groups: dict) -> list[Entry]:
    """Plan one directory's entries; returns the subdirectories to visit (those that exist or
    will be created: one in the way is reported, and nothing under it). ``groups``: the link
    groups met so far, as the restore decides them (``kdist.restore``)."""
    try:
        dir_fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        dir_fd = None  # the whole directory is new
    except NotADirectoryError:
        plan.add("blocked", rel)
        return []
    subdirs = []
    try:
        for e in entries:
            check_entry_name(e.name)
            path = os.path.join(rel, e.name)
            if dir_fd is None:
                plan.add("not made" if e.type == TYPE_SOCKET or (e.type in DEVICE_TYPES and not owner) else "create",
                         path)
                if e.type == TYPE_DIR:
                    subdirs.append(e)
                elif e.type == TYPE_FILE and e.dev:
                    _plan_member(repo, groups, None, e, owner, policy)
                continue
            if e.type == TYPE_DIR:
                try:
                    st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
                    if not statmod.S_ISDIR(st.st_mode):
                        plan.add("blocked", path)
                        continue
                    plan.add("keep", path)
                except FileNotFoundError:
                    plan.add("create", path)
                subdirs.append(e)
            elif e.type == TYPE_SOCKET or (e.type in DEVICE_TYPES and not owner):
                plan.add("not made", path)  # a socket is its program's to make; a device, root's
            elif e.type == TYPE_FILE and e.dev:
                plan.add(_plan_member(repo, groups, dir_fd, e, owner, policy), path)
            else:
                plan.add(action(existing_state(repo, dir_fd, e, owner), policy), path)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return subdirs


def _plan_member(repo: Repository, groups: dict, dir_fd: int | None, e: Entry, owner: bool, policy: str) -> str:
    """What the restore does with a file of a link group (``kdist.restore._LinkGroup``): the
    first holding the group's data is planned as any file; each other is linked to it, so it is
    kept if it is that very file already, else replaced (left by ``never``). ``groups``: by
    (dev, inode), whether the group will hold its data after the restore, and the inode that
    holds it now (None: one the restore makes)."""
    from kdist.restore import link_likeness

    key, like = (e.dev, e.inode), link_likeness(e)
    group = groups.get(key)
    if group is not None and group[0] != like:  # unlike the group's first: restored with its own data
        return "create" if dir_fd is None else action(existing_state(repo, dir_fd, e, owner), policy)
    if group is None or not group[1]:  # the first, or the first one after a first that is not restored
        if dir_fd is None:
            groups[key] = (like, True, None)
            return "create"
        ident: list = []
        what = action(existing_state(repo, dir_fd, e, owner, identity=ident), policy)
        groups[key] = (like, what in ("create", "replace", "keep"), ident[0] if what == "keep" and ident else None)
        return what
    if dir_fd is None:
        return "create"
    try:
        st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "create"
    if statmod.S_ISDIR(st.st_mode):
        return "blocked"
    if group[2] is not None and (st.st_dev, st.st_ino) == group[2]:
        return "keep"
    return "left" if policy == "never" else "replace"
