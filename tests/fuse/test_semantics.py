"""What a mounted image looks like: the source tree, exactly, and read-only."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from fusehelp import TAG, DataTree, MountFn, assert_clean, build, cli, force_clean, mount_entry
from treeutil import assert_same_tree, describe, mtimes

from puzzlefs.reader import open_image


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_all_types_tree_equals_source(
    all_types_tree: Path, all_types_images: dict[str, str], mount: MountFn, kind: str
) -> None:
    with mount(all_types_images[kind]) as m:
        # content, types, modes, owners, xattrs, symlink targets, hard links, devices
        assert_same_tree(all_types_tree, m.path)
        # st_ino: the image's inode numbers, root 1, hard links share one
        assert os.stat(m.path).st_ino == 1
        first = os.lstat(m.path / "hard" / "first")
        assert first.st_ino == os.lstat(m.path / "links" / "second").st_ino
        assert first.st_ino == os.lstat(m.path / "third").st_ino
        assert first.st_nlink == 3
        image = open_image(*all_types_images[kind].rsplit(":", 1))
        for rel in ("", "names", "dev/fifo", "links/rel", "hard/first"):
            assert os.lstat(m.path / rel).st_ino == image.resolve_path(rel).ino
        for dirpath, dirnames, _ in os.walk(m.path):
            subdirs = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            assert os.lstat(dirpath).st_nlink == 2 + len(subdirs), dirpath
        # sizes, blocks; every inode's mtime (the times blob), shown as atime and ctime too
        st = os.lstat(m.path / "random-5M")
        assert st.st_size == 5 * 1024 * 1024
        assert st.st_blocks * 512 >= st.st_size
        source_mtime = os.lstat(all_types_tree / "random-5M").st_mtime_ns
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == (source_mtime,) * 3
        assert mtimes(m.path) == mtimes(all_types_tree)
        # special files keep their types
        assert stat.S_ISFIFO(os.lstat(m.path / "dev" / "fifo").st_mode)
        assert stat.S_ISSOCK(os.lstat(m.path / "dev" / "socket").st_mode)
        assert stat.S_ISCHR(os.lstat(m.path / "dev" / "null").st_mode)
        assert os.lstat(m.path / "dev" / "loop0").st_rdev == os.makedev(7, 0)
        assert os.getxattr(m.path / "xattrs", "user.empty") == b""
        with pytest.raises(OSError) as e:
            os.getxattr(m.path / "xattrs", "user.absent")
        assert e.value.errno == errno.ENODATA
        assert os.lstat(m.path / "setuid").st_mode & 0o7777 == 0o4755
        assert os.lstat(m.path / "sticky").st_mode & 0o7777 == 0o1777
        assert (os.lstat(m.path / "owned").st_uid, os.lstat(m.path / "owned").st_gid) == (
            1234,
            5678,
        )
        vfs = os.statvfs(m.path)
        assert vfs.f_namemax == 255 and vfs.f_files > 0 and vfs.f_bfree == 0
        # a mount names itself: fstype fuse.puzzlefs, source OCI_DIR:TAG
        fstype, source = mount_entry(m.path) or ("", "")
        assert fstype == "fuse.puzzlefs"
        assert source == all_types_images[kind]


def test_reference_image_equals_its_description(vectors: Path, mount: MountFn) -> None:
    spec = json.loads((vectors / "reference-image.json").read_text())
    with mount(f"{vectors / 'reference-image'}:{spec['tag']}") as m:
        seen = {"" if p == "." else p for p in _all_paths(m.path)}
        assert seen == {e["path"] for e in spec["tree"]}
        for e in spec["tree"]:
            st = os.lstat(m.path / e["path"])
            assert st.st_ino == e["ino"]
            assert (st.st_uid, st.st_gid) == (e["uid"], e["gid"])
            assert st.st_mode & 0o7777 == int(e["mode"], 8)
            if e["type"] == "dir":
                assert stat.S_ISDIR(st.st_mode)
            else:
                assert stat.S_ISREG(st.st_mode)
                data = (m.path / e["path"]).read_bytes()
                assert len(data) == st.st_size == e["size"]
                assert hashlib.sha256(data).hexdigest() == e["sha256"]


def _all_paths(root: Path) -> list[str]:
    out = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return out


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_concurrent_random_reads(
    data_tree: DataTree, data_images: dict[str, str], mount: MountFn, kind: str
) -> None:
    names = sorted(data_tree.files)
    errors: list[BaseException] = []
    with mount(data_images[kind]) as m:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    name = rng.choice(names)
                    want = data_tree.files[name]
                    off = rng.randrange(0, len(want) + 100)
                    size = rng.choice([1, 4096, 65536, 131072, rng.randrange(1, 600_000)])
                    fd = os.open(m.path / name, os.O_RDONLY)
                    try:
                        got = os.pread(fd, size, off)
                    finally:
                        os.close(fd)
                    assert got == want[off : off + size], (name, off, size)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "readers hung"
        assert not errors, errors[0]
        # and every file whole, after the random reads filled the caches in pieces
        for name in names:
            assert (m.path / name).read_bytes() == data_tree.files[name]


def test_large_directory_lists_completely(tmp_path: Path, mount: MountFn) -> None:
    """Many entries: several readdir replies, so offsets must be stable."""
    src = tmp_path / "src"
    src.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(3000)}
    for n in names:
        (src / n).write_bytes(n.encode())
    build(src, tmp_path / "oci")
    with mount(f"{tmp_path / 'oci'}:{TAG}") as m:
        listed = os.listdir(m.path)
        assert len(listed) == len(names) and set(listed) == names
        with os.scandir(m.path) as it:
            assert sorted(e.name for e in it) == sorted(names)
        assert (m.path / f"entry-01234-{'x' * (1234 % 50)}").read_bytes().startswith(b"entry")


def test_writes_fail_with_erofs(all_types_images: dict[str, str], mount: MountFn) -> None:
    with mount(all_types_images["plain"]) as m:
        p = m.path
        attempts = [
            lambda: os.open(p / "text", os.O_WRONLY),
            lambda: os.open(p / "text", os.O_RDWR),
            lambda: os.open(p / "text", os.O_RDONLY | os.O_TRUNC),
            lambda: os.open(p / "new", os.O_WRONLY | os.O_CREAT, 0o644),
            lambda: os.mkdir(p / "newdir"),
            lambda: os.unlink(p / "text"),
            lambda: os.rmdir(p / "names"),
            lambda: os.rename(p / "text", p / "text2"),
            lambda: os.symlink("x", p / "newlink"),
            lambda: os.link(p / "text", p / "hardlink"),
            lambda: os.chmod(p / "text", 0o777),
            lambda: os.chown(p / "text", 1, 1),
            lambda: os.truncate(p / "text", 0),
            lambda: os.utime(p / "text", (1, 1)),
            lambda: os.setxattr(p / "text", "user.new", b"v"),
            lambda: os.removexattr(p / "xattrs", "user.text"),
            lambda: os.mkfifo(p / "newfifo"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS, (attempt, e.value)
        assert (p / "text").read_bytes() == b"hello puzzlefs\n" * 1000
        # the mount is read-only for the kernel too
        assert os.statvfs(p).f_flag & os.ST_RDONLY


def test_whiteouts_are_hidden(tmp_path: Path, mount: MountFn) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "kept").write_bytes(b"kept")
    (src / "dir" / "deleted").write_bytes(b"deleted")
    (src / "gone").write_bytes(b"gone")
    oci = tmp_path / "oci"
    build(src, oci, "base")
    (src / "dir" / "deleted").unlink()
    (src / "gone").unlink()
    (src / "added").write_bytes(b"added")
    build(src, oci, "delta", "-b", "base")
    with mount(f"{oci}:delta") as m:
        assert sorted(os.listdir(m.path)) == ["added", "dir"]
        assert os.listdir(m.path / "dir") == ["kept"]
        assert not (m.path / "gone").exists()
        assert (m.path / "added").read_bytes() == b"added"
        assert describe(m.path) == describe(src)
    with mount(f"{oci}:base") as m:
        assert (m.path / "gone").read_bytes() == b"gone"


def test_mount_options_pass_through(all_types_images: dict[str, str], mount: MountFn) -> None:
    with mount(all_types_images["plain"], "-o", "allow_other,noatime", "-o", "fsname=mine") as m:
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if x.split()[4] == str(m.path))
        assert "noatime" in line.split()[5]
        assert "allow_other" in line
        assert mount_entry(m.path) == ("fuse.puzzlefs", "mine")
        assert (m.path / "one").read_bytes() == b"x"


def test_relative_paths_and_the_legacy_form(tmp_path: Path, mountpoint: Path) -> None:
    """The daemon changes directory: a relative OCI dir must still work; and the seed
    talk's `mount OCI_DIR TAG MOUNTPOINT`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content")
    build(src, tmp_path / "oci")
    rel = os.path.relpath(mountpoint, tmp_path)
    for args in ([f"oci:{TAG}", rel], ["oci", TAG, rel]):
        done = cli("mount", *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        try:
            assert (mountpoint / "f").read_bytes() == b"content"
        finally:
            assert cli("umount", rel, cwd=tmp_path).returncode == 0
        assert_clean(mountpoint)


def test_permissions_are_checked_by_the_kernel(all_types_images: dict[str, str]) -> None:
    """default_permissions: the image's modes and owners decide, for other users too
    (with allow_other)."""
    outer = Path(tempfile.mkdtemp(prefix="puzzlefs-perm-", dir="/tmp"))
    os.chmod(outer, 0o755)
    mnt = outer / "mnt"
    mnt.mkdir()
    try:
        done = cli("mount", "-o", "allow_other", all_types_images["plain"], mnt)
        assert done.returncode == 0, done.stderr

        def cat_as(uid: int, name: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["cat", str(mnt / name)], user=uid, group=uid, capture_output=True, timeout=30
            )

        assert cat_as(1234, "owned").stdout == b"owned"  # 0600, owned by 1234
        denied = cat_as(4321, "owned")
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert cat_as(4321, "one").stdout == b"x"  # 0644
        assert cli("umount", mnt).returncode == 0
        assert_clean(mnt)
    finally:
        force_clean(mnt)
        shutil.rmtree(outer, ignore_errors=True)
