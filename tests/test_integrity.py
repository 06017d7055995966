"""The fs-verity chain end to end: one digest from the user, and no byte that does not
match it is ever used (extract --digest, verify --digest; mount is in tests/fuse)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from treeutil import point_tag_at_other_manifest

from puzzlefs import build, open_image
from puzzlefs.errors import DigestMismatch, ImageError
from puzzlefs.oci import ImageLayout
from puzzlefs.reader.verify import enable_fs_verity, verify


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args], capture_output=True, text=True, timeout=120
    )


class Img:
    def __init__(self, root: Path) -> None:
        src = root / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a-big").write_bytes(os.urandom(700_000))
        (src / "sub" / "small").write_bytes(b"small file")
        (src / "text").write_bytes(b"text " * 20000)
        self.oci = root / "oci"
        self.digest = build(src, self.oci, "t", compress=True).manifest_verity
        (src / "other").write_bytes(b"another tag")
        self.other_digest = build(src, self.oci, "other").manifest_verity
        self.layout = ImageLayout(self.oci)
        self.image = open_image(self.oci, "t")
        self.root = root

    def blob(self, role: str) -> Path:
        if role == "manifest":
            d = self.image.manifest_descriptor.digest
        elif role == "rootfs":
            d = self.image.rootfs_descriptor.digest
        else:  # the chunk holding a-big's first bytes
            raw = self.image.resolve_path("a-big").chunks[0].blob.digest
            return self.oci / "blobs/sha256" / raw.hex()
        return self.oci / "blobs/sha256" / d.hex


@pytest.fixture()
def img(tmp_path: Path) -> Img:
    return Img(tmp_path)


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_good_image_verifies(img: Img) -> None:
    assert verify(img.oci, "t").ok
    assert verify(img.oci, "t", verity_digest=img.digest).ok
    proc = run("verify", f"{img.oci}:t", "--digest", img.digest)
    assert proc.returncode == 0 and "ok" in proc.stdout
    ex = run("extract", "--digest", img.digest, f"{img.oci}:t", str(img.root / "out"))
    assert ex.returncode == 0, ex.stderr


def _expect_refused(img: Img, *words: str) -> dict[str, object]:
    ex = run("extract", "--digest", img.digest, f"{img.oci}:t", str(img.root / "out"))
    assert ex.returncode != 0 and "Traceback" not in ex.stderr
    assert len(ex.stderr.strip().splitlines()) == 1
    proc = run("verify", "--json", "--digest", img.digest, f"{img.oci}:t")
    assert proc.returncode == 1, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    assert not report["ok"]
    text = json.dumps(report["problems"])
    for w in words:
        assert w in text or w in ex.stderr, (w, text, ex.stderr)
    return report


@pytest.mark.parametrize("role", ["chunk", "rootfs", "manifest"])
def test_flipped_byte_refused(img: Img, role: str) -> None:
    path = img.blob(role)
    flip(path)
    _expect_refused(img, path.name)


def test_truncated_chunk_refused(img: Img) -> None:
    path = img.blob("chunk")
    path.write_bytes(path.read_bytes()[:-10])
    report = _expect_refused(img, path.name, "size")
    assert any(p["role"] == "chunk" for p in report["problems"])  # type: ignore[attr-defined]


def test_chunk_replaced_by_another_valid_blob(img: Img) -> None:
    path = img.blob("chunk")
    other = img.blob("rootfs")
    shutil.copyfile(other, path)
    _expect_refused(img, path.name)


def test_manifest_swapped_for_another_tags(img: Img) -> None:
    """Every sha256 still matches: only the fs-verity digest catches it."""
    point_tag_at_other_manifest(img.oci, "t", "other")
    assert verify(img.oci, "t").ok  # consistent without the digest
    report = _expect_refused(img, "manifest")
    assert len(report["problems"]) == 1  # type: ignore[arg-type]


def test_wrong_digest_refused(img: Img) -> None:
    with pytest.raises(DigestMismatch):
        open_image(img.oci, "t", verity_digest=img.other_digest)
    proc = run("verify", "--digest", "ab" * 32, f"{img.oci}:t")
    assert proc.returncode == 1 and "manifest" in proc.stdout
    bad = run("verify", "--digest", "not-hex", f"{img.oci}:t")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: ")


def test_reader_checks_chunks_lazily(img: Img) -> None:
    """Open succeeds (manifest and rootfs are fine); reading the tampered file fails,
    other files still read."""
    flip(img.blob("chunk"))
    image = open_image(img.oci, "t", verity_digest=img.digest)
    assert image.read(image.resolve_path("sub/small"), 0, 100) == b"small file"
    with pytest.raises(ImageError):
        image.read(image.resolve_path("a-big"), 0, 10)


def test_verify_lists_every_problem(img: Img) -> None:
    img.blob("chunk").unlink()
    flip(img.blob("rootfs"), 7)
    report = verify(img.oci, "t")
    roles = sorted(p.role for p in report.problems or [])
    assert "chunk" in roles and "rootfs" in roles
    assert any(p.message == "missing" for p in report.problems or [])


def test_enable_fs_verity_needs_kernel_support(img: Img) -> None:
    """This machine's kernel has no fs-verity; where one does, the real path runs in
    tests/test_verity.py (a loop-mounted ext4 with -O verity)."""
    from puzzlefs.errors import VerityUnsupported

    try:
        n = enable_fs_verity(img.oci, "t", img.digest)
    except VerityUnsupported as e:
        assert "fs-verity" in str(e)
        proc = run("enable-fs-verity", f"{img.oci}:t", img.digest)
        assert proc.returncode != 0 and proc.stderr.startswith("Error: ")
        pytest.skip(f"kernel/filesystem has no fs-verity: {e}")
    assert n >= 4
    assert verify(img.oci, "t", verity_digest=img.digest).ok
