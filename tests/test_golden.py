"""Golden digests: a fixed tree must always give these exact images. Any change to the
walk, the chunker, the compressor, the Cap'n Proto layout or the JSON writers shows up
here first (and would break de-duplication against every image already stored)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from treeutil import set_mtimes

from puzzlefs import build

# Without times (--no-mtimes): the images the reference would store for this tree.
GOLDEN = {
    False: "bd978130a08b4705a14694c87b318e18f30ef70a659d643f50dfe916047738fe",
    True: "6aa158011e384ab38e726f88c0aead55f4a2d84cc7dfece07391a9089ea134a8",
}
# With every mtime set to MTIME_NS: the same images plus their times blob.
GOLDEN_WITH_TIMES = {
    False: "95ca7bad5343357e98b338e41d149e5fdadc28c4c89b93a4cfa06927a77d44d7",
    True: "b5809a336b142ca6275f2384619933d0634dbf0c79d45e113d1915b0a7857ade",
}
MTIME_NS = 1_700_000_000_123_456_789


def make_tree(root: Path) -> None:
    rng = random.Random(20261126)
    text = b"".join(rng.choice([b"alpha ", b"beta ", b"gamma\n", b"delta "]) for _ in range(60_000))
    files = {
        "bin/tool": rng.randbytes(700_000),
        "etc/config": b"key = value\n" * 40,
        "etc/empty": b"",
        "usr/share/doc/text": text,
        "usr/share/doc/text-copy": text,
        "usr/lib/a.so": rng.randbytes(300_000) + text[:100_000],
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, 0o644)
    os.chmod(root / "bin/tool", 0o755)
    os.symlink("../lib/a.so", root / "usr/share/link")
    os.link(root / "etc/config", root / "etc/config-hardlink")
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, "."]:
            os.lchown(os.path.join(dirpath, n), 0, 0)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_golden_manifest_digest(tmp_path: Path, compress: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the tree fixed owners")
    make_tree(tmp_path / "tree")
    result = build(tmp_path / "tree", tmp_path / "oci", "golden", compress=compress, mtimes=False)
    assert result.manifest_verity == GOLDEN[compress]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_golden_manifest_digest_with_times(tmp_path: Path, compress: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the tree fixed owners")
    make_tree(tmp_path / "tree")
    set_mtimes(tmp_path / "tree", MTIME_NS)
    result = build(tmp_path / "tree", tmp_path / "oci", "golden", compress=compress)
    assert result.manifest_verity == GOLDEN_WITH_TIMES[compress]
