"""The disk blob store: both ways of writing a blob leave the same store."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from puzzlefs.digest import Digest
from puzzlefs.oci import DiskBlobStore


@pytest.fixture(params=["unnamed", "named"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DiskBlobStore:
    s = DiskBlobStore(tmp_path / "blobs" / "sha256")
    if request.param == "named":
        s._tmpfile = False  # what a filesystem without O_TMPFILE gets
    return s


def test_put_then_get(store: DiskBlobStore) -> None:
    data = os.urandom(300_000)
    old = os.umask(0o077)  # blobs are readable by all whatever the umask
    try:
        digest = store.put(data)
    finally:
        os.umask(old)
    assert digest == Digest(hashlib.sha256(data).hexdigest())
    assert store.get(digest) == data
    path = store.path(digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(store.root) == [digest.hex]  # no temporary file left


def test_put_existing_is_a_no_op(store: DiskBlobStore) -> None:
    digest = store.put(b"same bytes")
    mtime = store.path(digest).stat().st_mtime_ns
    assert store.put_verified(digest, b"same bytes") is False
    assert store.path(digest).stat().st_mtime_ns == mtime


def test_racing_writer_of_the_same_blob(
    store: DiskBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process stores the blob between our existence check and our link.
    data = b"raced"
    digest = Digest(hashlib.sha256(data).hexdigest())
    other = DiskBlobStore(store.root)
    real_exists = os.path.exists
    raced = []

    def exists_then_the_other_writes(path: str) -> bool:
        found = real_exists(path)
        if not raced and path.endswith(digest.hex):
            raced.append(True)
            assert other.put(data) == digest
        return found

    monkeypatch.setattr(os.path, "exists", exists_then_the_other_writes)
    stored = store.put_verified(digest, data)
    monkeypatch.undo()
    assert raced
    assert store.get(digest) == data
    assert os.listdir(store.root) == [digest.hex]
    # O_TMPFILE's link finds the other's blob and says so; a rename replaces it
    # with the same bytes.
    assert stored is (not store._tmpfile)


def test_o_tmpfile_is_used_where_the_filesystem_has_it(tmp_path: Path) -> None:
    # ext4, xfs, btrfs and tmpfs all have it: the fallback is for the others.
    store = DiskBlobStore(tmp_path / "blobs")
    store.put(b"x")
    assert store._tmpfile
