"""Builds on a base (-b): a new layer with only what changed, whiteouts hidden, chains,
type changes, and delta tags that are complete on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from treeutil import assert_same_tree

from puzzlefs import build, extract, open_image
from puzzlefs.chunking import ChunkParams
from puzzlefs.format import Kind
from puzzlefs.oci import ImageLayout
from puzzlefs.reader.verify import verify


def make_v1(root: Path) -> Path:
    src = root / "v1"
    (src / "keep").mkdir(parents=True)
    (src / "gone-dir" / "sub").mkdir(parents=True)
    (src / "keep" / "same").write_bytes(os.urandom(300_000))
    (src / "keep" / "modified").write_bytes(b"version one\n" * 1000)
    (src / "gone-dir" / "sub" / "deep").write_bytes(b"deleted with its directory")
    (src / "gone-file").write_bytes(b"deleted")
    (src / "becomes-dir").write_bytes(b"a file first")
    (src / "becomes-file").mkdir()
    (src / "becomes-file" / "child").write_bytes(b"child of a dir that goes")
    (src / "hard-first").write_bytes(b"linked")
    os.link(src / "hard-first", src / "keep" / "hard-second")
    (src / "xattr").write_bytes(b"x")
    os.setxattr(src / "xattr", "user.k", b"old")
    os.symlink("keep/same", src / "link")
    # Unchanged bulk, as in a real image: keeps the changes a small share, so a
    # delta pays (see test_mostly_new_tree_is_built_flat for when it does not).
    (src / "usr").mkdir()
    for i in range(80):
        (src / "usr" / f"file-{i:02d}").write_bytes(b"unchanged %d\n" % i)
    return src


def make_v2(root: Path, v1: Path) -> Path:
    src = root / "v2"
    shutil.copytree(v1, src, symlinks=True)
    # copytree breaks hard links; restore the one the test cares about
    os.unlink(src / "keep" / "hard-second")
    os.link(src / "hard-first", src / "keep" / "hard-second")
    (src / "keep" / "modified").write_bytes(b"version two\n" * 1000)
    shutil.rmtree(src / "gone-dir")
    os.unlink(src / "gone-file")
    os.unlink(src / "becomes-dir")
    (src / "becomes-dir").mkdir()
    (src / "becomes-dir" / "inside").write_bytes(b"now a directory")
    shutil.rmtree(src / "becomes-file")
    (src / "becomes-file").write_bytes(b"now a file")
    os.unlink(src / "hard-first")  # the link survives through keep/hard-second
    os.setxattr(src / "xattr", "user.k", b"new")
    os.setxattr(src / "xattr", "user.added", b"")
    (src / "added").write_bytes(b"brand new")
    return src


@pytest.fixture()
def versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    v1 = make_v1(tmp_path)
    v2 = make_v2(tmp_path, v1)
    return tmp_path / "oci", v1, v2


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_delta_round_trip(
    versions: tuple[Path, Path, Path], tmp_path: Path, compress: bool
) -> None:
    oci, v1, v2 = versions
    build(v1, oci, "v1", compress=compress)
    build(v2, oci, "v2", compress=compress, base_tag="v1")
    extract(open_image(oci, "v2"), tmp_path / "out2")
    assert_same_tree(v2, tmp_path / "out2")
    extract(open_image(oci, "v1"), tmp_path / "out1")  # the base is untouched
    assert_same_tree(v1, tmp_path / "out1")


def test_delta_keeps_inode_numbers_and_hides_whiteouts(versions: tuple[Path, Path, Path]) -> None:
    oci, v1, v2 = versions
    build(v1, oci, "v1")
    build(v2, oci, "v2", base_tag="v1")
    old = {p: i.ino for p, i in open_image(oci, "v1").walk()}
    image = open_image(oci, "v2")
    new = {p: i for p, i in image.walk()}
    for path in (b"keep", b"keep/same", b"keep/modified", b"xattr", b"link", b"becomes-dir"):
        assert new[path].ino == old[path]
    assert new[b"keep/hard-second"].ino == old[b"keep/hard-second"]
    assert new[b"added"].ino > max(old.values())
    assert b"gone-file" not in new and b"gone-dir" not in new
    assert all(i.kind is not Kind.WHT for i in new.values())
    assert image.rootfs.layer_count == 2
    top = list(image.rootfs.layer(0))
    whiteouts = {i.ino for i in top if i.kind is Kind.WHT}
    assert old[b"gone-file"] in whiteouts and old[b"gone-dir/sub/deep"] in whiteouts
    assert old[b"hard-first"] not in whiteouts  # still reachable through the other link
    # unchanged inodes are not re-rendered, even small files whose chunk changed
    top_inos = {i.ino for i in top}
    assert old[b"link"] not in top_inos
    assert not any(old[b"usr/file-%02d" % i] in top_inos for i in range(80))
    assert len(top) < 20


def test_three_level_chain(versions: tuple[Path, Path, Path], tmp_path: Path) -> None:
    oci, v1, v2 = versions
    v3 = tmp_path / "v3"
    shutil.copytree(v2, v3, symlinks=True)
    shutil.rmtree(v3 / "becomes-dir")
    (v3 / "becomes-dir").write_bytes(b"and back to a file")
    (v3 / "gone-file").write_bytes(b"resurrected")
    os.unlink(v3 / "keep" / "hard-second")
    build(v1, oci, "v1")
    build(v2, oci, "v2", base_tag="v1")
    build(v3, oci, "v3", base_tag="v2")
    image = open_image(oci, "v3")
    assert image.rootfs.layer_count == 3
    extract(image, tmp_path / "out3")
    assert_same_tree(v3, tmp_path / "out3")


def test_delta_tag_is_complete_on_its_own(
    versions: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Copying only what the v2 manifest lists gives a verifiable, extractable image."""
    oci, v1, v2 = versions
    build(v1, oci, "v1", compress=True)
    build(v2, oci, "v2", base_tag="v1", compress=True)
    layout = ImageLayout(oci)
    desc, _, manifest = layout.read_manifest("v2")
    copy = tmp_path / "copy"
    (copy / "blobs/sha256").mkdir(parents=True)
    shutil.copy(oci / "oci-layout", copy / "oci-layout")
    for d in [desc, manifest.config, *manifest.layers]:
        shutil.copy(oci / "blobs/sha256" / d.digest.hex, copy / "blobs/sha256" / d.digest.hex)
    index = json.loads((oci / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"] if m["digest"] == str(desc.digest)]
    (copy / "index.json").write_text(json.dumps(index))
    assert verify(copy, "v2").ok
    extract(open_image(copy, "v2"), tmp_path / "out")
    assert_same_tree(v2, tmp_path / "out")


def test_only_changed_chunks_are_new(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = bytearray(os.urandom(4_000_000))
    (src / "lib.so").write_bytes(big)
    first = build(src, tmp_path / "oci", "v1")
    big[2_000_000:2_000_100] = os.urandom(100)
    (src / "lib.so").write_bytes(big)
    plain = build(src, tmp_path / "oci", "v2-plain")
    delta = build(src, tmp_path / "oci", "v2", base_tag="v1")
    assert first.new_chunks > 20
    assert plain.new_chunks <= 2  # a plain build into the same store shares too
    assert delta.new_chunks == 0  # the plain build already stored them


def test_chunk_sizes_recorded_and_inherited(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1_000_000))
    small = ChunkParams.parse("8K:32K:128K")
    build(src, tmp_path / "oci", "v1", params=small)
    (src / "g").write_bytes(b"more")
    build(src, tmp_path / "oci", "v2", base_tag="v1")
    image = open_image(tmp_path / "oci", "v2")
    assert image.manifest.annotations["io.puzzlefs.chunk-sizes"] == "8192:32768:131072"
    assert max(c.len for c in image.resolve_path("f").chunks) <= 128 * 1024


def test_cli_base_layer(versions: tuple[Path, Path, Path], tmp_path: Path) -> None:
    oci, v1, v2 = versions
    run = [sys.executable, "-m", "puzzlefs"]
    assert (
        subprocess.run([*run, "build", str(v1), f"{oci}:v1"], capture_output=True).returncode == 0
    )
    proc = subprocess.run(
        [*run, "build", "-b", "v1", str(v2), f"{oci}:v2"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run(
        [*run, "build", "-b", "nope", str(v2), f"{oci}:v3"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    assert "v3" not in ImageLayout(oci).tags()


def test_mostly_new_tree_is_built_flat(tmp_path: Path) -> None:
    """When most paths changed, a delta would cost more than a fresh image: -b then
    gives exactly what a plain build gives (chunks are still shared by the store)."""
    old = tmp_path / "old"
    old.mkdir()
    for i in range(20):
        (old / f"old-{i}").write_bytes(os.urandom(1000))
    new = tmp_path / "new"
    new.mkdir()
    for i in range(20):
        (new / f"new-{i}").write_bytes(os.urandom(1000))
    (new / "old-0").write_bytes((old / "old-0").read_bytes())
    build(old, tmp_path / "oci", "old")
    delta = build(new, tmp_path / "oci", "new", base_tag="old")
    plain = build(new, tmp_path / "oci2", "new")
    assert open_image(tmp_path / "oci", "new").rootfs.layer_count == 1
    assert delta.manifest_verity == plain.manifest_verity
