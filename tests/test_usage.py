"""`puzzlefs du`: sizes checked against trees whose sharing is known, and the tar size
against GNU tar itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from puzzlefs import build
from puzzlefs.reader.usage import usage


def _tar_bytes(tree: Path) -> int:
    out = subprocess.run(
        [
            "tar",
            "--sort=name",
            "--mtime=@0",
            "--numeric-owner",
            "--xattrs",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "-C",
            str(tree),
            "-cf",
            "-",
            ".",
        ],
        capture_output=True,
        check=True,
    ).stdout
    return len(out)


def test_tar_size_matches_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = src / ("d" * 60) / ("e" * 60) / ("f" * 60)
    deep.mkdir(parents=True)
    (deep / ("long-name-" * 12)).write_bytes(os.urandom(5000))
    (src / "small").write_bytes(b"x" * 513)
    (src / "empty").write_bytes(b"")
    os.symlink("t" * 150, src / "long-link")
    os.symlink("short", src / "short-link")
    os.link(src / "small", src / "hard")
    (src / "xattr").write_bytes(b"x")
    os.setxattr(src / "xattr", "user.key", b"value")
    os.setxattr(src / "xattr", "user.empty", b"")
    build(src, tmp_path / "oci", "t")
    result = usage(tmp_path / "oci")
    assert result.tags[0].tar == _tar_bytes(src)
    assert result.tags[0].logical == 5000 + 513 + 1
    assert result.tags[0].files == 4


def test_shared_bytes_are_known(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "data").write_bytes(os.urandom(2_000_000))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "empty-dir").mkdir()  # changes only the metadata
    oci = tmp_path / "oci"
    build(a, oci, "a")
    build(b, oci, "b")
    result = usage(oci)
    ta, tb = result.tags
    chunk_bytes = ta.chunks
    assert chunk_bytes == tb.chunks == 2_000_000  # random data: stored raw
    assert ta.shared == tb.shared == chunk_bytes + 2  # + the empty config blob
    assert result.unified == ta.stored + tb.stored - ta.shared
    assert result.unified_metadata == ta.metadata + tb.metadata - 2
    assert 0.45 < result.saved < 0.5
    text = result.table()
    assert "PuzzleFS" in text and "Uncompressed tar" in text


def test_cli_du(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello")
    build(src, tmp_path / "oci", "t")
    proc = subprocess.run(
        [sys.executable, "-m", "puzzlefs", "du", str(tmp_path / "oci"), "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["tags"][0]["file_bytes"] == 5
    bad = subprocess.run(
        [sys.executable, "-m", "puzzlefs", "du", str(tmp_path / "oci"), "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and bad.stderr.startswith("Error: ")


def test_du_without_tags_lists_all(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build(src, tmp_path / "oci", "x")
    build(src, tmp_path / "oci", "y")
    assert [t.tag for t in usage(tmp_path / "oci").tags] == ["x", "y"]
