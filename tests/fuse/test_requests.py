"""Every request the FUSE layer answers, through a real mount: lookups (positive and
negative), attributes, listings over many reply buffers, 255-byte names, xattrs with
the kernel's size protocol (and an image with none), symlinks, mmap and exec, statfs;
forgets after the kernel drops its caches; concurrent readers; readers interrupted or
killed mid-read; an unmount asked for while readers run."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fusehelp import TAG, MountFn, assert_clean, build, cli, daemon_pids, mount_entry, wait_until

_libc = ctypes.CDLL(None, use_errno=True)

LONG = "L" * 255
BIG_DIR = 5000


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("requests") / "rootfs"
    rng = random.Random(5)
    (root / "big").mkdir(parents=True)
    for i in range(BIG_DIR):  # long names: each listing takes many reply buffers
        (root / "big" / f"{i:05d}-{'n' * 60}").write_bytes(b"%d" % i)
    (root / LONG).mkdir()
    (root / LONG / LONG).write_bytes(b"at the end of two 255-byte names")
    (root / "data").write_bytes(rng.randbytes(24 << 20))
    (root / "xattrs").write_bytes(b"")
    os.setxattr(root / "xattrs", "user.small", b"s")
    os.setxattr(root / "xattrs", "user.large", rng.randbytes(3000))  # ext4: one block
    os.symlink("x" * 4000, root / "long-link")
    os.symlink("data", root / "link")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho ran from the image\n")
    os.chmod(script, 0o755)
    return root


@pytest.fixture(scope="module")
def image(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    oci = tmp_path_factory.mktemp("requests-oci") / "oci"
    build(tree, oci)
    return f"{oci}:{TAG}"


def drop_caches() -> None:
    """Forget every cached dentry and inode (the kernel sends FORGETs) and page."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_lookups(image: str, mount: MountFn) -> None:
    with mount(image) as m:
        assert (m.path / LONG / LONG).read_bytes() == b"at the end of two 255-byte names"
        for _ in range(3):  # negative entries, cached or not, stay negative
            with pytest.raises(FileNotFoundError):
                os.lstat(m.path / "absent")
        with pytest.raises(NotADirectoryError):
            os.lstat(m.path / "data" / "inside")
        with pytest.raises(OSError) as e:
            os.lstat(m.path / ("x" * 256))
        assert e.value.errno == errno.ENAMETOOLONG
        assert os.lstat(m.path / "link").st_size == len("data")
        assert os.readlink(m.path / "long-link") == "x" * 4000
        assert os.stat(m.path / "link").st_size == 24 << 20  # followed


def test_large_directory_over_many_buffers(image: str, mount: MountFn) -> None:
    with mount(image) as m:
        for _ in range(2):  # the second listing comes from the kernel's cache
            with os.scandir(m.path / "big") as it:
                entries = sorted((e.name, e.is_file(follow_symlinks=False)) for e in it)
            assert len(entries) == BIG_DIR and all(f for _, f in entries)
            assert entries[0][0].startswith("00000-") and entries[-1][0].startswith("04999-")
        listed = os.listdir(m.path)
        assert sorted(listed) == sorted(os.listdir(m.path))
        assert LONG in listed
        st = os.lstat(m.path / "big" / entries[1234][0])
        assert st.st_size == len(b"1234") and stat.S_ISREG(st.st_mode)


def test_xattrs_and_the_size_protocol(image: str, mount: MountFn) -> None:
    with mount(image) as m:
        path = os.fsencode(m.path / "xattrs")
        assert sorted(os.listxattr(path)) == ["user.large", "user.small"]
        assert os.getxattr(path, "user.small") == b"s"
        assert len(os.getxattr(path, "user.large")) == 3000
        # size 0 asks for the size; a buffer too small is ERANGE
        assert _libc.getxattr(path, b"user.large", None, 0) == 3000
        small = ctypes.create_string_buffer(10)
        assert _libc.getxattr(path, b"user.large", small, 10) == -1
        assert ctypes.get_errno() == errno.ERANGE
        assert _libc.listxattr(path, None, 0) == len(b"user.small\0user.large\0")
        assert _libc.listxattr(path, small, 5) == -1 and ctypes.get_errno() == errno.ERANGE
        with pytest.raises(OSError) as e:
            os.getxattr(path, "user.absent")
        assert e.value.errno == errno.ENODATA
        assert os.listxattr(m.path / "data") == []


def test_an_image_without_xattrs_says_it_has_none(tmp_path: Path, mount: MountFn) -> None:
    """No inode has an xattr: getxattr is not supported (the kernel stops asking the
    daemon), and listxattr lists none."""
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "f").write_bytes(b"f")
    build(root, tmp_path / "oci")
    with mount(f"{tmp_path / 'oci'}:{TAG}") as m:
        for _ in range(2):
            with pytest.raises(OSError) as e:
                os.getxattr(m.path / "f", "user.absent")
            assert e.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(m.path / "f") == []
        assert (m.path / "f").read_bytes() == b"f"


def test_statfs_mmap_and_exec(image: str, tree: Path, mount: MountFn) -> None:
    with mount(image, "-o", "exec") as m:
        vfs = os.statvfs(m.path)
        assert vfs.f_namemax == 255 and vfs.f_files > BIG_DIR and vfs.f_bavail == 0
        with open(m.path / "data", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            want = (tree / "data").read_bytes()
            for off in (0, 4095, 1 << 20, len(want) - 100):
                assert mm[off : off + 100] == want[off : off + 100]
        done = subprocess.run([str(m.path / "run.sh")], capture_output=True, text=True, timeout=30)
        assert done.stdout == "ran from the image\n"


def test_forgets_after_the_kernel_drops_its_caches(image: str, tree: Path, mount: MountFn) -> None:
    with mount(image) as m:
        for _ in range(3):
            names = os.listdir(m.path / "big")  # thousands of inodes the kernel knows
            assert len(names) == BIG_DIR
            drop_caches()  # FORGET and BATCH_FORGET for all of them
            assert (m.path / "big" / names[77]).read_bytes() == (
                tree / "big" / names[77]
            ).read_bytes()
        assert "error" not in m.log_text().lower()


def test_eight_concurrent_readers(image: str, tree: Path, mount: MountFn) -> None:
    want = (tree / "data").read_bytes()
    with mount(image) as m:
        drop_caches()
        failures: list[str] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            with open(m.path / "data", "rb") as f:
                for _ in range(60):
                    off = rng.randrange(len(want))
                    n = rng.choice([1, 4096, 65536, 1 << 20])
                    f.seek(off)
                    if f.read(n) != want[off : off + n]:
                        failures.append(f"reader {seed} at {off}+{n}")
            if (m.path / "big" / f"{seed:05d}-{'n' * 60}").read_bytes() != b"%d" % seed:
                failures.append(f"reader {seed}: small file")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []


_READ_FOREVER = """
import sys
while True:
    with open(sys.argv[1], "rb") as f:
        while f.read(1 << 20):
            pass
"""


def test_readers_killed_or_interrupted_mid_read(image: str, tree: Path, mount: MountFn) -> None:
    """Killed readers leave requests whose replies nobody waits for (the kernel says
    ENOENT to them); interrupted ones, INTERRUPT requests. The mount serves on."""
    with mount(image) as m:
        for i in range(12):
            drop_caches()
            proc = subprocess.Popen([sys.executable, "-c", _READ_FOREVER, str(m.path / "data")])
            time.sleep(0.05 + 0.02 * i)
            proc.send_signal(signal.SIGKILL if i % 2 else signal.SIGINT)
            proc.wait(timeout=30)
        with open(m.path / "data", "rb") as f:
            assert f.read() == (tree / "data").read_bytes()
        assert daemon_pids(m.path)


def test_umount_while_eight_readers_read(image: str, tree: Path, mountpoint: Path) -> None:
    """`puzzlefs umount` of a busy mount says so and changes nothing; SIGTERM to the
    daemon then detaches it: every reader either got the right bytes or an error,
    never wrong data, nobody hangs, and the mountpoint ends clean."""
    want = (tree / "data").read_bytes()
    done = cli("mount", image, mountpoint)
    assert done.returncode == 0, done.stderr
    stop = threading.Event()
    wrong: list[str] = []
    ended: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with open(mountpoint / "data", "rb") as f:
                while not stop.is_set():
                    off = rng.randrange(len(want))
                    f.seek(off)
                    got = f.read(65536)
                    if got != want[off : off + len(got)]:
                        wrong.append(f"{seed}@{off}")
        except OSError as e:
            ended.append(e.strerror or str(e))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        busy = cli("umount", mountpoint)
        assert busy.returncode != 0 and "busy" in busy.stderr
        assert mount_entry(mountpoint) is not None
        time.sleep(0.2)
        os.kill(daemon_pids(mountpoint)[0], signal.SIGTERM)
        assert wait_until(lambda: mount_entry(mountpoint) is None)
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a reader hangs"
        assert wrong == []
        assert_clean(mountpoint)
    finally:
        stop.set()
