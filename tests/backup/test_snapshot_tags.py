"""``kdist snapshot tag``: tags added, removed or set on existing snapshots (their ids stay),
on the filesystem and S3; list, latest and forget follow them; a host key cannot edit them, and
an edit does not move a host's snapshot in retention."""

from __future__ import annotations

import json

import pytest

from kdist.cli import exit_codes
from kdist_trees import run_cli


@pytest.fixture
def snaps(cli_repo_args, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = []
    for night in range(3):
        (src / "f").write_text(f"night {night}\n")
        ids.append(json.loads(run_cli("snapshot", "create", *cli_repo_args, src, "--tag", "nightly",
                                      "--json").stdout)[0]["id"])
    return cli_repo_args, ids


def tags_of(repo_args) -> dict[str, list[str]]:
    return {s["id"]: s["tags"] for s in json.loads(run_cli("snapshot", "list", *repo_args, "--json").stdout)}


def test_add_remove_and_set_keep_the_ids(snaps):
    repo_args, ids = snaps
    run_cli("snapshot", "tag", *repo_args, ids[0], ids[1][:8], "--add", "release-1.2", "--add", "keep")
    assert tags_of(repo_args) == {ids[0]: ["nightly", "release-1.2", "keep"], ids[1]: ["nightly", "release-1.2", "keep"],
                                  ids[2]: ["nightly"]}
    out = run_cli("snapshot", "tag", *repo_args, ids[1], "--remove", "keep", "--remove", "nightly").stdout
    assert "1 snapshot(s) changed" in out
    assert tags_of(repo_args)[ids[1]] == ["release-1.2"]
    run_cli("snapshot", "tag", *repo_args, "latest", "--set", "only")
    assert tags_of(repo_args)[ids[2]] == ["only"]
    run_cli("snapshot", "tag", *repo_args, ids[2], "--set", "")
    assert tags_of(repo_args)[ids[2]] == []
    again = run_cli("snapshot", "tag", *repo_args, ids[2], "--set", "").stdout  # nothing to change: nothing written
    assert "0 snapshot(s) changed" in again
    listed = json.loads(run_cli("snapshot", "list", *repo_args, "--tag", "release-1.2", "--json").stdout)
    assert [s["id"] for s in listed] == [ids[0], ids[1]]
    # forget follows the tags as they are now
    out = json.loads(run_cli("snapshot", "forget", *repo_args, "--keep-tag", "keep", "--json").stdout)
    assert sorted(out["forget"]) == sorted([ids[1], ids[2]])  # "keep" was removed from ids[1]
    assert set(tags_of(repo_args)) == {ids[0]}


@pytest.mark.parametrize("args, message", [
    (["--add", "a,b"], "a tag holds no comma"),
    (["--add", " "], "a tag holds no comma"),
    (["--set", "x", "--add", "y"], "--set replaces all tags"),
    ([], "give --add, --remove or --set"),
])
def test_bad_tag_edits_are_usage_errors(snaps, args, message):
    repo_args, ids = snaps
    got = run_cli("snapshot", "tag", *repo_args, ids[0], *args, code=exit_codes.USAGE)
    assert message in got.output
    assert tags_of(repo_args)[ids[0]] == ["nightly"]


def test_no_snapshot_named_is_refused_rather_than_tagging_them_all(snaps):
    repo_args, _ids = snaps
    got = run_cli("snapshot", "tag", *repo_args, "--add", "x", code=exit_codes.USAGE)
    assert "name the snapshots" in got.output


def test_a_host_cannot_edit_tags_and_its_forged_edit_counts_for_nothing(tmp_path):
    """A host key is refused by the command, and a tag edit it writes anyway (its own record,
    which readers leave out: a host writes snapshots and failures only) changes nothing, so it
    cannot take a snapshot out of a --keep-tag or put it into one."""
    import msgpack

    from repo_format.crypto import KdfParams
    from repo_format.repository import Repository
    from repo_format.storage.memory import MemoryStorage
    from repo_format.storage.wrappers import AppendOnlyStorage

    from kdist.keys import add_key
    from kdist.snapshot import TAGS_LABEL, Source, edit_tags, list_snapshots
    from kdist.uploader import BackupOptions, Uploader
    from kdist_trees import PASSWORD

    storage = MemoryStorage()
    admin = Repository.create(storage, PASSWORD, kdf=KdfParams.weak_for_tests())
    slot = add_key(admin, "web1-pw", "host", "web1", kdf=KdfParams.weak_for_tests()).slot
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    host = Repository.open(AppendOnlyStorage(storage), "web1-pw", key_id=slot, heartbeat_thread=False)
    snap = Uploader(host, BackupOptions(tags=["keep"])).backup(str(src), Source("web1", "root", "/srv"))
    host.manifests.put({"type": TAGS_LABEL, "snapshot": snap.id}, msgpack.packb({"tags": []}))
    assert [s.tags for s in list_snapshots(Repository.open(storage, PASSWORD).manifests)] == [["keep"]]
    admin = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    (mine,) = list_snapshots(admin.manifests)
    assert [s.id for s in edit_tags(admin.manifests, [mine], add=["release"])] == [snap.id]
    assert [s.tags for s in list_snapshots(Repository.open(storage, PASSWORD).manifests)] == [["keep", "release"]]
    (theirs,) = list_snapshots(host.manifests, host="web1")
    assert theirs.tags == ["keep", "release"]  # the host sees the admin's edit of its snapshot


def test_listing_snapshots_reads_the_manifests_once(repo, tmp_path, monkeypatch):
    """Tag edits come from the same listing as the snapshots: every command that lists
    snapshots (list, latest, forget, restore) reads the manifest blobs once, as before edits."""
    from kdist.snapshot import edit_tags, list_snapshots
    from kdist.uploader import BackupOptions, Uploader

    (tmp_path / "src").mkdir()
    snap = Uploader(repo, BackupOptions()).backup(str(tmp_path / "src"))
    edit_tags(repo.manifests, [snap], add=["x"])
    calls = []
    real = repo.manifests.find
    monkeypatch.setattr(repo.manifests, "find", lambda **labels: (calls.append(labels), real(**labels))[1])
    assert [s.tags for s in list_snapshots(repo.manifests)] == [["x"]]
    assert len(calls) == 1
