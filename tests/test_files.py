"""The one atomic-write helper (blobs, index.json, oci-layout, export output) and the
reads that trust nothing in a layout."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from puzzlefs._files import AtomicDir, atomic_output, atomic_write, read_regular
from puzzlefs.errors import ImageError, UnsafeFile


@pytest.fixture(params=[True, False], ids=["unnamed", "named"])
def adir(request: pytest.FixtureRequest, tmp_path: Path) -> AtomicDir:
    d = AtomicDir(tmp_path)
    d.unnamed = request.param
    return d


def test_write_replaces_whole_with_its_mode(adir: AtomicDir, tmp_path: Path) -> None:
    (tmp_path / "index.json").write_bytes(b"old")
    old = os.umask(0o077)
    try:
        assert adir.write("index.json", b"new contents")
    finally:
        os.umask(old)
    assert (tmp_path / "index.json").read_bytes() == b"new contents"
    assert stat.S_IMODE((tmp_path / "index.json").stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["index.json"]


def test_write_replaces_a_symlink_not_its_target(adir: AtomicDir, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(b"keep me")
    os.symlink("elsewhere", tmp_path / "out")
    adir.write("out", b"data")
    assert (tmp_path / "elsewhere").read_bytes() == b"keep me"
    assert not (tmp_path / "out").is_symlink()


def test_create_streams_and_replaces_only_on_success(adir: AtomicDir, tmp_path: Path) -> None:
    (tmp_path / "out.tar").write_bytes(b"previous export")
    with pytest.raises(RuntimeError), adir.create("out.tar") as f:
        f.write(b"half of a tar")
        raise RuntimeError("interrupted")
    assert (tmp_path / "out.tar").read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["out.tar"]
    with adir.create("out.tar") as f:
        for _ in range(100):
            f.write(b"x" * 10_000)
    assert (tmp_path / "out.tar").read_bytes() == b"x" * 1_000_000
    assert os.listdir(tmp_path) == ["out.tar"]


def test_module_helpers(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a", b"1")
    with atomic_output(tmp_path / "b") as f:
        f.write(b"2")
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"


def test_a_killed_writer_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL in the middle of a long write: with O_TMPFILE the partial file never
    had a name, so nothing is left behind (and the old file is whole)."""
    (tmp_path / "out").write_bytes(b"old")
    code = (
        "import sys, time; from puzzlefs._files import atomic_output\n"
        "with atomic_output(sys.argv[1]) as f:\n"
        "    f.write(b'x' * 100000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert os.listdir(tmp_path) == ["out"]
    assert (tmp_path / "out").read_bytes() == b"old"


def test_read_regular_checks_size_and_limit_first(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert read_regular(p, "f") == b"abc"
    assert read_regular(p, "f", size=3, limit=3) == b"abc"
    with pytest.raises(ImageError, match="f: size 3, its descriptor says 4"):
        read_regular(p, "f", size=4)
    with pytest.raises(UnsafeFile, match="f is 3 bytes, more than it can be"):
        read_regular(p, "f", limit=2)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", "missing")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "socket"])
def test_read_regular_refuses_at_once(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "index.json"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "symlink":
        (tmp_path / "real").write_bytes(b"{}")
        os.symlink("real", p)
    elif kind == "directory":
        p.mkdir()
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    start = time.monotonic()
    with pytest.raises(UnsafeFile, match="index.json is .*not a regular file"):
        read_regular(p, "index.json")
    assert time.monotonic() - start < 5


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled up but for a few blocks."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "index.json").write_bytes(b'{"old": true}')
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_a_full_disk_keeps_the_old_file_whole(full_disk: Path, unnamed: bool) -> None:
    d = AtomicDir(full_disk)
    d.unnamed = unnamed
    with pytest.raises(OSError) as info:
        d.write("index.json", b"x" * (1 << 20))
    assert info.value.errno == errno.ENOSPC
    assert (full_disk / "index.json").read_bytes() == b'{"old": true}'
    assert sorted(os.listdir(full_disk)) == ["filler", "index.json"]
