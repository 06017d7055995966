"""The blob store contract, run over every implementation (as dulwich runs one object
store suite over its disk and memory stores): the disk store both ways it writes (an
unnamed O_TMPFILE file linked into place, and a named temporary file renamed into
place, what a filesystem without O_TMPFILE gets), the memory store, and the faulty
store of the fault tests with no fault armed. Then what only a directory can do
wrong: files at a blob's name that are not blobs."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from stores import FaultyBlobStore

from puzzlefs._files import AtomicDir
from puzzlefs.digest import Digest
from puzzlefs.errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    InvalidDigest,
    UnsafeFile,
)
from puzzlefs.oci import BlobStore, DiskBlobStore, MemoryBlobStore


@dataclass
class Case:
    store: BlobStore
    tamper: Callable[[Digest, bytes], None]  # replace a blob's bytes, unchecked
    disk: bool


def _disk_tamper(store: DiskBlobStore) -> Callable[[Digest, bytes], None]:
    def tamper(digest: Digest, data: bytes) -> None:
        path = store.path(digest)
        path.chmod(0o644)
        path.write_bytes(data)

    return tamper


def _disk(root: Path, named: bool = False) -> Case:
    s = DiskBlobStore(root)
    if named:
        s._dir.unnamed = False  # what a filesystem without O_TMPFILE gets
    return Case(s, _disk_tamper(s), True)


def _memory(root: Path) -> Case:
    s = MemoryBlobStore()
    return Case(s, s.corrupt, False)


def _faulty(root: Path) -> Case:
    s = FaultyBlobStore(root)
    return Case(s, _disk_tamper(s), True)


STORES: dict[str, Callable[[Path], Case]] = {
    "disk-unnamed": _disk,
    "disk-named": lambda root: _disk(root, named=True),
    "memory": _memory,
    "faulty-unarmed": _faulty,
}


@pytest.fixture(params=sorted(STORES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return STORES[request.param](tmp_path / "blobs" / "sha256")


def _disk_only(case: Case) -> DiskBlobStore:
    if not case.disk:
        pytest.skip("a property of stores that are directories")
    assert isinstance(case.store, DiskBlobStore)
    return case.store


# -- the contract -------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"x", os.urandom(300_000)], ids=["empty", "1", "300K"])
def test_put_then_get(case: Case, data: bytes) -> None:
    digest = case.store.put(data)
    assert digest == Digest(hashlib.sha256(data).hexdigest())
    assert case.store.has(digest)
    assert case.store.size(digest) == len(data)
    assert case.store.get(digest) == data
    assert case.store.get(digest, size=len(data), limit=len(data)) == data


def test_put_a_memoryview(case: Case) -> None:
    buf = bytearray(os.urandom(5000))
    expected = bytes(buf[1000:2000])
    digest = case.store.put(memoryview(buf)[1000:2000])
    buf[:] = bytes(5000)  # the store kept its own copy
    assert case.store.get(digest) == expected


def test_put_existing_is_a_no_op(case: Case) -> None:
    digest = case.store.put(b"same bytes")
    assert case.store.put_verified(digest, b"same bytes") is False
    assert case.store.get(digest) == b"same bytes"


def test_missing_blob(case: Case) -> None:
    digest = Digest.of(b"never stored")
    assert not case.store.has(digest)
    for call in (lambda: case.store.get(digest), lambda: case.store.size(digest)):
        with pytest.raises(BlobNotFound) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, ImageError)
        assert digest.hex in str(info.value)


def test_tampered_blob_is_refused_unless_the_caller_verifies(case: Case) -> None:
    digest = case.store.put(b"original")
    case.tamper(digest, b"tampered")
    with pytest.raises(DigestMismatch) as info:
        case.store.get(digest)
    assert info.value.expected == digest.hex
    assert info.value.actual == Digest.of(b"tampered").hex
    assert case.store.get(digest, verify=False) == b"tampered"


def test_size_and_limit_are_checked_before_the_digest(case: Case) -> None:
    digest = case.store.put(b"12345")
    with pytest.raises(ImageError, match="size 5, its descriptor says 6") as wrong:
        case.store.get(digest, size=6)
    assert not isinstance(wrong.value, DigestMismatch)
    with pytest.raises(UnsafeFile, match="more than it can be"):
        case.store.get(digest, limit=4)
    assert case.store.get(digest, size=5, limit=5) == b"12345"


def test_concurrent_writers_of_one_blob(case: Case) -> None:
    data = os.urandom(100_000)
    digest = Digest.of(data)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def put() -> None:
        barrier.wait()
        results.append(case.store.put_verified(digest, data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and any(results)
    assert case.store.get(digest) == data
    if case.disk:
        assert isinstance(case.store, DiskBlobStore)
        assert os.listdir(case.store.root) == [digest.hex]


def test_sync(case: Case) -> None:
    case.store.sync()  # nothing stored yet
    case.store.put(b"x")
    case.store.sync()


def test_collecting_alone_and_while_a_writer_works(case: Case) -> None:
    with case.store.collecting(wait=False) as alone:
        assert alone
    if not case.disk:
        return  # a memory store has no other process to exclude
    done = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with case.store.writing():
            done.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert done.wait(10)
        with case.store.collecting(wait=False) as alone:
            assert not alone
        with case.store.writing():  # writers share the store
            pass
    finally:
        release.set()
        t.join()
    with case.store.collecting(wait=False) as alone:
        assert alone


@pytest.mark.parametrize("bad", ["../../etc/passwd", "sha256:" + "0" * 64, "A" * 64, ""])
def test_hostile_digests_never_become_paths(bad: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest(bad)


# -- directories: what a disk store must not trust ----------------------------------


def test_blobs_are_readable_by_all_and_leave_no_temporary(case: Case) -> None:
    store = _disk_only(case)
    old = os.umask(0o077)
    try:
        digest = store.put(os.urandom(300_000))
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path(digest).stat().st_mode) == 0o644
    assert os.listdir(store.root) == [digest.hex]


def _planted(store: DiskBlobStore, kind: str, data: bytes) -> Digest:
    """Something that is not a blob, at the name of ``data``'s blob."""
    digest = Digest.of(data)
    store.root.mkdir(parents=True, exist_ok=True)
    path = store.path(digest)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "symlink-to-a-blob":
        other = store.put(b"another blob")
        os.symlink(other.hex, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    return digest


KINDS = ["fifo", "symlink-to-dev-zero", "symlink-to-a-blob", "directory", "device"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_blob_is_refused_at_once(case: Case, kind: str) -> None:
    store = _disk_only(case)
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    data = b"the real blob"
    digest = _planted(store, kind, data)
    start = time.monotonic()
    assert not store.has(digest)
    with pytest.raises(UnsafeFile, match="not a regular file"):
        store.get(digest)
    with pytest.raises(UnsafeFile):
        store.size(digest)
    assert time.monotonic() - start < 5  # a FIFO did not make us wait for a writer
    if kind == "directory":
        with pytest.raises(OSError):  # not ours to remove
            store.put(data)
        return
    assert store.put(data) == digest  # replaced by the real blob
    assert store.get(digest) == data
    assert stat.S_ISREG(os.lstat(store.path(digest)).st_mode)


def test_a_huge_sparse_blob_is_refused_before_it_is_read(case: Case) -> None:
    store = _disk_only(case)
    digest = store.put(b"small")
    path = store.path(digest)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.truncate(3 << 30)  # 3 GiB, no disk used
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ImageError, match="its descriptor says 5"):
        store.get(digest, size=5)
    with pytest.raises(UnsafeFile, match="more than it can be"):
        store.get(digest, limit=16 << 20)
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_a_racing_writer_of_the_same_name(tmp_path: Path, unnamed: bool) -> None:
    """Between a writer's existence check and its link, another stores the blob:
    the unnamed file's link finds it and says so; a rename replaces it with the same
    bytes. Either way one whole file, nothing left behind."""
    d = AtomicDir(tmp_path)
    d.unnamed = unnamed
    assert AtomicDir(tmp_path).write("name", b"same", keep_existing=True, durable=False)
    assert d.write("name", b"same", keep_existing=True, durable=False) is (not unnamed)
    assert os.listdir(tmp_path) == ["name"]
    assert (tmp_path / "name").read_bytes() == b"same"


def test_o_tmpfile_is_used_where_the_filesystem_has_it(tmp_path: Path) -> None:
    # ext4, xfs, btrfs and tmpfs all have it: the fallback is for the others.
    store = DiskBlobStore(tmp_path / "blobs")
    store.put(b"x")
    assert store._dir.unnamed


# -- the faulty store's faults ------------------------------------------------------


def test_faulty_store_fails_the_put_it_was_told_to(tmp_path: Path) -> None:
    store = FaultyBlobStore(tmp_path / "blobs", fail_put_after=2)
    store.put(b"1")
    store.put(b"2")
    assert store.put_verified(Digest.of(b"1"), b"1") is False  # present: not a new blob
    with pytest.raises(OSError) as info:
        store.put(b"3")
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(store.root)) == sorted([Digest.of(b"1").hex, Digest.of(b"2").hex])
    assert store.puts == 2


def test_faulty_store_read_and_sync_faults(tmp_path: Path) -> None:
    digest = Digest.of(b"bad sector")
    store = FaultyBlobStore(tmp_path / "blobs", fail_read={digest}, fail_sync=errno.EIO)
    store.put(b"bad sector")
    with pytest.raises(OSError, match="Input/output error"):
        store.get(digest)
    with pytest.raises(OSError, match="Input/output error"):
        store.sync()
