#!/usr/bin/env python3
"""Seeded synthetic trees for the mount benchmark: many small files, as images have.

A tree of N entries (N paths below its root, so ``find . | wc -l`` prints N + 1):

- one directory, ``big/``, of 3,000 files and symlinks (the ``ls -l`` test);
- the rest in directories of about 30 entries each (15 to 45), each directory with a
  few subdirectories (3 to 9, breadth first, so 300k entries are 5 levels deep);
- 5% of the non-directories are symlinks (to a sibling, some dangling), the rest
  regular files, 5% of them executable;
- file sizes drawn from a log-normal distribution fitted to Debian 12's /usr/share
  (median 1.6 KiB, sigma 1.45 in log space; 2% empty, capped at 1 MiB): about
  4.5 KiB per file on average, so 300k entries hold about 1.2 GB;
- contents random letters, spaces and punctuation with English-like frequencies (zstd
  -3 keeps 60% of it), never repeated across files, so no peer de-duplicates them;
- every name, size, mode and byte from ``random.Random(seed)``, and every mtime fixed:
  the same seed gives the same tree on any machine with the same Python version (the
  generator's algorithms are pinned by :data:`VERSION`).

Trees are cached: :func:`cached_tree` generates into ``WORKDIR/trees/`` once and
returns the existing tree after that (a ``.json`` beside it records what it holds and
marks it complete). 300k entries take about 20 s here (one process, creation and
writes are the cost).

    python3 benchmarks/trees.py 300k [--seed 1] [--workdir DIR]   # cached, prints path
    python3 benchmarks/trees.py 10000 --out DIR                    # uncached, into DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["BIG_DIR", "SIZES", "TreeInfo", "cached_tree", "generate", "parse_size"]

VERSION = 1  # bump whenever the same seed would give a different tree
SIZES = {"10k": 10_000, "100k": 100_000, "300k": 300_000}
BIG_DIR = "big"
BIG_ENTRIES = 3_000
PER_DIR = (15, 45)  # entries per ordinary directory, uniform: about 30
SUBDIRS = (3, 9)  # subdirectories per directory, until there are enough
SYMLINK_SHARE = 0.05
EXEC_SHARE = 0.05
EMPTY_SHARE = 0.02
SIZE_MEDIAN = 1600  # bytes
SIZE_SIGMA = 1.45  # of ln(size)
SIZE_MAX = 1 << 20
MTIME_NS = 1_700_000_000 * 10**9  # 2023-11-14, for every entry
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
EXTENSIONS = [".py", ".h", ".c", ".txt", ".json", ".html", ".so", ".gz", ".md", ".conf", ""]
# Letters (English frequencies), spaces, newlines and some punctuation: 4.7 bits/byte.
_ALPHABET = (
    "e" * 12 + "t" * 9 + "a" * 8 + "o" * 8 + "i" * 7 + "n" * 7 + "s" * 6 + "h" * 6 + "r" * 6
    + "d" * 4 + "l" * 4 + "u" * 3 + "c" * 3 + "m" * 3 + "f" * 2 + "w" * 2 + "y" * 2 + "p" * 2
    + "g" * 2 + "bvkxjqz" + " " * 18 + "\n" * 3 + "_" * 2 + ".,()=:" + "0123456789"
)  # fmt: skip
_TEXT = (_ALPHABET * 2)[:256].encode()


@dataclass
class TreeInfo:
    """What a generated tree holds (also the cache's completion marker)."""

    path: str
    seed: int
    entries: int  # paths below the root
    dirs: int  # below the root
    files: int
    symlinks: int
    bytes: int
    big_dir: str  # relative to the root
    seconds: float
    version: int = VERSION


def parse_size(text: str) -> int:
    """``10k``, ``300k``, ``1m`` or a plain number of entries."""
    t = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    number = int(t[:-1] if scale > 1 else t)
    if number * scale < BIG_ENTRIES + 100:
        raise ValueError(f"a tree needs at least {BIG_ENTRIES + 100} entries, not {text}")
    return number * scale


def _name(rng: random.Random, i: int, ext: bool) -> str:
    stem = "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))
    # The index keeps names unique in their directory; names vary in length as real ones.
    return f"{stem}-{i}{rng.choice(EXTENSIONS) if ext else ''}"


def _size(rng: random.Random) -> int:
    if rng.random() < EMPTY_SHARE:
        return 0
    return min(SIZE_MAX, int(rng.lognormvariate(math.log(SIZE_MEDIAN), SIZE_SIGMA)))


def _plan(entries: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Directory tree as parent indices (0 is the root) and non-directories per directory.

    Ordinary directories get their subdirectories breadth first, then enough other
    entries to reach about 30 each; the counts are then nudged so that the total is
    exactly ``entries`` (the big directory and its entries included).
    """
    rest = entries - 1 - BIG_ENTRIES  # without big/ and what it holds
    ndirs = max(1, round(rest / (sum(PER_DIR) / 2)))  # about 30 entries per directory
    parent = [-1]  # index 0: the root
    subdirs = [0]
    frontier = 0
    while len(parent) <= ndirs:
        k = min(rng.randint(*SUBDIRS), ndirs + 1 - len(parent))
        for _ in range(k):
            parent.append(frontier)
            subdirs.append(0)
        subdirs[frontier] += k
        frontier += 1
    subdirs[0] += 1  # big/
    files = [max(0, rng.randint(*PER_DIR) - s) for s in subdirs]
    want = rest - ndirs
    have = sum(files)
    while have != want:
        i = rng.randrange(len(files))
        if have < want:
            files[i] += 1
            have += 1
        elif files[i] > 0:
            files[i] -= 1
            have -= 1
    return parent, files


def generate(dest: str | os.PathLike[str], entries: int, seed: int = 1) -> TreeInfo:
    """Write the tree for (``entries``, ``seed``) into ``dest`` (created, must not exist)."""
    start = time.perf_counter()
    rng = random.Random(seed)
    parent, files = _plan(entries, rng)
    root = Path(dest)
    root.mkdir(parents=True)
    paths = [root]
    counts = {"files": 0, "symlinks": 0, "bytes": 0}
    for i in range(1, len(parent)):
        p = paths[parent[i]] / f"d{_name(rng, i, ext=False)}"
        p.mkdir()
        paths.append(p)
    big = root / BIG_DIR
    big.mkdir()
    jobs = [*zip(paths, files, strict=True), (big, BIG_ENTRIES)]
    for directory, n in jobs:
        _fill(directory, n, rng, counts)
    # Times last (creating entries changes the directories' own).
    for directory in [*paths, big]:
        os.utime(directory, ns=(MTIME_NS, MTIME_NS))
    return TreeInfo(
        path=str(root),
        seed=seed,
        entries=entries,
        dirs=len(paths),  # paths holds the root but not big/
        files=counts["files"],
        symlinks=counts["symlinks"],
        bytes=counts["bytes"],
        big_dir=BIG_DIR,
        seconds=round(time.perf_counter() - start, 2),
    )


def _fill(directory: Path, n: int, rng: random.Random, counts: dict[str, int]) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        made: list[str] = []
        for j in range(n):
            name = _name(rng, j, ext=True)
            if made and rng.random() < SYMLINK_SHARE:
                # Mostly a sibling; one in ten points at nothing (dangling links exist).
                target = rng.choice(made) if rng.random() < 0.9 else f"missing-{j}"
                os.symlink(target, name, dir_fd=dfd)
                os.utime(name, ns=(MTIME_NS, MTIME_NS), dir_fd=dfd, follow_symlinks=False)
                counts["symlinks"] += 1
            else:
                size = _size(rng)
                mode = 0o755 if rng.random() < EXEC_SHARE else 0o644
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=dfd)
                try:
                    data = rng.randbytes(size).translate(_TEXT)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.utime(fd, ns=(MTIME_NS, MTIME_NS))
                finally:
                    os.close(fd)
                made.append(name)
                counts["files"] += 1
                counts["bytes"] += size
    finally:
        os.close(dfd)


def cached_tree(workdir: str | os.PathLike[str], entries: int, seed: int = 1) -> TreeInfo:
    """The tree for (``entries``, ``seed``) under ``workdir/trees``, generated if missing."""
    base = Path(workdir) / "trees"
    name = f"synthetic-{entries}-seed{seed}-v{VERSION}"
    tree, marker = base / name, base / f"{name}.json"
    if marker.exists() and tree.is_dir():
        return TreeInfo(**json.loads(marker.read_text()))
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    info = generate(tmp, entries, seed)
    os.rename(tmp, tree)
    info.path = str(tree)
    marker.write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("entries", help="10k, 100k, 300k or a number")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default="/var/tmp/puzzlefs-mount-bench", help="cache root")
    ap.add_argument("--out", help="generate into this new directory instead (no cache)")
    args = ap.parse_args()
    try:
        entries = parse_size(args.entries)
    except ValueError as e:
        ap.error(str(e))
    if args.out:
        info = generate(args.out, entries, args.seed)
    else:
        info = cached_tree(args.workdir, entries, args.seed)
    json.dump(asdict(info), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
