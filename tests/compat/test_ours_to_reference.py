"""Images we build, read by the reference: its extract (confined to a chroot) and its
mount give the source tree, modulo the reference's own bugs, each named where it is
tolerated (refutil). Plain, ``-c`` and ``-b`` (changes, additions, deletions; on a base
we built and on one the reference built).

Its extract cannot get through sockets, absolute symlinks or symlinks to what it has
not written yet, so it reads trees without them (make_reference_extractable); its
mount reads the full trees."""

from __future__ import annotations

from pathlib import Path

import pytest
from refutil import (
    CHOWN_THROUGH_SYMLINKS,
    MOUNT_NLINK_0,
    MOUNT_RDEV_0,
    SETID_CLEARED,
    Built,
    Jail,
    assert_same_tree_but,
    build_ours,
    reference_mount,
)

CASES = [
    "all-types",
    "all-types-c",
    "all-types-c-64k-19",
    "real",
    "real-c",
    "delta",
    "delta-c",
    "delta-on-reference-base",
]


@pytest.fixture(scope="module")
def extractable_images(
    reference: Path,
    jail: Jail,
    extractable_tree: Path,
    real_extractable_tree: Path,
    delta_trees: list[Path],
) -> dict[str, Built]:
    """Our builds of the trees the reference's extract can read, inside its jail."""
    trees = {"all-types": extractable_tree, "real": real_extractable_tree}
    return build_ours(trees, jail.path("/images"), reference, *delta_trees)


@pytest.mark.parametrize("case", CASES)
def test_reference_extract_gives_the_source(
    jail: Jail, extractable_images: dict[str, Built], case: str
) -> None:
    img = extractable_images[case]
    inside = "/" + str(img.oci.relative_to(jail.root))
    dest = f"/out/{case}"
    done = jail.extract(f"{inside}:{img.tag}", dest)
    assert done.returncode == 0, done.stderr
    assert_same_tree_but(img.source, jail.path(dest), SETID_CLEARED, CHOWN_THROUGH_SYMLINKS)


@pytest.mark.parametrize("case", CASES)
def test_reference_mount_gives_the_source(
    reference: Path, our_images: dict[str, Built], case: str, tmp_path: Path
) -> None:
    img = our_images[case]
    with reference_mount(reference, img.image, tmp_path / "mnt") as mnt:
        assert_same_tree_but(img.source, mnt, MOUNT_NLINK_0, MOUNT_RDEV_0)
