"""Build then extract gives back the source tree, in every detail the format keeps."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from treeutil import MAX_CHUNK, assert_same_tree, describe, mtimes

from puzzlefs import build, extract, open_image
from puzzlefs.compression import (
    DEFAULT_LEVEL,
    MAX_FRAME_DECOMPRESSED,
    MAX_LEVEL,
    ZstdOptions,
    compress_seekable,
)
from puzzlefs.format import Kind


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_round_trip_all_types(all_types_tree: Path, tmp_path: Path, compress: bool) -> None:
    oci = tmp_path / "oci"
    build(all_types_tree, oci, "t", compress=compress)
    image = open_image(oci, "t")
    out = tmp_path / "out"
    stats = extract(image, out)
    assert stats.warnings == []
    assert_same_tree(all_types_tree, out)
    assert mtimes(out) == mtimes(all_types_tree)


def test_times_before_1970_and_with_nanoseconds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_bytes(b"old")
    os.symlink("old", src / "d" / "link")
    os.utime(src / "d" / "old", ns=(0, -86_400_123_456_789))
    os.utime(src / "d" / "link", ns=(0, 123_456_789), follow_symlinks=False)
    os.utime(src / "d", ns=(0, 2_000_000_000_000_000_001))
    build(src, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    assert image.attr(image.resolve_path("d/old")).mtime_ns == -86_400_123_456_789
    extract(image, tmp_path / "out")
    assert mtimes(tmp_path / "out") == mtimes(src)


def test_no_mtimes_reads_as_the_epoch_and_extracts_as_now(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    os.utime(src / "f", ns=(0, 5_000_000_000))
    result = build(src, tmp_path / "oci", "t", mtimes=False)
    image = open_image(tmp_path / "oci", "t")
    assert image.manifest.times is None and result.manifest is not None
    assert image.attr(image.resolve_path("f")).mtime_ns == 0
    extract(image, tmp_path / "out")
    assert os.lstat(tmp_path / "out" / "f").st_mtime_ns != 5_000_000_000


def test_hard_links_are_recreated(all_types_tree: Path, tmp_path: Path) -> None:
    build(all_types_tree, tmp_path / "oci", "t")
    out = tmp_path / "out"
    extract(open_image(tmp_path / "oci", "t"), out)
    first = os.stat(out / "hard" / "first")
    assert first.st_nlink == 3
    assert os.stat(out / "links" / "second").st_ino == first.st_ino
    assert os.stat(out / "third").st_ino == first.st_ino


def test_sparse_file_keeps_holes(all_types_tree: Path, tmp_path: Path) -> None:
    build(all_types_tree, tmp_path / "oci", "t")
    out = tmp_path / "out"
    extract(open_image(tmp_path / "oci", "t"), out)
    st = os.stat(out / "sparse")
    assert st.st_size == 3 * 1024 * 1024 + 20
    assert st.st_blocks * 512 < 1024 * 1024


def test_chunk_boundaries_follow_the_stream(all_types_tree: Path, tmp_path: Path) -> None:
    """All-zero data cuts at the maximum size: 00-exact is exactly one chunk, 01-past
    starts a new chunk and spills one byte into the next, shared with what follows."""
    build(all_types_tree, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    exact = image.resolve_path("00-exact")
    assert [(c.blob.offset, c.len) for c in exact.chunks] == [(0, MAX_CHUNK)]
    past = image.resolve_path("01-past")
    assert [(c.blob.offset, c.len) for c in past.chunks] == [(0, MAX_CHUNK), (0, 1)]
    assert past.chunks[0].blob.digest == exact.chunks[0].blob.digest  # stored once
    # the next non-empty file in the stream (inode order) shares that last chunk
    files = sorted(
        (i for _, i in image.walk() if i.kind is Kind.FILE and i.chunks), key=lambda i: i.ino
    )
    after = files[[f.ino for f in files].index(past.ino) + 1]
    assert after.chunks[0].blob.offset == 1
    assert after.chunks[0].blob.digest == past.chunks[1].blob.digest
    empty = image.resolve_path("empty")
    assert empty.chunks == []


def test_identical_files_share_chunks(all_types_tree: Path, tmp_path: Path) -> None:
    build(all_types_tree, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    a, b = image.resolve_path("dup-a"), image.resolve_path("dup-b")
    assert {c.blob.digest for c in a.chunks} & {c.blob.digest for c in b.chunks} or len(
        a.chunks
    ) == 1


def test_inode_numbers_follow_the_canonical_walk(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for d in ("a", "c", "a/x"):
        (root / d).mkdir(parents=True)
    (root / "b").write_bytes(b"b")
    (root / "a" / "y").write_bytes(b"y")
    (root / "c" / "z").write_bytes(b"z")
    (root / "a" / "x" / "w").write_bytes(b"w")
    build(root, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    numbers = {path.decode(): inode.ino for path, inode in image.walk()}
    # / = 1; a, b, c = 2, 3, 4; a's entries x, y = 5, 6; then a/x's w = 7; then c's z = 8
    assert numbers == {"": 1, "a": 2, "b": 3, "c": 4, "a/x": 5, "a/y": 6, "a/x/w": 7, "c/z": 8}


def test_cli_build_and_extract(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    run = [sys.executable, "-m", "puzzlefs"]
    out = subprocess.run(
        [*run, "build", str(src), f"{tmp_path}/oci:v1"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # not a TTY: no progress
    line = out.stdout.strip()
    assert line.startswith("puzzlefs image manifest digest: ") and len(line.split()[-1]) == 64
    ex = subprocess.run([*run, "extract", f"{tmp_path}/oci:v1", str(tmp_path / "out")])
    assert ex.returncode == 0
    assert describe(src) == describe(tmp_path / "out")


def test_several_tags_share_one_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    build(src, tmp_path / "oci", "one")
    blobs = set(os.listdir(tmp_path / "oci/blobs/sha256"))
    (src / "g").write_bytes(b"new")
    build(src, tmp_path / "oci", "two")
    build(src, tmp_path / "oci", "one")  # re-tag replaces
    from puzzlefs.oci import ImageLayout

    tags = ImageLayout(tmp_path / "oci").tags()
    assert sorted(tags) == ["one", "two"]
    assert tags["one"].digest == tags["two"].digest
    assert blobs <= set(os.listdir(tmp_path / "oci/blobs/sha256"))


def test_zstd_frame_size_and_level(tmp_path: Path) -> None:
    """Any frame size and level give a valid seekable blob: smaller stores, same contents;
    the CLI's options give what the API's ZstdOptions give."""
    src = tmp_path / "src"
    src.mkdir()
    text = b"".join(b"line %d of a file, %x\n" % (i, i * 7919 % 100_003) for i in range(40_000))
    (src / "text").write_bytes(text)
    oci = tmp_path / "oci"
    digests = {
        "4k": build(src, oci, "4k", compress=True).manifest_verity,
        "64k": build(src, oci, "64k", compress=ZstdOptions(frame_size=65536)).manifest_verity,
        "64k-19": build(src, oci, "64k-19", compress=ZstdOptions(65536, 19)).manifest_verity,
    }
    assert len(set(digests.values())) == 3
    sizes = {}
    for tag in digests:
        image = open_image(oci, tag)
        inode = image.resolve_path("text")
        assert b"".join(image.read_all(inode)) == text
        assert image.read(inode, 100_000, 5000) == text[100_000:105_000]
        sizes[tag] = sum(d.size for d in image.manifest.chunk_layers)
    assert sizes["64k-19"] < sizes["64k"] < sizes["4k"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "puzzlefs", "build", *args, str(src), f"{oci}:x"],
            capture_output=True,
            text=True,
        )

    same = cli("-c", "--zstd-frame-size", "64K", "--zstd-level", "19")
    assert same.returncode == 0, same.stderr
    assert same.stdout.split()[-1] == digests["64k-19"]
    for bad, says in [
        (["-c", "--zstd-frame-size", "100"], "frame size must be 512 bytes to 16M"),
        (["-c", "--zstd-level", "0"], "level must be 1 to 19"),
        (["-c", "--zstd-level", "20"], "level must be 1 to 19"),
        (["-c", "--zstd-level", "-1"], "level must be a number from 1 to 19"),
        (["-c", "--zstd-level", "high"], "level must be a number from 1 to 19"),
        (["--zstd-level", "9"], "need -c"),
        (["--zstd-frame-size", "64K"], "need -c"),
    ]:
        r = cli(*bad)
        assert r.returncode == 2 and r.stderr.startswith("Error: ") and says in r.stderr, bad
        assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("level", [DEFAULT_LEVEL, MAX_LEVEL])
def test_zstd_frames_ask_for_at_most_an_8_mib_window(level: int) -> None:
    """Frames are written without their size, so a decoder must be ready for the whole
    window the level asks for: at most 8 MiB, which the zstd format asks every decoder
    (the kernel's too) to support, whatever the frame size."""
    data = random.Random(level).randbytes(1 << 20) * 2
    blob = compress_seekable(data, ZstdOptions(MAX_FRAME_DECOMPRESSED, level))
    assert zstandard.get_frame_parameters(blob).window_size <= 8 << 20
