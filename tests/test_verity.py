"""fs-verity: golden digests, the Debian ``fsverity`` tool as oracle, ioctl layouts, and
the real kernel path when a filesystem with fs-verity can be mounted."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puzzlefs import verity
from puzzlefs.errors import VerityUnsupported
from puzzlefs.verity import (
    FS_IOC_ENABLE_VERITY,
    FS_IOC_MEASURE_VERITY,
    enable_and_measure_path,
    enable_verity,
    fsverity_digest,
    fsverity_digest_fd,
    fsverity_digest_file,
    measure_verity,
    pack_descriptor,
    pack_enable_arg,
    pack_measure_arg,
    unpack_measure_arg,
)

BLOCK = 4096


def _shared_dir() -> Path | None:
    beside = Path(__file__).resolve().parents[2] / "shared"
    if beside.is_dir():
        return beside
    env = os.environ.get("PUZZLEFS_SHARED")
    return Path(env) if env and Path(env).is_dir() else None


SHARED = _shared_dir()
VECTORS = SHARED / "vectors" if SHARED else None
BLOBS: dict[str, Any] = (
    json.loads((VECTORS / "blobs.json").read_text()) if VECTORS is not None else {}
)
_NO_VECTORS = pytest.param(
    None, None, marks=pytest.mark.skip(reason="shared/ not found (set PUZZLEFS_SHARED)")
)

_PATTERN = bytes((i * 7 + 3) % 251 for i in range(251))


def generated(size: int) -> bytes:
    """``bytes((i*7+3) % 251 for i in range(size))``, by tiling its 251-byte period."""
    return (_PATTERN * (size // 251 + 1))[:size]


def reference_digest(data: bytes) -> bytes:
    """The spec read literally, level by level: an independent oracle for the streaming
    implementation."""

    def hash_level(level: bytes) -> bytes:
        out = b""
        for i in range(0, len(level), BLOCK):
            out += hashlib.sha256(level[i : i + BLOCK].ljust(BLOCK, b"\0")).digest()
        return out

    if not data:
        root = bytes(32)
    else:
        level = hash_level(data)
        while len(level) > 32:
            level = hash_level(level)
        root = level
    descriptor = (
        struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, len(data)) + root.ljust(64, b"\0") + bytes(176)
    )
    assert len(descriptor) == 256
    return hashlib.sha256(descriptor).digest()


# --- golden vectors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [(v["size"], v["fsverity_sha256"]) for v in BLOBS.get("fsverity_generated", [])]
    or [_NO_VECTORS],
)
def test_generated_vectors(size: int, expected: str, tmp_path: Path) -> None:
    data = generated(size)
    assert fsverity_digest(data).hex() == expected
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fsverity_digest_file(path).hex() == expected


@pytest.mark.parametrize(
    ("name", "expected"), list(BLOBS.get("fsverity_files", {}).items()) or [_NO_VECTORS]
)
def test_file_vectors(name: str, expected: str) -> None:
    assert VECTORS is not None
    path = VECTORS / name
    assert fsverity_digest(path.read_bytes()).hex() == expected
    assert fsverity_digest_file(path).hex() == expected


def test_empty_file_has_zero_root() -> None:
    expected = hashlib.sha256(pack_descriptor(0, bytes(32))).digest()
    assert fsverity_digest(b"") == expected == reference_digest(b"")


def test_accepts_all_buffer_types() -> None:
    data = generated(3 * BLOCK + 5)
    expected = fsverity_digest(data)
    assert fsverity_digest(bytearray(data)) == expected
    assert fsverity_digest(memoryview(data)) == expected
    # A memoryview of wider items is still digested as its bytes.
    assert fsverity_digest(memoryview(data[: 3 * BLOCK]).cast("I")) == fsverity_digest(
        data[: 3 * BLOCK]
    )


# --- the Debian fsverity tool as oracle -----------------------------------------------


def _tool_digest(path: Path) -> str:
    tool = shutil.which("fsverity")
    if tool is None:
        pytest.skip("the fsverity tool (Debian package fsverity) is not installed")
    out = subprocess.run(
        [tool, "digest", str(path)], check=True, capture_output=True, text=True
    ).stdout
    algo_hex, _, printed = out.strip().partition(" ")
    algo, _, hexdigest = algo_hex.partition(":")
    assert algo == "sha256" and printed == str(path)
    return hexdigest


@pytest.mark.parametrize(
    "size",
    [0, 1, 4095, 4096, 4097, 128 * BLOCK, 129 * BLOCK, 4096 * BLOCK + 1],
    ids=lambda n: f"{n}B",
)
def test_matches_fsverity_tool(size: int, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = generated(size)
    path.write_bytes(data)
    expected = _tool_digest(path)
    assert fsverity_digest(data).hex() == expected
    assert fsverity_digest_file(path).hex() == expected


def test_matches_fsverity_tool_random(tmp_path: Path) -> None:
    path = tmp_path / "random"
    data = random.Random(5).randbytes(5_000_000)
    path.write_bytes(data)
    expected = _tool_digest(path)
    assert fsverity_digest(data).hex() == expected
    assert fsverity_digest_file(path).hex() == expected
    assert fsverity_digest_file(path, read_size=3 * BLOCK).hex() == expected


# --- streaming == in memory -------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verity") / "blob"


_contents = st.one_of(
    st.binary(max_size=3 * BLOCK),
    # Up to ~150 blocks, so some examples need a second tree level.
    st.builds(
        lambda n, seed: random.Random(seed).randbytes(n),
        st.integers(0, 150 * BLOCK + 1),
        st.integers(0, 2**32),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_contents, read_size=st.sampled_from([BLOCK, 2 * BLOCK, 1 << 20]))
def test_file_equals_memory(scratch: Path, data: bytes, read_size: int) -> None:
    scratch.write_bytes(data)
    expected = fsverity_digest(data)
    assert fsverity_digest_file(scratch, read_size=read_size) == expected
    assert expected == reference_digest(data)


def test_fd_digest_ignores_and_keeps_position(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = generated(5 * BLOCK + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        assert fsverity_digest_fd(fd) == fsverity_digest(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1000
    finally:
        os.close(fd)


@pytest.mark.parametrize("read_size", [0, -BLOCK, BLOCK + 1])
def test_read_size_must_be_whole_blocks(read_size: int, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x")
    with pytest.raises(ValueError):
        fsverity_digest_file(path, read_size=read_size)


def test_file_digest_memory_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    size = 16 << 20
    with path.open("wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(generated(1 << 20))
    tracemalloc.start()
    try:
        fsverity_digest_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak} bytes for a {size}-byte file"


# --- struct layouts and ioctl numbers -----------------------------------------------------

_IOC_WRITE, _IOC_READ = 1, 2  # asm-generic/ioctl.h (x86, arm, riscv, ...)


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


# Offsets as declared in <linux/fsverity.h>.
ENABLE_FIELDS = {
    "version": (0, "I", 1),
    "hash_algorithm": (4, "I", 1),
    "block_size": (8, "I", 4096),
    "salt_size": (12, "I", 0),
    "salt_ptr": (16, "Q", 0),
    "sig_size": (24, "I", 0),
    "__reserved1": (28, "I", 0),
    "sig_ptr": (32, "Q", 0),
    "__reserved2": (40, "11Q", 0),
}


def test_ioctl_numbers() -> None:
    assert FS_IOC_ENABLE_VERITY == _ioc(_IOC_WRITE, "f", 133, 128) == 0x40806685
    assert FS_IOC_MEASURE_VERITY == _ioc(_IOC_READ | _IOC_WRITE, "f", 134, 4) == 0xC0046686


def test_enable_arg_layout() -> None:
    arg = pack_enable_arg()
    assert isinstance(arg, bytearray)
    assert len(arg) == 128
    for name, (offset, fmt, value) in ENABLE_FIELDS.items():
        assert all(v == value for v in struct.unpack_from("=" + fmt, arg, offset)), name


def test_measure_arg_layout() -> None:
    arg = pack_measure_arg()
    assert isinstance(arg, bytearray)
    assert len(arg) == 4 + 64
    assert struct.unpack_from("=HH", arg) == (0, 64)
    # What the kernel writes back: algorithm, the real size, then the digest.
    struct.pack_into("=HH", arg, 0, 1, 32)
    arg[4:36] = bytes(range(32))
    assert unpack_measure_arg(arg) == (1, bytes(range(32)))
    struct.pack_into("=HH", arg, 0, 1, 65)
    with pytest.raises(ValueError):
        unpack_measure_arg(arg)


def test_descriptor_layout() -> None:
    root = bytes(range(1, 33))
    desc = pack_descriptor(0x0102030405060708, root)
    assert len(desc) == 256
    assert desc[:4] == bytes([1, 1, 12, 0])
    assert desc[4:8] == bytes(4)
    assert desc[8:16] == (0x0102030405060708).to_bytes(8, "little")
    assert desc[16:48] == root
    assert desc[48:] == bytes(256 - 48)
    with pytest.raises(ValueError):
        pack_descriptor(0, bytes(31))


_C_PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/fsverity.h>
#define OFF(f) printf(#f " %zu\n", offsetof(struct fsverity_enable_arg, f))
int main(void) {
    OFF(version); OFF(hash_algorithm); OFF(block_size); OFF(salt_size); OFF(salt_ptr);
    OFF(sig_size); OFF(__reserved1); OFF(sig_ptr); OFF(__reserved2);
    printf("sizeof_enable %zu\n", sizeof(struct fsverity_enable_arg));
    printf("sizeof_digest %zu\n", sizeof(struct fsverity_digest));
    printf("FS_IOC_ENABLE_VERITY %lu\n", (unsigned long)FS_IOC_ENABLE_VERITY);
    printf("FS_IOC_MEASURE_VERITY %lu\n", (unsigned long)FS_IOC_MEASURE_VERITY);
    printf("FS_VERITY_HASH_ALG_SHA256 %d\n", FS_VERITY_HASH_ALG_SHA256);
    return 0;
}
"""


def test_layout_matches_installed_header(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/fsverity.h").exists():
        pytest.skip("needs a C compiler and <linux/fsverity.h>")
    (tmp_path / "probe.c").write_text(_C_PROBE)
    subprocess.run([cc, "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True)
    facts = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    for name, (offset, _, _) in ENABLE_FIELDS.items():
        assert facts[name] == offset, name
    assert facts["sizeof_enable"] == len(pack_enable_arg())
    assert facts["sizeof_digest"] == 4
    assert facts["FS_IOC_ENABLE_VERITY"] == FS_IOC_ENABLE_VERITY
    assert facts["FS_IOC_MEASURE_VERITY"] == FS_IOC_MEASURE_VERITY
    assert facts["FS_VERITY_HASH_ALG_SHA256"] == verity.FS_VERITY_HASH_ALG_SHA256


# --- ioctls on filesystems without fs-verity ------------------------------------------------


@contextlib.contextmanager
def _readonly_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_tmpfs(path: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == path and line.split()[2] == "tmpfs" for line in mounts)


def test_tmpfs_has_no_verity() -> None:
    if not _is_tmpfs("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    path = Path("/dev/shm") / f"puzzlefs-verity-test-{os.getpid()}"
    path.write_bytes(b"hello")
    try:
        with _readonly_fd(path) as fd:
            with pytest.raises(VerityUnsupported, match="lacks fs-verity"):
                enable_verity(fd)
            assert measure_verity(fd) is None
        with pytest.raises(VerityUnsupported):
            enable_and_measure_path(path)
    finally:
        path.unlink()


def test_tmp_dir_enable_is_unsupported_or_correct(tmp_path: Path) -> None:
    """On this machine the tmp dir cannot do fs-verity; where it can, the kernel's digest
    must be ours."""
    path = tmp_path / "blob"
    data = generated(3 * BLOCK + 1)
    path.write_bytes(data)
    with _readonly_fd(path) as fd:
        assert measure_verity(fd) is None  # ENODATA or unsupported: no digest either way
        try:
            enable_verity(fd)
        except VerityUnsupported:
            assert measure_verity(fd) is None
        else:
            assert measure_verity(fd) == fsverity_digest(data)


def test_measure_bad_fd_raises(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        measure_verity(fd)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("code", "enabling", "unsupported"),
    [
        (errno.EOPNOTSUPP, True, True),
        (errno.ENOTTY, True, True),
        (errno.EINVAL, True, True),
        (errno.EINVAL, False, False),
        (errno.ETXTBSY, True, False),
        (errno.EACCES, False, False),
    ],
)
def test_unsupported_errnos(code: int, enabling: bool, unsupported: bool) -> None:
    err = verity._unsupported(OSError(code, os.strerror(code)), enabling=enabling)
    assert (err is not None) == unsupported
    if err is not None:
        assert "\n" not in str(err)


# --- the real kernel path -----------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True)


def _detach_loops(image: Path) -> None:
    """Detach loop devices still backed by *image* (and only those)."""
    listing = _run("losetup", "-j", str(image))
    for line in listing.stdout.splitlines():
        device = line.partition(":")[0]
        if device.startswith("/dev/loop"):
            _run("losetup", "-d", device)


def test_kernel_enable_and_measure(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop ext4 needs root")
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None or shutil.which("mount") is None:
        pytest.skip("needs mkfs.ext4 and mount")
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(32 << 20)
    made = _run(mkfs, "-q", "-F", "-b", "4096", "-O", "verity", str(image))
    if made.returncode != 0:
        pytest.skip(f"kernel/filesystem has no fs-verity: mkfs.ext4 -O verity: {made.stderr}")
    mounted = False
    try:
        mount = _run("mount", "-o", "loop", str(image), str(mnt))
        if mount.returncode != 0:
            pytest.skip(f"cannot loop-mount an ext4 with verity: {mount.stderr.strip()}")
        mounted = True
        path = mnt / "blob"
        data = generated(129 * BLOCK + 5)
        path.write_bytes(data)
        with _readonly_fd(path) as fd:
            assert measure_verity(fd) is None
            try:
                enable_verity(fd)
            except VerityUnsupported as err:
                pytest.skip(f"kernel/filesystem has no fs-verity: {err}")
            enable_verity(fd)  # already enabled is not an error
            assert measure_verity(fd) == fsverity_digest(data)
        assert enable_and_measure_path(path) == fsverity_digest(data)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        _detach_loops(image)
