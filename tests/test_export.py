"""`puzzlefs export`: a reproducible tar whose extraction equals `puzzlefs extract`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from treeutil import assert_same_tree, describe, mtimes

from puzzlefs import build, extract, open_image


def export(oci: Path, tag: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", "export", f"{oci}:{tag}", str(out)],
        capture_output=True,
        text=True,
    )


def test_export_equals_extract(all_types_tree: Path, tmp_path: Path) -> None:
    build(all_types_tree, tmp_path / "oci", "t", compress=True)
    proc = export(tmp_path / "oci", "t", tmp_path / "a.tar")
    assert proc.returncode == 0, proc.stderr
    assert "socket" in proc.stderr  # sockets cannot be stored in tar: said, left out
    extract(open_image(tmp_path / "oci", "t"), tmp_path / "extracted")
    (tmp_path / "extracted" / "dev" / "socket").unlink()
    untarred = tmp_path / "untarred"
    untarred.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-C",
            str(untarred),
            "-xf",
            str(tmp_path / "a.tar"),
        ],
        check=True,
    )
    assert_same_tree(tmp_path / "extracted", untarred)
    assert describe(untarred)[b"hard/first"]["nlink"] == 3
    # GNU tar restores the exact times (pax records carry the nanoseconds)
    source = mtimes(all_types_tree)
    del source["dev/socket"]
    assert mtimes(untarred) == source


def test_export_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b" / "c").mkdir(parents=True)
    (src / "a").write_bytes(b"a" * 10000)
    (src / "b" / "c" / "d").write_bytes(bytes(range(256)) * 100)
    (src / "b" / "z").symlink_to("c/d")
    build(src, tmp_path / "oci1", "t")
    build(src, tmp_path / "oci2", "t", compress=True)
    assert export(tmp_path / "oci1", "t", tmp_path / "1.tar").returncode == 0
    assert export(tmp_path / "oci2", "t", tmp_path / "2.tar").returncode == 0
    out = subprocess.run(
        [sys.executable, "-m", "puzzlefs", "export", f"{tmp_path}/oci1:t", "-"],
        capture_output=True,
    )
    one = (tmp_path / "1.tar").read_bytes()
    assert one == (tmp_path / "2.tar").read_bytes() == out.stdout
    listing = subprocess.run(
        ["tar", "-tvf", str(tmp_path / "1.tar")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == ["./", "./a", "./b/", "./b/c/", "./b/c/d", "./b/z"]
