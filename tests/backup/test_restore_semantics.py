"""What a restore does with files already in its target (``--overwrite``, ``--dry-run``): the
target matches the snapshot afterwards, content compared by hash, differences left are said."""

from __future__ import annotations

import json
import os

import pytest

from kdist.cli import exit_codes
from kdist.restore import Restorer
from kdist.restore_plan import plan_restore
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import build_tree, cli_env, run_cli, tree_state


def backup(repo, path):
    return Uploader(repo, BackupOptions()).backup(str(path))


@pytest.fixture
def restored(repo, tmp_path):
    """A snapshot of a tree, restored once into ``dst``: (snapshot, src, dst)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    build_tree(str(src), big_size=200 * 1024)
    snap = backup(repo, src)
    Restorer(repo).restore(snap, str(dst))
    assert tree_state(str(dst)) == tree_state(str(src))
    return snap, src, dst


def spoil(src, dst) -> dict:
    """Four kinds of existing file: the same bytes with another mode and mtime; other bytes of
    the same size and mtime (what a size-and-mtime check takes for unchanged); another size; a
    symlink retargeted. Returns their paths in the target, by kind."""
    same = dst / "docs" / "readme.txt"
    os.chmod(same, 0o600)
    os.utime(same, ns=(1, 1))
    sneaky = dst / "with space"
    st = os.stat(sneaky)
    sneaky.write_bytes(b"X" * st.st_size)
    os.utime(sneaky, ns=(st.st_atime_ns, st.st_mtime_ns))
    longer = dst / "empty-file"
    longer.write_bytes(b"not empty any more")
    link = next(p for p in dst.iterdir() if p.is_symlink())
    target = os.readlink(link)
    link.unlink()
    os.symlink(target + "-elsewhere", link)
    return {"same": same, "sneaky": sneaky, "longer": longer, "link": link}


def test_the_default_makes_the_target_match_and_keeps_what_already_does(repo, restored):
    snap, src, dst = restored
    spoiled = spoil(src, dst)
    held = os.open(spoiled["same"], os.O_RDONLY)  # (an open file's inode number cannot be reused)
    plan = plan_restore(repo, _root(snap), str(dst), "if-changed")
    assert sorted(plan.changes) == sorted([("replace", "with space"), ("replace", "empty-file"),
                                           ("replace", spoiled["link"].name)])
    assert tree_state(str(dst)) != tree_state(str(src))  # a dry run changes nothing
    stats = Restorer(repo).restore(snap, str(dst))
    assert tree_state(str(dst)) == tree_state(str(src))
    assert os.fstat(held).st_ino == os.stat(spoiled["same"]).st_ino  # kept, its mode and mtime set back
    os.close(held)
    assert (stats.files, stats.symlinks) == (2, 1) and stats.left_different == 0
    again = Restorer(repo).restore(snap, str(dst))  # now everything matches: nothing is written
    assert again.files == again.symlinks == 0 and again.unchanged == again.skipped_existing > 0


def test_never_keeps_every_existing_file_and_counts_those_that_differ(repo, restored):
    snap, src, dst = restored
    spoil(src, dst)
    before = tree_state(str(dst))
    stats = Restorer(repo, overwrite="never").restore(snap, str(dst))
    assert tree_state(str(dst)) == before
    assert stats.left_different == 4 and stats.files == stats.symlinks == 0  # same bytes, other mode: differs too
    assert stats.unchanged == stats.skipped_existing - 4


def test_always_replaces_every_existing_file(repo, restored):
    snap, src, dst = restored
    spoil(src, dst)
    held = os.open(dst / "docs" / "readme.txt", os.O_RDONLY)  # (an open file's inode number cannot be reused)
    stats = Restorer(repo, overwrite="always").restore(snap, str(dst))
    assert tree_state(str(dst)) == tree_state(str(src)) and stats.skipped_existing == 0
    assert os.fstat(held).st_ino != os.stat(dst / "docs" / "readme.txt").st_ino
    os.close(held)


def test_a_linked_or_directory_shaped_existing_entry_is_never_kept_or_removed(repo, restored):
    """A file with the snapshot's bytes but a second hard link is replaced, not given the
    snapshot's metadata (that would change the other path too); a directory where a file goes
    is reported by every policy, never removed."""
    snap, src, dst = restored
    readme = dst / "docs" / "readme.txt"
    os.chmod(readme, 0o666)
    os.link(readme, src.parent / "other-link")
    (dst / "run.sh").unlink()
    (dst / "run.sh").mkdir()
    for policy in ("if-changed", "always", "never"):
        stats = Restorer(repo, overwrite=policy).restore(snap, str(dst))
        assert [e["error"] for e in stats.error_list] == ["a directory is in the way; not replaced"], policy
    assert not os.path.samefile(readme, src.parent / "other-link")  # replaced by if-changed
    assert os.stat(src.parent / "other-link").st_mode & 0o777 == 0o666 and (dst / "run.sh").is_dir()


def _root(snap):
    from kdist.snapshot import TYPE_DIR, Entry

    return Entry(name="", type=TYPE_DIR, oid=snap.root)


@pytest.fixture
def cli_repo(monkeypatch, tmp_path):
    cli_env(monkeypatch)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("from the snapshot\n")
    (src / "sub").mkdir()
    (src / "sub" / "b").write_text("also\n")
    args = ["--repo", str(tmp_path / "repo")]
    run_cli("repo", "create", *args)
    run_cli("snapshot", "create", *args, src)
    return args, src, dst


def test_cli_dry_run_and_exit_codes(cli_repo):
    args, src, dst = cli_repo
    dst.mkdir()
    (dst / "a").write_text("edited by hand\n")
    (dst / "sub").write_text("a file where a directory goes\n")
    out = json.loads(run_cli("snapshot", "restore", *args, "latest", dst, "--dry-run", "--json",
                             code=exit_codes.PARTIAL).stdout)
    assert out["dry_run"] and {(c["action"], c["path"]) for c in out["changes"]} == {("replace", "a"), ("blocked", "sub")}
    assert (dst / "a").read_text() == "edited by hand\n"  # nothing changed
    never = run_cli("snapshot", "restore", *args, "latest", dst, "--overwrite", "never", code=exit_codes.PARTIAL)
    assert "1 existing file(s) differ from the snapshot and were left alone" in never.stderr
    (dst / "sub").unlink()
    run_cli("snapshot", "restore", *args, "latest", dst)  # the default: replaced, and exit 0
    assert tree_state(str(dst)) == tree_state(str(src))
    text = run_cli("snapshot", "restore", *args, "latest", dst, "--dry-run").stdout
    assert "keep" in text and "replace" not in text  # everything already matches
    assert run_cli("snapshot", "restore", *args, "latest", dst, "--overwrite", "never").exit_code == 0
