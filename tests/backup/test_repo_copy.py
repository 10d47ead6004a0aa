"""``kdist repo copy``: snapshots copied with their data into another repository (filesystem to
S3 and back, through the CLI), restoring there bit for bit, resumable, deduplicating against what
the destination holds, and safe beside maintenance collecting garbage in the source."""

from __future__ import annotations

import json
import os
import threading

import pytest

from repo_format.crypto import KdfParams
from repo_format.format_blob import RepositoryParameters
from repo_format.repository import Repository
from repo_format.safety import SAFETY_FULL
from repo_format.storage.memory import MemoryStorage

from kdist.copy import ORIGINAL_LABEL, SnapshotCopier, copy_snapshots
from kdist.gc.run import MaintenanceOptions, run_maintenance
from kdist.restore import Restorer
from kdist.snapshot import list_snapshots, read_directory
from kdist.tree import object_contents
from kdist.uploader import BackupOptions, Uploader
from kdist_trees import PASSWORD, cli_env, full_metadata, rich_tree, run_cli, without_socket

MIB = 1024 * 1024


def repo_at(request, kind: str, tmp_path, name: str) -> list[str]:
    if kind == "fs":
        return ["--repo", str(tmp_path / name)]
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return ["--repo", f"s3://{bucket}/{name}", "--endpoint-url", endpoint]


def as_destination(args: list[str]) -> list[str]:
    out = ["--to", args[1]]
    if "--endpoint-url" in args:
        out += ["--to-endpoint-url", args[args.index("--endpoint-url") + 1]]
    return out


@pytest.mark.parametrize("kinds", [("fs", "s3", "2"), ("s3", "fs", "2"), ("fs", "fs", "3")],
                         ids=["fs-to-s3", "s3-to-fs", "format-2-to-format-3"])
def test_copies_restore_bit_for_bit_and_a_second_run_copies_only_what_is_new(request, monkeypatch, tmp_path,
                                                                               kinds):
    """Also the way from format 2 to format 3 (SPEC.md section 4a: every record differs)."""
    cli_env(monkeypatch)
    monkeypatch.setenv("KDIST_TO_PASSWORD", "the other repository's password")
    source, dest = repo_at(request, kinds[0], tmp_path, "source"), repo_at(request, kinds[1], tmp_path, "offsite")
    run_cli("repo", "create", *source)
    run_cli("repo", "create", dest[0], dest[1], *dest[2:], "--password-file", _password_file(tmp_path),
            "--format-version", kinds[2])
    status = run_cli("repo", "status", *dest, "--json", env={"KDIST_PASSWORD": "the other repository's password"})
    assert json.loads(status.stdout)["format_version"] == int(kinds[2])
    src = tmp_path / "src"
    rich_tree(src)
    with open(src / "disk.img", "wb") as f:  # a sparse file: its holes are copied as holes
        f.truncate(32 * MIB)
        f.seek(8 * MIB)
        f.write(os.urandom(4096))
    first = json.loads(run_cli("snapshot", "create", *source, src, "--tag", "nightly", "--json").stdout)[0]
    (src / "plain").write_bytes(b"changed\n")
    second = json.loads(run_cli("snapshot", "create", *source, src, "--json").stdout)[0]

    plan = json.loads(run_cli("repo", "copy", *source, *as_destination(dest), "--dry-run", "--json").stdout)
    assert plan == {"would_copy": [first["id"], second["id"]], "copied_before": 0}
    got = json.loads(run_cli("repo", "copy", *source, *as_destination(dest), "--json").stdout)
    assert [c[0] for c in got["copied"]] == [first["id"], second["id"]] and got["failed"] == []
    # the second snapshot's unchanged files were not read again (nor any hole)
    assert got["bytes_read"] == first["totals"]["bytes_read"] + len(b"changed\n")

    copies = json.loads(run_cli("snapshot", "list", *dest, "--json",
                                env={"KDIST_PASSWORD": "the other repository's password"}).stdout)
    for copy, original in zip(copies, (first, second)):
        for k in ("source", "start", "end", "totals", "tags", "description"):
            assert copy[k] == original[k], k
    out = tmp_path / "out"
    run_cli("snapshot", "restore", *dest, copies[1]["id"], out,
            env={"KDIST_PASSWORD": "the other repository's password"})
    assert full_metadata(out) == without_socket(full_metadata(src))
    assert os.stat(out / "disk.img").st_blocks == os.stat(src / "disk.img").st_blocks

    again = json.loads(run_cli("repo", "copy", *source, *as_destination(dest), "--json").stdout)
    assert again["copied"] == [] and sorted(again["skipped"]) == sorted([first["id"], second["id"]])
    (src / "new-file").write_bytes(os.urandom(20_000))
    third = json.loads(run_cli("snapshot", "create", *source, src, "--json").stdout)[0]
    once_more = json.loads(run_cli("repo", "copy", *source, *as_destination(dest), "--json").stdout)
    assert [c[0] for c in once_more["copied"]] == [third["id"]]
    assert once_more["new_bytes"] < 200_000  # the new file, directories: the rest was there


def _password_file(tmp_path) -> str:
    p = tmp_path / "offsite-password"
    p.write_text("the other repository's password\n")
    return str(p)


def _memory_repo(params=None, clock=None) -> Repository:
    storage = MemoryStorage(clock=clock) if clock else MemoryStorage()
    Repository.create(storage, PASSWORD, params, KdfParams.weak_for_tests()).close()
    return Repository.open(storage, PASSWORD, heartbeat_thread=False)


def test_a_copy_deduplicates_against_the_destination_s_own_backups(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    source, destination = _memory_repo(), _memory_repo()
    snap = Uploader(source, BackupOptions()).backup(str(src))
    Uploader(destination, BackupOptions()).backup(str(src))  # the destination backed up the same files itself
    report = copy_snapshots(source, destination, [snap])
    assert len(report.copied) == 1 and report.bytes_read == 8 * 300_000
    assert report.new_bytes < 20_000  # cut by the destination's chunker: every chunk was there
    (copy,) = [s for s in list_snapshots(destination.manifests) if s.id == report.copied[0][1]]
    labels = destination.manifests.find(type="snapshot", checkpoint="0")
    assert {r.labels.get(ORIGINAL_LABEL, "").split(":")[-1] for r in labels} >= {snap.id}
    Restorer(destination).restore(copy, str(tmp_path / "out"))
    assert all((tmp_path / "out" / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes() for i in range(8))


def test_a_copy_into_format_3_gives_each_host_its_own_trees(tmp_path):
    """Two hosts' snapshots of one tree, copied in one run into a format 3 repository: each
    copy's directory objects and chunk lists are its host's own (SPEC.md section 4a), not the
    first host's copies reused, and both restore."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(300_000))  # a chunk list
    (src / "small").write_bytes(b"small")
    source = _memory_repo()
    storage = MemoryStorage()
    Repository.create(storage, PASSWORD, PARAMS, KdfParams.weak_for_tests(), version=3).close()  # (small chunks)
    destination = Repository.open(storage, PASSWORD, heartbeat_thread=False)
    snaps = [Uploader(source, BackupOptions(host=h)).backup(str(src)) for h in ("web1", "web2")]
    assert snaps[0].root == snaps[1].root  # format 2: one tree for both
    report = copy_snapshots(source, destination, snaps)
    copies = {s.source.host: s for s in list_snapshots(destination.manifests)}
    assert len(report.copied) == 2 and copies["web1"].root != copies["web2"].root
    bigs = [{e.name: e for e in read_directory(destination.objects, copies[h].root)}["big"].oid for h in copies]
    assert bigs[0] != bigs[1]  # the chunk lists too
    for h, copy in copies.items():
        Restorer(destination).restore(copy, str(tmp_path / h))
        assert (tmp_path / h / "big").read_bytes() == (src / "big").read_bytes()


def test_a_partial_snapshot_is_copied_as_partial(tmp_path):
    """A snapshot of only listed paths stays one in the copy: retention keeps it apart from
    the whole ones there too, and a whole backup does not compare with it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "listed").write_bytes(b"listed")
    (src / "other").write_bytes(b"other")
    source, destination = _memory_repo(), _memory_repo()
    whole = Uploader(source, BackupOptions()).backup(str(src))
    part = Uploader(source, BackupOptions(files=[str(src / "listed")])).backup(str(src))
    assert part.partial and not whole.partial
    copy_snapshots(source, destination, [whole, part])
    assert [s.partial for s in list_snapshots(destination.manifests)] == [False, True]


SAFETY = SAFETY_FULL.scaled(1 / 3600)
PARAMS = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024, chunk_avg=16 * 1024,
                              chunk_min=4 * 1024, chunk_max=64 * 1024, extra={"safety": SAFETY.to_dict()})


def test_a_copy_beside_maintenance_collecting_garbage_in_the_source(tmp_path, virtual_time, monkeypatch):
    """Maintenance runs GC cycles on the source while a copy reads from it (the copy waits until
    one cycle has finished before it reads its first file): the forgotten snapshot's data is
    collected, the copied one is whole in the destination."""
    source = _memory_repo(PARAMS, clock=lambda: virtual_time[0])
    src, junk = tmp_path / "src", tmp_path / "junk"
    rich_tree(src)
    junk.mkdir()
    (junk / "big").write_bytes(os.urandom(400_000))
    keep = Uploader(source, BackupOptions()).backup(str(src))
    gone = Uploader(source, BackupOptions()).backup(str(junk))
    gone_contents = [c for e in read_directory(source.objects, gone.root) for c in object_contents(source.objects, e.oid)]
    source.manifests.delete([gone.id])
    storage = source.storage
    source.close()
    destination = _memory_repo()

    cycles, copying_done, stop = threading.Event(), threading.Event(), []

    def maintenance():
        n = 0
        while not copying_done.is_set() or n < 4:
            virtual_time[0] += 3 * SAFETY.pack_age + SAFETY.drop_margin
            repo = Repository.open(storage, PASSWORD)
            try:
                run_maintenance(repo, MaintenanceOptions(full=True))
            except BaseException as exc:  # the test fails on it below
                stop.append(exc)
                return
            finally:
                repo.close()
            n += 1
            cycles.set()

    real = SnapshotCopier._copy_file

    def after_a_cycle(self, e):
        assert cycles.wait(120), "no maintenance cycle finished"
        return real(self, e)

    monkeypatch.setattr(SnapshotCopier, "_copy_file", after_a_cycle)
    worker = threading.Thread(target=maintenance)
    worker.start()
    try:
        reader = Repository.open(storage, PASSWORD)
        report = copy_snapshots(reader, destination, [keep])
    finally:
        copying_done.set()
        worker.join(300)
    assert not stop and not worker.is_alive()
    assert report.failed == [] and len(report.copied) == 1
    assert not any(Repository.open(storage, PASSWORD).contents.contains_many(gone_contents))  # collected
    (copy,) = list_snapshots(destination.manifests)
    Restorer(destination).restore(copy, str(tmp_path / "out"))
    assert full_metadata(tmp_path / "out") == without_socket(full_metadata(src))


def test_a_snapshot_that_cannot_be_read_is_reported_and_the_others_are_copied(tmp_path):
    source, destination = _memory_repo(), _memory_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    good = Uploader(source, BackupOptions()).backup(str(src))
    (src / "g").write_bytes(os.urandom(70_000))
    bad = Uploader(source, BackupOptions()).backup(str(src))
    g = next(e for e in read_directory(source.objects, bad.root) if e.name == "g")
    for pack in {source.contents.lookup(c).pack for c in object_contents(source.objects, g.oid)}:
        source.storage.delete(pack)  # the data of g is lost in the source
    report = copy_snapshots(source, destination, [good, bad])
    assert [c[0] for c in report.copied] == [good.id]
    assert [f[0] for f in report.failed] == [bad.id] and "cannot copy file 'g'" in report.failed[0][1]


def test_what_a_copy_must_not_take_for_a_snapshot(tmp_path, monkeypatch):
    """A checkpoint is not copied as if it were a snapshot; a copy made from a directory whose
    writer did not record attributes says so (the destination's next backup records them); and
    a record claiming to be the copy of another source's snapshot does not count."""
    import kdist.uploader as uploader
    from kdist.copy import ORIGINAL_LABEL, original_key
    from kdist.snapshot import TYPE_DIR, Entry, Source, read_listing

    source, destination = _memory_repo(), _memory_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", "user.note", b"kept")
    real = uploader.encode_directory
    with monkeypatch.context() as m:  # kdist before attributes: no "x", no attributes
        m.setattr(uploader, "encode_directory", lambda entries, top=None, complete=True: real(
            [Entry(**{**e.__dict__, "xattrs": []}) for e in entries], None, complete=False))
        old = Uploader(source, BackupOptions()).backup(str(src), Source("h", "u", "/data"))
    part = Uploader(source, BackupOptions())
    part._begin(Source("h", "u", "/data"), 0)
    checkpoint = part._publish(Entry("", TYPE_DIR, oid=old.root), checkpoint=True)
    # a spoofed copy record: another source's snapshot labelled as the copy of ``old``
    fake = Uploader(destination, BackupOptions()).backup(str(src), Source("other", "u", "/x"))
    destination.manifests.put({**fake.labels(), ORIGINAL_LABEL: original_key(source, old)}, fake.payload())

    report = copy_snapshots(source, destination, [old, checkpoint])
    assert [c[0] for c in report.copied] == [old.id]  # copied despite the spoofed record
    assert report.failed == [(checkpoint.id, "a checkpoint of a backup that did not finish: not copied")]
    copy = next(s for s in list_snapshots(destination.manifests) if s.id == report.copied[0][1])
    assert not read_listing(destination.objects, copy.root).complete
    again = Uploader(destination, BackupOptions()).backup(str(src), Source("h", "u", "/data"))
    f = next(e for e in read_listing(destination.objects, again.root).entries if e.name == "f")
    assert f.xattrs == [(b"user.note", b"kept")]  # recorded, though the file had not changed


def test_a_host_key_destination_is_offered_its_own_host_s_snapshots(monkeypatch, tmp_path):
    """An off-site repository a host writes to with its host key: the copy takes that host's
    snapshots and leaves the others' alone (exit 0), as the host could not publish them."""
    from repo_format.storage import open_storage

    from kdist.keys import add_key
    from kdist.snapshot import Source

    cli_env(monkeypatch)
    source = ["--repo", str(tmp_path / "source")]
    run_cli("repo", "create", *source)
    run_cli("repo", "create", "--repo", str(tmp_path / "offsite"))
    admin = Repository.open(open_storage(str(tmp_path / "offsite")), PASSWORD)
    slot = add_key(admin, "web1-password", "host", "web1", kdf=KdfParams.weak_for_tests()).slot
    admin.close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    repo = Repository.open(open_storage(str(tmp_path / "source")), PASSWORD)
    mine = Uploader(repo, BackupOptions()).backup(str(src), Source("web1", "root", "/srv"))
    Uploader(repo, BackupOptions()).backup(str(src), Source("db1", "root", "/var"))
    repo.close()
    monkeypatch.setenv("KDIST_TO_PASSWORD", "web1-password")
    got = json.loads(run_cli("repo", "copy", *source, "--to", tmp_path / "offsite", "--to-key-id", slot,
                             "--json").stdout)
    assert [c[0] for c in got["copied"]] == [mine.id] and got["failed"] == []
    listed = json.loads(run_cli("snapshot", "list", "--repo", tmp_path / "offsite", "--json").stdout)
    assert [(s["source"]["host"], s["source"]["path"]) for s in listed] == [("web1", "/srv")]
