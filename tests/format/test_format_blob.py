"""The format blob: create, open, password change, and refusal of what a reader must not trust."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from repo_format import constants as C
from repo_format import format_blob
from repo_format.crypto import WEAK_KDF_ENV, KdfParams, unkeyed_checksum
from repo_format.errors import (
    KdistError,
    CorruptionError,
    RepositoryExists,
    RepositoryNotFound,
    UnsupportedVersion,
    WrongPassword,
)
from repo_format.format_blob import RepositoryParameters
from repo_format.repository import Repository
from repo_format.storage.memory import MemoryStorage


def _blobs(storage) -> dict[str, tuple[int, bytes]]:
    return {m.name: (m.length, storage.get(m.name)) for m in storage.list()}


def _edit_header(blob: bytes, edit) -> bytes:
    """Re-encode the format blob after ``edit(header dict)``, with a valid checksum."""
    _, version, header_len = C.FORMAT_PREAMBLE.unpack_from(blob)
    header = msgpack.unpackb(blob[C.FORMAT_PREAMBLE.size:C.FORMAT_PREAMBLE.size + header_len])
    edit(header)
    raw = msgpack.packb(header)
    body = C.FORMAT_PREAMBLE.pack(C.FORMAT_MAGIC, version, len(raw)) + raw
    return body + unkeyed_checksum(body)


def test_create_open_round_trip(storage, password, small_parameters):
    created = Repository.create(storage, password, small_parameters, KdfParams.weak_for_tests())
    opened = Repository.open(storage, password)
    assert opened.format == created.format
    assert opened.parameters == small_parameters
    # the format blob, epoch 0's markers (signed, older kind) and the signed-sets blob
    names = sorted(m.name for m in storage.list())
    assert names[0] == C.FORMAT_BLOB_NAME and names[1] == C.EPOCH_MARKER_PREFIX + "0" and len(names) == 4
    assert names[2].startswith(C.EPOCH_MARKER_PREFIX + "0_") and names[3].startswith(C.SIGNED_SETS_PREFIX)


def test_change_password_keeps_keys_and_rewrites_only_the_format_blob(repo, password):
    data = [b"written before the change %d" % i * 30 for i in range(50)]
    ids = [repo.contents.write(d) for d in data]
    repo.flush()
    storage = repo.storage
    before = _blobs(storage)

    changed = format_blob.change_password(storage, password, "a new password")

    after = _blobs(storage)
    assert set(after) == set(before)
    assert [n for n in before if before[n] != after[n]] == [C.FORMAT_BLOB_NAME]
    assert changed.keys == repo.format.keys and changed.unique_id == repo.format.unique_id
    assert changed.kdf.salt != repo.format.kdf.salt
    with pytest.raises(WrongPassword):
        Repository.open(storage, password)
    reopened = Repository.open(storage, "a new password")
    assert reopened.format.keys == repo.format.keys
    assert reopened.format.parameters == repo.format.parameters
    assert [reopened.contents.read(i) for i in ids] == data


def test_second_create_is_refused_and_changes_nothing(repo, password):
    before = _blobs(repo.storage)
    with pytest.raises(RepositoryExists, match="already exists"):
        Repository.create(repo.storage, "another password", kdf=KdfParams.weak_for_tests())
    assert _blobs(repo.storage) == before
    assert Repository.open(repo.storage, password).format == repo.format


def test_empty_storage_is_not_a_repository(password):
    with pytest.raises(RepositoryNotFound, match="no kdist repository"):
        Repository.open(MemoryStorage(), password)


def test_wrong_password(repo):
    with pytest.raises(WrongPassword, match="wrong password"):
        Repository.open(repo.storage, "not the password")
    with pytest.raises(WrongPassword):
        Repository.open(repo.storage, "")


def test_unknown_format_version_is_refused_clearly(repo, password):
    blob = repo.storage.get(C.FORMAT_BLOB_NAME)
    end = len(blob) - C.FORMAT_CHECKSUM_SIZE
    body = bytearray(blob[:end])
    body[8:10] = (max(C.FORMAT_VERSIONS_READ) + 1).to_bytes(2, "big")
    repo.storage.put(C.FORMAT_BLOB_NAME, bytes(body) + unkeyed_checksum(bytes(body)))
    with pytest.raises(UnsupportedVersion) as info:
        Repository.open(repo.storage, password)
    message = str(info.value)
    assert f"version {max(C.FORMAT_VERSIONS_READ) + 1}" in message and "versions 1, 2, 3" in message and "upgrade" in message


@pytest.mark.parametrize("change", [
    {"n": 2**30}, {"n": 2**23}, {"n": 3}, {"n": 1}, {"n": "16"}, {"r": 0}, {"r": 1000}, {"p": 0},
    {"p": 100}, {"salt": b"short"}, {"salt": "a string salt"}, {"n": 2**22, "r": 8},
    {"n": -(2**20)}, {"n": None},
], ids=repr)
def test_out_of_range_kdf_parameters_are_corruption_without_running_the_kdf(repo, password, monkeypatch, change):
    def no_scrypt(*args, **kwargs):
        raise AssertionError("scrypt must not run with out-of-range parameters")

    monkeypatch.setattr(hashlib, "scrypt", no_scrypt)
    blob = _edit_header(repo.storage.get(C.FORMAT_BLOB_NAME), lambda h: h["kdf"].update(change))
    with pytest.raises(CorruptionError, match="key derivation"):
        format_blob.decode(blob, password)


@pytest.mark.parametrize("edit", [
    lambda h: h.pop("kdf"), lambda h: h["kdf"].pop("salt"), lambda h: h.update(kdf=[1, 2]),
    lambda h: h.update(unique_id="text"), lambda h: h.update(sealed=5),
], ids=["no kdf", "no salt", "kdf list", "unique_id str", "sealed int"])
def test_malformed_header_is_corruption(repo, password, edit):
    blob = _edit_header(repo.storage.get(C.FORMAT_BLOB_NAME), edit)
    with pytest.raises(CorruptionError):
        format_blob.decode(blob, password)


def test_unknown_kdf_algorithm_is_unsupported(repo, password):
    blob = _edit_header(repo.storage.get(C.FORMAT_BLOB_NAME), lambda h: h["kdf"].update(algorithm="argon2id"))
    with pytest.raises(UnsupportedVersion, match="argon2id"):
        format_blob.decode(blob, password)


def test_weak_kdf_is_refused_without_the_test_variable(repo, password, monkeypatch):
    monkeypatch.delenv(WEAK_KDF_ENV)
    with pytest.raises(KdistError, match=WEAK_KDF_ENV):
        KdfParams.weak_for_tests()
    with pytest.raises(CorruptionError, match="test-only"):
        Repository.open(repo.storage, password)  # the repo fixture was created with a weak KDF
    monkeypatch.setenv(WEAK_KDF_ENV, "0")
    with pytest.raises(CorruptionError, match="test-only"):
        Repository.open(repo.storage, password)


def test_parameters_are_validated_on_create(storage, password):
    with pytest.raises(CorruptionError, match="pack sizes"):
        Repository.create(storage, password, RepositoryParameters(pack_size=1024), KdfParams.weak_for_tests())
    with pytest.raises(UnsupportedVersion):
        Repository.create(storage, password, RepositoryParameters(aead="rot13"), KdfParams.weak_for_tests())
    assert list(storage.list()) == []


def test_chacha_repository_round_trips(storage, password, small_parameters):
    params = RepositoryParameters(**{**small_parameters.to_dict(), "aead": C.AEAD_CHACHA20_POLY1305})
    repo = Repository.create(storage, password, params, KdfParams.weak_for_tests())
    oid = repo.objects.write_bytes(b"chacha " * 2000)
    repo.flush()
    reopened = Repository.open(storage, password)
    assert reopened.format.keys.aead_algorithm == C.AEAD_CHACHA20_POLY1305
    assert reopened.objects.read_all(oid) == b"chacha " * 2000


def test_key_material_never_shows_in_repr(repo):
    text = repr(repo.format.keys) + repr(repo.format)
    assert repo.format.keys.master_key.hex() not in text
    assert repr(repo.format.keys.master_key) not in text
