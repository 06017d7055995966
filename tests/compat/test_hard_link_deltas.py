"""A ``-b`` build that deletes one link of a hard-link group while the others stay.

Ours writes no whiteout for an inode still reachable, and re-renders the directory
without the name: the reference reads that right. The reference writes a whiteout
for the inode anyway, beside the inode itself, in one layer (two inodes with one
number) and keeps the deleted name in its directory (FORMAT.md §8)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fusehelp import cli, force_clean
from refutil import (
    MOUNT_NLINK_0,
    Jail,
    assert_same_tree_but,
    reference_build,
    reference_mount,
)
from treeutil import assert_same_tree

from puzzlefs import build, open_image
from puzzlefs.format import Kind


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hard-link-chain")
    v1, v2 = root / "v1", root / "v2"
    for d in ("a", "b", "bulk"):
        (v1 / d).mkdir(parents=True)
    (v1 / "a" / "first").write_bytes(b"linked three times\n" * 100)
    os.link(v1 / "a" / "first", v1 / "b" / "second")
    os.link(v1 / "a" / "first", v1 / "third")
    for i in range(40):  # unchanged bulk: the change is small, so ours writes a layer
        (v1 / "bulk" / f"f{i:02d}").write_bytes(b"bulk %d\n" % i)
    subprocess.run(["cp", "-a", str(v1), str(v2)], check=True, timeout=60)
    os.unlink(v2 / "a" / "first")
    return v1, v2


def test_reference_reads_our_delta(
    reference: Path, jail: Jail, chain: tuple[Path, Path], tmp_path: Path
) -> None:
    v1, v2 = chain
    oci = jail.path("/hard-link-chain")
    build(v1, oci, "v1")
    build(v2, oci, "v2", base_tag="v1")
    assert open_image(oci, "v2").rootfs.layer_count == 2
    done = jail.extract("/hard-link-chain:v2", "/hard-link-out")
    assert done.returncode == 0, done.stderr
    assert_same_tree(v2, jail.path("/hard-link-out"))
    with reference_mount(reference, f"{oci}:v2", tmp_path / "mnt") as mnt:
        assert_same_tree_but(v2, mnt, MOUNT_NLINK_0)


@pytest.fixture
def reference_delta(reference: Path, chain: tuple[Path, Path], tmp_path: Path) -> Path:
    v1, v2 = chain
    oci = tmp_path / "oci"
    reference_build(reference, v1, oci, "v1")
    reference_build(reference, v2, oci, "v2", base="v1")
    return oci


def test_the_reference_delta_holds_one_number_twice(reference_delta: Path) -> None:
    image = open_image(reference_delta, "v2")
    layer = list(image.rootfs.layer(0))
    kept = next(i.ino for i in layer if i.kind is Kind.FILE)
    assert sorted(i.kind for i in layer if i.ino == kept) == [Kind.FILE, Kind.WHT]
    assert kept in {
        e.ino for i in layer if i.kind is Kind.DIR for e in i.entries if e.name == b"first"
    }


def test_the_deleted_link_is_recorded_nowhere(reference_delta: Path) -> None:
    """Every directory of the reference's delta lists the names the base lists: only
    the whiteout beside the kept inode says a link went, not which."""
    image = open_image(reference_delta, "v2")
    names = {
        layer: sorted(
            (i.ino, e.name)
            for i in image.rootfs.layer(layer)
            if i.kind is Kind.DIR
            for e in i.entries
        )
        for layer in (0, 1)
    }
    assert names[0] == names[1]


def test_our_readers_keep_every_link(
    reference_delta: Path, chain: tuple[Path, Path], tmp_path: Path
) -> None:
    """Our readers read the inode, not its whiteout (reference_compat.WHITEOUT_YIELDS):
    nothing the image holds is lost, and the deleted name comes back. extract and the
    mount give the same tree: the base's, all three links."""
    v1, _ = chain
    done = cli("extract", f"{reference_delta}:v2", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_same_tree(v1, tmp_path / "out")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = cli("mount", "--log-file", tmp_path / "log", f"{reference_delta}:v2", mnt)
        assert done.returncode == 0, done.stderr
        assert_same_tree(v1, mnt)
        assert os.stat(mnt / "third").st_nlink == 3
        assert cli("umount", mnt).returncode == 0
    finally:
        force_clean(mnt)
