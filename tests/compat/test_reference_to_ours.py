"""Images the reference builds, read by ours: extract, mount and verify, each with the
fs-verity digest the reference printed, give the source tree exactly (every inode
type, owners, modes with setuid/setgid, xattrs, hard links, devices, names).

Plain, ``-c`` and ``-b`` (with changes, additions and deletions, on a base the
reference built and on one we built). The reference's own extract and mount cannot
read its deltas that delete files; ours do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fusehelp import cli, force_clean, mount_entry
from refutil import Built, Jail, reference_mount
from treeutil import assert_same_tree

from puzzlefs import open_image

CASES = ["all-types", "all-types-c", "real", "real-c", "delta", "delta-c", "delta-on-our-base"]


@pytest.mark.parametrize("case", CASES)
def test_our_extract_gives_the_source_exactly(
    reference_images: dict[str, Built], case: str, tmp_path: Path
) -> None:
    img = reference_images[case]
    done = cli("extract", "--digest", img.digest, img.image, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_same_tree(img.source, tmp_path / "out")


@pytest.mark.parametrize("case", CASES)
def test_our_verify_accepts_it(reference_images: dict[str, Built], case: str) -> None:
    """Every blob checks out (sha256, sizes, the fs-verity chain). The one problem
    verify reports is the reference's: its delta manifests list only the chunks the
    delta build wrote, so that tag alone, copied by an OCI tool, loses its base's."""
    img = reference_images[case]
    image = open_image(img.oci, img.tag)
    unlisted = set(image.chunk_digests) - {d.digest for d in image.manifest.chunk_layers}
    assert bool(unlisted) == case.startswith("delta")
    expected = sorted(
        sorted({"blob": d.hex, "role": "chunk", "message": "not listed in the manifest"}.items())
        for d in unlisted
    )
    for flags in ([], ["--digest", img.digest]):
        done = cli("verify", "--json", *flags, img.image)
        report = json.loads(done.stdout)
        assert sorted(sorted(p.items()) for p in report["problems"]) == expected
        assert done.returncode == (1 if unlisted else 0), done.stderr
    wrong = ("0" if img.digest[0] != "0" else "1") + img.digest[1:]
    assert cli("verify", "--digest", wrong, img.image).returncode != 0


@pytest.mark.parametrize("case", CASES)
def test_our_mount_gives_the_source_exactly(
    reference_images: dict[str, Built], case: str, tmp_path: Path
) -> None:
    img = reference_images[case]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = cli("mount", "--log-file", tmp_path / "log", "--digest", img.digest, img.image, mnt)
        assert done.returncode == 0, done.stderr
        assert_same_tree(img.source, mnt)
        assert cli("umount", mnt).returncode == 0
        assert mount_entry(mnt) is None
    finally:
        force_clean(mnt)


def test_the_reference_cannot_read_its_own_delta_that_deletes(
    reference: Path, jail: Jail, reference_images: dict[str, Built], tmp_path: Path
) -> None:
    """Why only our readers read the reference's deltas: it lists each deleted name,
    with a whiteout inode, in its directory, and then its extract fails and its mount
    lists such a directory as empty (v2 deletes dup-b and dev/fifo)."""
    img = reference_images["delta"]
    shutil.copytree(img.oci, jail.path("/own-delta"))
    done = jail.extract(f"/own-delta:{img.tag}", "/own-delta-out")
    assert done.returncode != 0
    with reference_mount(reference, img.image, tmp_path / "mnt") as mnt:
        assert os.listdir(mnt / "dev") == []
        assert sorted(os.listdir(img.source / "dev")) == ["big-dev", "loop0", "null"]
