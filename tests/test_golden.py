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

# Without times (--no-mtimes): the rootfs and chunks are the reference's for this tree.
GOLDEN = {
    False: "6811fec3fa1819e39ac6b11c2ea3ffa4d9521f727261910df6ac56b0cca57c42",
    True: "fead253121169072438258146fefd9e62a7149fe9f032a55af0e9d1f06d45434",
}
# With every mtime set to MTIME_NS: the same images plus their times blob.
GOLDEN_WITH_TIMES = {
    False: "90405f339b60c007042bdab53340b5a98be68920285462e826b2b21b583c83a1",
    True: "8fa808555b780440fcf5e7cf37a02b8215219165636607ef8dbd52cd00d88abe",
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
