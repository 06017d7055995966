"""The same tree gives the same image, whatever its path, listing order or the number
of workers; its times matter only as the times the image keeps (none with
``mtimes=False``)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from treeutil import set_mtimes

from puzzlefs import build


def _make(root: Path, order_seed: int) -> None:
    """The same tree, its entries created in a different order."""
    rng = random.Random(0)
    contents = {f"d{i % 7}/f{i:03d}": rng.randbytes(rng.randrange(0, 200_000)) for i in range(60)}
    contents["big"] = rng.randbytes(3_000_000)
    items = list(contents.items())
    random.Random(order_seed).shuffle(items)
    for rel, data in items:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, 0o644)
    os.symlink("big", root / "link")
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_same_tree_same_digest(tmp_path: Path, compress: bool) -> None:
    a, b = tmp_path / "a" / "tree", tmp_path / "elsewhere" / "other-name"
    _make(a, 1)
    _make(b, 2)
    for root in (a, b):
        set_mtimes(root, 1_600_000_000_000_000_000)
    r1 = build(a, tmp_path / "oci1", "t", compress=compress)
    r2 = build(b, tmp_path / "oci2", "t", compress=compress, workers=1)
    r3 = build(a, tmp_path / "oci3", "t", compress=compress, workers=4)
    assert r1.manifest_verity == r2.manifest_verity == r3.manifest_verity
    assert r1.manifest.digest == r2.manifest.digest
    assert sorted(os.listdir(tmp_path / "oci1/blobs/sha256")) == sorted(
        os.listdir(tmp_path / "oci2/blobs/sha256")
    )
    assert (tmp_path / "oci1/index.json").read_bytes() == (
        tmp_path / "oci2/index.json"
    ).read_bytes()


def test_times_are_part_of_the_image_unless_left_out(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _make(a, 1)
    _make(b, 2)
    set_mtimes(a, 1_000_000_000)
    set_mtimes(b, 2_000_000_000)
    with_a = build(a, tmp_path / "oci", "a")
    with_b = build(b, tmp_path / "oci", "b")
    assert with_a.manifest_verity != with_b.manifest_verity
    assert with_a.rootfs.digest == with_b.rootfs.digest  # the rootfs holds no times
    without_a = build(a, tmp_path / "oci", "a0", mtimes=False)
    without_b = build(b, tmp_path / "oci", "b0", mtimes=False)
    assert without_a.manifest_verity == without_b.manifest_verity
