"""The reference's own bugs that the other compat tests tolerate or step around, each
shown on the smallest image of ours that has it: the README lists them, and a
tolerance is only honest while the bug it names is real."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from refutil import Jail, reference_mount

from puzzlefs import build


def _socket(root: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()


def _absolute(root: Path) -> None:
    os.symlink("/bin", root / "abs")  # inside the jail, /bin is the jail's
    os.lchown(root / "abs", 7, 8)


def _dangling(root: Path) -> None:
    os.symlink("nowhere", root / "dangling")


def _later_target(root: Path) -> None:
    (root / "z-target").write_bytes(b"written after the link")
    os.symlink("z-target", root / "a-link")


def _image(jail: Jail, name: str, make: Callable[[Path], None]) -> str:
    src = jail.root.parent / f"src-{name}"
    src.mkdir()
    (src / "file").write_bytes(b"content")
    make(src)
    build(src, jail.path(f"/bugs-{name}"), "t")
    return f"/bugs-{name}:t"


@pytest.mark.parametrize(
    "make",
    [_socket, _absolute, _dangling, _later_target],
    ids=["socket", "absolute-symlink", "dangling-symlink", "later-target"],
)
def test_extract_cannot_get_through(jail: Jail, make: Callable[[Path], None]) -> None:
    """Sockets panic; every symlink is chowned through (nix::unistd::chown follows
    it), which fails when its target does not exist (yet), and otherwise gives the
    target the link's owner: outside a chroot, an absolute link's target is a host
    path (here the jail's /bin)."""
    image = _image(jail, make.__name__, make)
    done = jail.extract(image, f"/out{make.__name__}")
    if make is _absolute:
        try:
            assert done.returncode == 0, done.stderr
            assert (os.lstat(jail.path("/bin")).st_uid, os.lstat(jail.path("/bin")).st_gid) == (
                7,
                8,
            )
        finally:
            os.chown(jail.path("/bin"), 0, 0)
        return
    assert done.returncode != 0


def test_extract_chowns_through_symlinks_and_clears_setid(jail: Jail) -> None:
    src = jail.root.parent / "src-owners"
    src.mkdir()
    (src / "a-target").write_bytes(b"target")
    os.symlink("a-target", src / "b-link")
    os.lchown(src / "b-link", 7, 8)
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid", 0o4755)
    (src / "setgid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setgid", 0o2755)
    build(src, jail.path("/bugs-owners"), "t")
    done = jail.extract("/bugs-owners:t", "/out-owners")
    assert done.returncode == 0, done.stderr
    out = jail.path("/out-owners")
    target, link = os.lstat(out / "a-target"), os.lstat(out / "b-link")
    assert (target.st_uid, target.st_gid) == (7, 8)  # the link's owner, on its target
    assert (link.st_uid, link.st_gid) == (0, 0)
    assert stat.S_IMODE(os.stat(out / "setuid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "setgid").st_mode) == 0o755


def test_mount_reports_nlink_0_and_rdev_0(reference: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "first").write_bytes(b"linked")
    os.link(src / "first", src / "second")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    build(src, tmp_path / "oci", "t")
    with reference_mount(reference, f"{tmp_path / 'oci'}:t", tmp_path / "mnt") as mnt:
        assert os.lstat(mnt / "first").st_nlink == 0
        assert os.lstat(mnt).st_nlink == 0
        assert os.lstat(mnt / "null").st_rdev == 0
        assert stat.S_ISCHR(os.lstat(mnt / "null").st_mode)
