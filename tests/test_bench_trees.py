"""benchmarks/trees.py: the mount benchmark's synthetic trees are what they claim, and
the same seed always gives the same tree (the benchmark's numbers depend on it)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trees  # noqa: E402

ENTRIES = 4_000


def _listing(root: Path) -> list[tuple[str, str, int, str]]:
    """(path, kind, size, link target or content hash) of every entry, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out.append((rel, "l", 0, os.readlink(p)))
            elif p.is_dir():
                out.append((rel, "d", 0, ""))
            else:
                data = p.read_bytes()
                out.append(
                    (
                        rel,
                        f"f{p.stat().st_mode & 0o777:o}",
                        len(data),
                        hashlib.sha256(data).hexdigest(),
                    )
                )
    return sorted(out)


def test_counts_and_shape(tmp_path: Path) -> None:
    info = trees.generate(tmp_path / "t", ENTRIES, seed=3)
    entries = _listing(tmp_path / "t")
    assert len(entries) == ENTRIES == info.entries
    kinds = [e[1][0] for e in entries]
    assert kinds.count("d") == info.dirs
    assert kinds.count("l") == info.symlinks > 0
    assert kinds.count("f") == info.files
    assert sum(e[2] for e in entries) == info.bytes
    assert len(os.listdir(tmp_path / "t" / trees.BIG_DIR)) == trees.BIG_ENTRIES
    # Outside big/, about 30 entries per directory (info.dirs counts big/ but not the
    # root, so it is also the number of the other directories, the root included).
    ordinary = ENTRIES - 1 - trees.BIG_ENTRIES
    assert 25 <= ordinary / info.dirs <= 35


def test_same_seed_same_tree(tmp_path: Path) -> None:
    trees.generate(tmp_path / "a", ENTRIES, seed=7)
    trees.generate(tmp_path / "b", ENTRIES, seed=7)
    trees.generate(tmp_path / "c", ENTRIES, seed=8)
    a = _listing(tmp_path / "a")
    assert a == _listing(tmp_path / "b")
    assert a != _listing(tmp_path / "c")
    mtimes = {os.lstat(tmp_path / "a" / e[0]).st_mtime_ns for e in a}
    assert mtimes == {trees.MTIME_NS}


def test_cached_tree_is_made_once(tmp_path: Path) -> None:
    first = trees.cached_tree(tmp_path, ENTRIES, seed=1)
    marker = Path(first.path) / trees.BIG_DIR / "marker-left-by-the-test"
    marker.write_text("x")
    again = trees.cached_tree(tmp_path, ENTRIES, seed=1)
    assert again.path == first.path and marker.exists()


@pytest.mark.parametrize("text, entries", [("10k", 10_000), ("300k", 300_000), ("5000", 5_000)])
def test_parse_size(text: str, entries: int) -> None:
    assert trees.parse_size(text) == entries


def test_parse_size_refuses_too_small() -> None:
    with pytest.raises(ValueError):
        trees.parse_size("1k")
