"""Fixtures for the snapshot layer: small repositories and source trees with every kind of entry."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")

from repo_format.crypto import KdfParams  # noqa: E402
from repo_format.format_blob import RepositoryParameters  # noqa: E402
from repo_format.repository import Repository  # noqa: E402
from repo_format.storage.memory import MemoryStorage  # noqa: E402
from repo_format.storage.wrappers import AppendOnlyStorage  # noqa: E402

# Small packs and chunks so that small trees still span many packs and chunks.
SMALL = RepositoryParameters(pack_size=256 * 1024, metadata_pack_size=64 * 1024,
                             chunk_avg=16 * 1024, chunk_min=4 * 1024, chunk_max=64 * 1024)
from kdist_trees import PASSWORD  # noqa: E402


@pytest.fixture
def storage():
    return MemoryStorage()


# Writers are append-only (gc/README.md, writer rules; SECURITY.md): every backup test writes
# through a storage that refuses deletes and replacements, as a host's storage policy does.
# Tests that play maintenance use ``storage``, the storage underneath.


@pytest.fixture
def repo(storage):
    return Repository.create(AppendOnlyStorage(storage), PASSWORD, SMALL, KdfParams.weak_for_tests())


@pytest.fixture
def dir_repo(tmp_path):
    """A repository in the directory ``tmp_path / "repo"``, which other processes can share."""
    from repo_format.storage import open_storage
    from repo_format.storage.wrappers import CountingStorage

    repo = Repository.create(AppendOnlyStorage(CountingStorage(open_storage(str(tmp_path / "repo"), create=True))),
                             PASSWORD, SMALL, KdfParams.weak_for_tests())
    yield repo
    repo.close()



@pytest.fixture(params=["fs", "s3"])
def cli_repo_args(request, monkeypatch, tmp_path):
    """A new repository for CLI tests (test password, no inherited settings), on the filesystem
    and on S3 (moto's server): the arguments that name it."""
    from kdist_trees import cli_env, run_cli

    cli_env(monkeypatch)
    if request.param == "fs":
        args = ["--repo", str(tmp_path / "repo")]
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        args = ["--repo", f"s3://{bucket}/cli", "--endpoint-url", endpoint]
    run_cli("repo", "create", *args)
    return args
