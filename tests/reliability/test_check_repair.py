"""`kdist repo check` and `kdist repo repair` through the CLI, against damage done by hand.

Each fault is made on a real repository (filesystem, one case on S3 through moto) and must be
found with a message that names what is wrong and where, with exit code 13; a healthy
repository, after several backups and a GC run, checks clean. Repositories are created through
the library with small packs and chunks, so a small tree still spans many packs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format import constants as C  # noqa: E402
from repo_format.content import ContentStore, load_committed_index  # noqa: E402
from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.index import MergedIndex  # noqa: E402
from repo_format.objects import ObjectStore  # noqa: E402
from repo_format.repository import Repository, new_session_id  # noqa: E402
from repo_format.safety import SafetyParameters  # noqa: E402
from repo_format.storage.filesystem import FilesystemStorage  # noqa: E402

from kdist.cli.exit_codes import CORRUPTION  # noqa: E402
from kdist.snapshot import list_snapshots, read_directory  # noqa: E402
from kdist_trees import PASSWORD, build_tree, cli_env, run_cli, tree_state  # noqa: E402

SMALL = dict(pack_size=128 * 1024, metadata_pack_size=64 * 1024, chunk_avg=16 * 1024, chunk_min=4 * 1024,
             chunk_max=64 * 1024)
# GC margins of about a second (valid: see SafetyParameters.validate), with a session expiry long
# enough that a loaded machine does not lapse a backup's session
SECONDS = SafetyParameters(min_content_age=1.0, pack_age=1.0, session_expiry=0.9, session_heartbeat=0.2,
                           drop_margin=0.5, checkpoint_interval=0.25, index_refresh=0.1, min_epoch_duration=0.12,
                           listing_settle=0.01, cleanup_margin=0.05, max_pause=0.2)


def run(*args, code=0, **kw):
    return run_cli(*args, code=code, **kw)


def check(repo, *extra, code=0) -> dict:
    return json.loads(run("repo", "check", "--repo", repo, "--json", *extra, code=code).stdout)


@pytest.fixture
def env(monkeypatch):
    cli_env(monkeypatch)


def make_repo(path, **extra) -> FilesystemStorage:
    storage = FilesystemStorage(path, create=True)
    params = RepositoryParameters(**SMALL, **({"extra": extra} if extra else {}))
    Repository.create(storage, PASSWORD, params, KdfParams.weak_for_tests()).close()
    return storage


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    build_tree(str(root))
    return root


@pytest.fixture
def repo(env, tmp_path, src):
    """The path of a repository holding one snapshot of ``src``."""
    path = tmp_path / "repo"
    make_repo(path)
    run("snapshot", "create", "--repo", path, src)
    return path


def storage_of(repo) -> FilesystemStorage:
    return FilesystemStorage(repo)


def names(storage, prefix) -> list[str]:
    return sorted(m.name for m in storage.list(prefix))


def open_repo(repo) -> Repository:
    return Repository.open(storage_of(repo), PASSWORD, heartbeat_thread=False)


def biggest_data_pack(storage) -> str:
    return max(storage.list(C.DATA_PACK_PREFIX), key=lambda m: m.length).name


def blob_state(storage) -> dict:
    return {m.name: (m.length, m.timestamp) for m in storage.list()}


def flip_byte(storage, name: str, at: int) -> None:
    data = bytearray(storage.get(name))
    data[at] ^= 0x40
    storage.put(name, bytes(data))


def problems_of(report: dict, kind: str) -> list[dict]:
    return [p for p in report["problems"] if p["kind"] == kind]


def backup(repo, src, change: int) -> None:
    (src / f"new-{change}.bin").write_bytes(os.urandom(40_000))
    run("snapshot", "create", "--repo", repo, src)


# ---- a healthy repository ---------------------------------------------------------------------
def test_healthy_repository_after_backups_and_gc_checks_clean_then_a_lost_set_member_is_found(env, tmp_path, src):
    """Margins of a second, so the GC marks what a forgotten snapshot alone held and compacts
    the index into a set."""
    repo = tmp_path / "repo"
    make_repo(repo, safety=SECONDS.to_dict())
    for i in range(3):
        backup(repo, src, i)
    first = json.loads(run("snapshot", "list", "--repo", repo, "--json").stdout)[0]["id"]
    run("snapshot", "forget", "--repo", repo, "--id", first[:12])
    time.sleep(SECONDS.pack_age + 0.2)
    gc = json.loads(run("gc", "run", "--repo", repo, "--json").stdout)
    assert gc["steps"]["content_gc"]["marked"] > 0
    for _ in range(3):  # epochs advance, settle and are compacted
        time.sleep(SECONDS.min_epoch_duration)
        run("gc", "run", "--repo", repo)
    storage = storage_of(repo)
    assert names(storage, C.RANGE_PREFIX) or names(storage, C.COMPACTED_PREFIX)  # a compacted index is checked

    out = check(repo, "--read-data")
    assert out["healthy"] and out["problems"] == []
    assert out["counts"]["snapshots"] == 2 and out["counts"]["files"] > 20
    assert out["counts"]["contents_read"] > 0 and 0 < out["counts"]["packs_read"] <= out["counts"]["packs"]
    text = run("repo", "check", "--repo", repo).stdout
    assert "0 problem(s)" in text and "no problems found" in text

    # one member of the compacted index lost: the set is incomplete and nothing else holds its epochs
    member = (names(storage, C.RANGE_PREFIX) or names(storage, C.COMPACTED_PREFIX))[0]
    incomplete = member.replace("of1", "of2")
    storage.put(incomplete, storage.get(member))
    storage.delete(member)
    out = check(repo, code=CORRUPTION)
    [lost] = problems_of(out, "index-set")
    assert lost["blob"] == incomplete.rsplit("_", 1)[0] and "has 1 of its 2 members" in lost["message"]


# ---- faults the structural check finds ---------------------------------------------------------
def test_deleted_pack_is_reported_with_every_file_it_held(repo):
    storage = storage_of(repo)
    victim = biggest_data_pack(storage)
    storage.delete(victim)

    out = check(repo, code=CORRUPTION)
    [pack] = problems_of(out, "pack")
    assert pack["pack"] == victim and f"pack {victim} is missing" in pack["message"]
    files = problems_of(out, "file")
    assert "/docs/deep/er/random.bin" in {p["path"] for p in files}
    assert all(f"{victim}, which is missing" in p["message"] and p["snapshot"] for p in files)
    text = run("repo", "check", "--repo", repo, code=CORRUPTION).stdout
    assert f"problem: pack {victim} is missing" in text and "the repository is damaged" in text


def test_truncated_pack_is_reported_with_the_entries_beyond_its_end(repo):
    storage = storage_of(repo)
    victim = biggest_data_pack(storage)
    data = storage.get(victim)
    storage.put(victim, data[:len(data) // 2])

    out = check(repo, code=CORRUPTION)
    [pack] = problems_of(out, "pack")
    assert pack["pack"] == victim and "truncated" in pack["message"] and pack["offset"] >= len(data) // 2 - 64 * 1024
    files = problems_of(out, "file")
    assert files and all(f"beyond the end of pack {victim}" in p["message"] for p in files)


def test_flipped_byte_in_a_content_is_found_only_by_read_data_and_check_writes_nothing(repo):
    storage = storage_of(repo)
    victim = biggest_data_pack(storage)
    index = load_committed_index(storage, open_repo(repo).format)
    entry = max((e for e in index if e.pack == victim), key=lambda e: e.offset)
    flip_byte(storage, victim, entry.offset + entry.packed_length // 2)
    before = blob_state(storage)

    assert check(repo)["healthy"]  # the structure is intact
    out = check(repo, "--read-data", code=CORRUPTION)
    [bad] = problems_of(out, "content")
    assert (bad["pack"], bad["content"], bad["offset"]) == (victim, entry.content_id.hex(), entry.offset)
    assert "failed authentication" in bad["message"]
    assert blob_state(storage) == before


def test_missing_directory_object_is_reported_at_its_path_and_repair_rebuilds_it(repo):
    storage = storage_of(repo)
    r = open_repo(repo)
    root = list_snapshots(r.manifests)[0].root
    docs = next(e for e in read_directory(r.objects, root) if e.name == "docs")
    cid = bytes.fromhex(docs.oid.removeprefix(C.INDIRECT_OBJECT_PREFIX))
    entries = [e for e in load_committed_index(storage, r.format) if e.content_id != cid]
    for name in names(storage, C.INDEX_PREFIX):
        storage.delete(name)
    r.contents.epochs.write_index(entries)  # the same index, less the directory object

    out = check(repo, code=CORRUPTION)
    [d] = problems_of(out, "directory")
    assert d["path"] == "/docs" and d["content"] == cid.hex() and "is not in the index" in d["message"]
    assert problems_of(out, "file") == []  # what the directory holds cannot be reached, nothing else is wrong
    run("repo", "repair", "--repo", repo)
    assert check(repo)["healthy"]


def test_deleted_index_blob_is_found_and_repair_rebuilds_the_entries_from_packs(repo, src):
    backup(repo, src, 1)
    storage = storage_of(repo)
    first = min(storage.list(C.INDEX_PREFIX), key=lambda m: m.timestamp).name
    storage.delete(first)

    out = check(repo, code=CORRUPTION)
    missing = [p for p in out["problems"] if "is not in the index" in p["message"]]
    assert missing and {p["kind"] for p in missing} <= {"file", "directory"}
    assert out["unreferenced_packs"] and any("kdist repo repair" in n for n in out["notes"])

    dry = run("repo", "repair", "--repo", repo, "--dry-run", code=CORRUPTION).stdout
    assert "would write" in dry and first not in names(storage, C.INDEX_PREFIX)
    fixed = run("repo", "repair", "--repo", repo).stdout
    assert "entries the index lacked" in fixed and "still missing: 0" in fixed
    out = check(repo, "--read-data")
    assert out["healthy"] and out["unreferenced_packs"] == []


def test_deleted_pack_is_reuploaded_from_the_source_tree_and_restores_byte_for_byte(repo, src, tmp_path):
    storage = storage_of(repo)
    storage.delete(biggest_data_pack(storage))

    without = run("repo", "repair", "--repo", repo, code=CORRUPTION).stdout
    assert "still missing: " in without and "still damaged" in without
    before = blob_state(storage)
    dry = run("repo", "repair", "--repo", repo, "--source", src, "--dry-run", code=CORRUPTION).stdout
    assert "would re-upload" in dry and blob_state(storage) == before
    out = json.loads(run("repo", "repair", "--repo", repo, "--source", src, "--json").stdout)
    assert out["healthy"] and out["reuploaded"] > 0 and out["still_missing"] == 0

    assert check(repo, "--read-data")["healthy"]
    run("snapshot", "restore", "--repo", repo, "latest", tmp_path / "restored")
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(src))


def test_referenced_content_marked_deleted_is_reported_and_repair_undeletes_it(repo):
    storage = storage_of(repo)
    r = open_repo(repo)
    victim = next(e for e in load_committed_index(storage, r.format) if e.pack.startswith(C.DATA_PACK_PREFIX))
    r.contents.epochs.write_index([replace(victim, deleted=True, timestamp_us=victim.timestamp_us + 1)])

    out = check(repo, code=CORRUPTION)
    assert out["problems"] and all(p["content"] == victim.content_id.hex() and "marked deleted" in p["message"]
                                   for p in out["problems"])
    fixed = json.loads(run("repo", "repair", "--repo", repo, "--json").stdout)
    assert fixed["undeleted"] == 1 and fixed["healthy"]
    assert check(repo)["healthy"]


def test_pack_lost_while_another_pack_holds_copies_is_repaired_from_the_index_alone(repo, src):
    """A second writer that did not deduplicate stored the same contents again, newer: its pack
    is lost; repair points the index back at the older copies without any source tree."""
    storage = storage_of(repo)
    r = open_repo(repo)
    before = set(names(storage, C.DATA_PACK_PREFIX))
    store = ContentStore(storage, r.format, new_session_id(), committed=MergedIndex(), heartbeat_thread=False)
    with open(src / "docs" / "deep" / "er" / "random.bin", "rb") as f:
        ObjectStore(store, r.objects.splitter).write_stream(f)
    store.close()
    for name in set(names(storage, C.DATA_PACK_PREFIX)) - before:
        storage.delete(name)

    assert problems_of(check(repo, code=CORRUPTION), "pack")
    fixed = json.loads(run("repo", "repair", "--repo", repo, "--json").stdout)
    assert fixed["entries_repointed"] > 0 and fixed["entries_rebuilt"] == 0 and fixed["healthy"]
    assert check(repo, "--read-data")["healthy"]


def test_damaged_index_blob_is_rebuilt_from_packs_then_deleted(repo, src):
    """A raw index blob that no longer opens stops maintenance: repair rebuilds its entries from
    the packs, then deletes it (a dry run says so and deletes nothing)."""
    backup(repo, src, 1)
    storage = storage_of(repo)
    blob = min(storage.list(C.INDEX_PREFIX), key=lambda m: m.timestamp).name
    flip_byte(storage, blob, 40)
    dry = run("repo", "repair", "--repo", repo, "--dry-run", code=CORRUPTION).stdout
    assert f"would delete index blob {blob}" in dry and blob in names(storage, C.INDEX_PREFIX)
    fixed = json.loads(run("repo", "repair", "--repo", repo, "--json").stdout)
    assert fixed["unreadable_index_blobs_deleted"] == [blob] and fixed["entries_rebuilt"] > 0 and fixed["healthy"]
    assert blob not in names(storage, C.INDEX_PREFIX)
    assert check(repo, "--read-data")["healthy"]
    run("maintenance", "run", "--repo", repo)


@pytest.mark.parametrize("prefix, kind", [(C.MANIFEST_PREFIX, "manifest"), (C.INDEX_PREFIX, "index-blob")])
def test_corrupted_manifest_or_index_blob_is_reported_and_the_check_goes_on(repo, prefix, kind):
    storage = storage_of(repo)
    [blob] = names(storage, prefix)
    flip_byte(storage, blob, 40)

    out = check(repo, code=CORRUPTION)
    [bad] = problems_of(out, kind)
    assert bad["blob"] == blob and "failed authentication" in bad["message"]
    if kind == "manifest":  # its snapshot is gone from view; nothing else is wrong
        assert out["counts"]["snapshots"] == 0 and len(out["problems"]) == 1
    else:  # the only index blob: nothing resolves, and the check says so at the root
        [root] = problems_of(out, "directory")
        assert root["path"] == "/" and "is not in the index" in root["message"]


# ---- reading data ------------------------------------------------------------------------------
def test_read_data_percent_reads_a_seeded_sample_of_the_packs(repo, src):
    for i in range(2):
        backup(repo, src, i)
    full = check(repo, "--read-data")["counts"]
    assert full["packs_read"] >= 5
    sample = check(repo, "--read-data=10", "--seed", "7")
    assert 1 <= sample["counts"]["packs_read"] < full["packs_read"]
    assert sample["read_data"] == {"percent": 10.0, "seed": 7}
    assert check(repo, "--read-data=10%", "--seed", "7")["counts"] == sample["counts"]
    run("repo", "check", "--repo", repo, "--read-data=0", code=2)


# ---- S3 ----------------------------------------------------------------------------------------
def test_check_on_s3_finds_a_deleted_pack(env, s3_bucket, moto_client, src):
    endpoint, bucket = s3_bucket
    args = ["--repo", f"s3://{bucket}/kdist", "--endpoint-url", endpoint]
    run("repo", "create", *args)
    run("snapshot", "create", *args, src)
    assert json.loads(run("repo", "check", *args, "--read-data", "--json").stdout)["healthy"]

    keys = [o["Key"] for o in moto_client.list_objects_v2(Bucket=bucket, Prefix="kdist/")["Contents"]]
    victim = next(k for k in keys if k.rsplit("/", 1)[-1].startswith(C.DATA_PACK_PREFIX))
    moto_client.delete_object(Bucket=bucket, Key=victim)
    out = json.loads(run("repo", "check", *args, "--json", code=CORRUPTION).stdout)
    assert [p["pack"] for p in problems_of(out, "pack")] == [victim.rsplit("/", 1)[-1]]
