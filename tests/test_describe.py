"""inspect, ls, diff and du as a user reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from puzzlefs import build
from puzzlefs.describe import diff_images, inspect_image, list_paths


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture()
def two(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "conf").write_text("a = 1\n")
    (src / "big").write_bytes(os.urandom(300_000))
    (src / "gone").write_text("gone\n")
    os.symlink("etc/conf", src / "link")
    os.utime(src / "etc" / "conf", (0, 1_000_000_000))
    oci = tmp_path / "oci"
    build(src, oci, "v1")
    (src / "gone").unlink()
    (src / "new").write_text("new\n")
    (src / "etc" / "conf").write_text("a = 2\n")
    os.chmod(src / "big", 0o600)
    build(src, oci, "v2", compress=True)
    return oci


def test_inspect(two: Path) -> None:
    f = inspect_image(two, "v2")
    assert f.compression == "zstd" and f.metadata_layers == 1 and f.times_digest
    assert f.kinds == {"directories": 2, "files": 3, "symlinks": 1}
    assert f.inodes == 6 and f.chunk_count >= 2
    out = run("inspect", f"{two}:v2")
    assert out.returncode == 0 and f.fs_verity_digest in out.stdout
    assert json.loads(run("inspect", "--json", f"{two}:v2").stdout)["chunk_count"] == f.chunk_count


def test_ls(two: Path) -> None:
    assert list(list_paths(two, "v1")) == [".", "./big", "./etc/", "./etc/conf", "./gone", "./link"]
    assert list(list_paths(two, "v1", "etc")) == ["./etc/", "./etc/conf"]
    long = run("ls", "-l", f"{two}:v1", "link").stdout.splitlines()
    assert long[0].startswith("lrwxrwxrwx 0/0") and long[0].endswith("./link -> etc/conf")
    conf = run("ls", "-l", f"{two}:v1", "etc/conf").stdout
    assert "2001-09-09 01:46 ./etc/conf" in conf  # 10**9 s, in UTC
    missing = run("ls", f"{two}:v1", "nope")
    assert missing.returncode != 0 and missing.stderr.startswith("Error: 'nope' is not in")


def test_ls_into_a_closed_pipe_is_quiet(two: Path) -> None:
    done = subprocess.run(
        f"{sys.executable} -m puzzlefs ls {two}:v1 | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == ".\n" and done.stderr == ""


def test_diff(two: Path) -> None:
    d = diff_images((two, "v1"), (two, "v2"))
    assert d.added == ["./new"] and d.removed == ["./gone"]
    changed = {c.path: c.what for c in d.changed}
    assert changed["./etc/conf"] == ["content", "mtime"]
    assert changed["./big"] == ["mode"]  # recompressed into other chunks: same bytes
    assert d.new_bytes > 0
    out = run("diff", f"{two}:v1", "v2")
    assert out.returncode == 0 and "+ ./new" in out.stdout and "- ./gone" in out.stdout
    assert "1 added, 1 removed" in out.stdout
    assert json.loads(run("diff", "--json", f"{two}:v1", f"{two}:v2").stdout)["added"] == ["./new"]


def test_du_reads_as_sizes(two: Path) -> None:
    human = run("du", "-h", str(two)).stdout
    assert "KiB" in human and "ADDS" in human and "layer" not in human.lower()
    raw = run("du", "--bytes", str(two)).stdout
    assert "KiB" not in raw
    one = run("du", str(two), "v1").stdout
    assert "1 tag:" in one and "than their tars" in one
    data = json.loads(run("du", "--json", str(two)).stdout)
    v1 = data["tags"][0]
    assert v1["stored_bytes"] == v1["metadata_bytes"] + v1["chunk_bytes"]
    assert v1["adds_bytes"] == v1["stored_bytes"] - v1["shared_bytes"]


def test_every_command_explains_itself() -> None:
    top = run("--help").stdout
    commands = [
        "build", "extract", "export", "verify", "du", "inspect", "ls", "diff",
        "enable-fs-verity", "tags", "rm", "gc", "mount", "umount", "import",
    ]  # fmt: skip
    for c in commands:
        assert c in top
        text = run(c, "--help").stdout
        assert "examples:" in text and f"puzzlefs {c}" in text.split("examples:")[1], c
        examples = text.split("examples:")[1].strip().splitlines()
        assert not any("   puzzlefs " in e.strip() for e in examples), (c, examples)
