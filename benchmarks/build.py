#!/usr/bin/env python3
"""Build speed against the floor and the peers, in one run, on one large real tree.

Times, with the page cache warm (one untimed read pass first):

- read + sha256 of every regular file (each hard-linked file once), in this process,
  with large reads: the floor, the least any tool that reads and hashes the tree needs;
- ``puzzlefs build`` and ``puzzlefs build -c`` into a fresh OCI directory (the CLI, so
  interpreter start-up counts; a build ends with a syncfs of its blob store);
- ``tar -cf - -C TREE . | gzip -6`` (how OCI v1 layers are made), ``tar | zstd -3 -T2``
  and ``mksquashfs TREE out -comp zstd`` (Debian's squashfs-tools, all cores).

Then prints one Markdown table: time, CPU time (user + sys, so the cores used show),
output size, and each time as a ratio to the floor and to each peer, followed by the
build speed targets of issue 2. Nothing here asserts on times: this is a measurement,
not a test.

Outputs go to a temporary directory under ``--tmp`` (default /var/tmp: a real disk,
not tmpfs; a tmpfs would hide the cost of writing). Before each timed step the
previous output is removed and the filesystem synced, untimed, so no step pays for
another's writeback.

    python3 benchmarks/build.py [PATH] [--tmp DIR] [--skip-slow] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TREE = "/usr/lib/x86_64-linux-gnu"
READ_SIZE = 1 << 20

FLOOR = "read + sha256 (floor)"
PUZZLEFS = "puzzlefs build"
PUZZLEFS_C = "puzzlefs build -c"
GZIP = "tar | gzip -6"
ZSTD = "tar | zstd -3 -T2"
SQUASHFS = "mksquashfs -comp zstd"
PEERS = [ZSTD, GZIP, SQUASHFS]


@dataclass
class Result:
    name: str
    seconds: float
    cpu: float
    size: int | None  # bytes written, None for the floor
    command: str


def regular_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` once (hard links once), not following
    symlinks nor crossing filesystems: what tar, mksquashfs and puzzlefs read."""
    seen: set[tuple[int, int]] = set()
    root_dev = root.lstat().st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).lstat().st_dev == root_dev]
        for name in filenames:
            path = here / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            yield path


def read_all(files: list[Path], hash_it: bool) -> int:
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = 0
    for path in files:
        h = hashlib.sha256() if hash_it else None
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if h is not None:
                    h.update(view[:n])
                total += n
        if h is not None:
            h.digest()
    return total


def tree_size(path: Path) -> int:
    """Bytes of all files under ``path`` (or of ``path`` itself), as stored."""
    if path.is_file():
        return path.stat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, names in os.walk(path) for f in names)


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def clean(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def timed_shell(name: str, command: str, out: Path, repeat: int) -> Result:
    best: Result | None = None
    for _ in range(repeat):
        clean(out)
        cpu0, t0 = cpu_children(), time.perf_counter()
        subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
        seconds, cpu = time.perf_counter() - t0, cpu_children() - cpu0
        if best is None or seconds < best.seconds:
            best = Result(name, seconds, cpu, tree_size(out), command)
    assert best is not None
    return best


def timed_floor(files: list[Path], repeat: int) -> Result:
    best: Result | None = None
    for _ in range(repeat):
        cpu0, t0 = cpu_self(), time.perf_counter()
        read_all(files, hash_it=True)
        seconds, cpu = time.perf_counter() - t0, cpu_self() - cpu0
        if best is None or seconds < best.seconds:
            best = Result(FLOOR, seconds, cpu, None, "in-process: hashlib.sha256, 1 MiB readinto")
    assert best is not None
    return best


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    real, best, fstype = str(path.resolve()), "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mnt = fields[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f}"


def ratio(a: float, b: float | None) -> str:
    return "" if not b else f"{a / b:.2f}x"


_SHORT = {FLOOR: "floor", ZSTD: "tar\\|zstd", GZIP: "tar\\|gzip", SQUASHFS: "mksquashfs"}


def table(results: dict[str, Result], input_bytes: int) -> str:
    cols = [FLOOR, *[p for p in PEERS if p in results]]
    head = ["step", "time s", "CPU s", "output MB", "output/input"]
    head += [f"time / {_SHORT[c]}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results.values():
        row = [
            r.name if r.name == FLOOR else f"`{r.name}`".replace("|", "\\|"),
            f"{r.seconds:.2f}",
            f"{r.cpu:.2f}",
            mb(r.size),
            "" if r.size is None else f"{r.size / input_bytes:.1%}",
        ]
        row += [ratio(r.seconds, results[c].seconds) if c != r.name else "" for c in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Result]) -> list[str]:
    """Issue 2's targets, as measured: text, not assertions."""

    def t(name: str) -> float | None:
        r = results.get(name)
        return r.seconds if r else None

    checks: list[tuple[str, str, str, float]] = [
        ("uncompressed build", PUZZLEFS, FLOOR, 3.0),
        ("`-c` build", PUZZLEFS_C, ZSTD, 2.0),
    ]
    out = []
    for label, a, b, limit in checks:
        ta, tb = t(a), t(b)
        if ta is not None and tb is not None:
            verdict = "met" if ta / tb <= limit else "MISSED"
            out.append(f"- {label} / `{b}`: {ta / tb:.2f}x (target <= {limit:g}x): {verdict}")
    tc, ts = t(PUZZLEFS_C), t(SQUASHFS)
    if tc is not None and ts is not None:
        verdict = "met" if ts / tc >= 5 else "MISSED"
        out.append(
            f"- `-c` build is {ts / tc:.1f}x faster than `{SQUASHFS}` (target >= 5x): {verdict}"
        )
    tu, tg = t(PUZZLEFS), t(GZIP)
    if tu is not None and tg is not None:
        out.append(f"- uncompressed build is {tg / tu:.1f}x faster than `{GZIP}`")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree", nargs="?", help=f"the tree to build (default {DEFAULT_TREE})")
    p.add_argument("--path", dest="path_opt", help="the tree (same as the positional PATH)")
    p.add_argument("--tmp", default="/var/tmp", help="where outputs go (a disk, not tmpfs)")
    p.add_argument("--skip-slow", action="store_true", help="skip tar | gzip and mksquashfs")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    args = p.parse_args(argv)

    tree = Path(args.path_opt or args.tree or DEFAULT_TREE).resolve()
    if not tree.is_dir():
        p.error(f"{tree} is not a directory")
    tmp_root = Path(args.tmp)
    fstype = filesystem_of(tmp_root)
    if fstype in ("tmpfs", "ramfs"):
        print(
            f"warning: {tmp_root} is on {fstype}: writes cost less than on a disk", file=sys.stderr
        )
    missing = [t for t in ("tar", "gzip", "zstd", "mksquashfs") if not shutil.which(t)]
    if missing:
        print(
            f"warning: not installed: {', '.join(missing)} "
            "(apt-get install -y squashfs-tools zstd); their rows are skipped",
            file=sys.stderr,
        )

    files = list(regular_files(tree))
    input_bytes = read_all(files, hash_it=False)  # warms the page cache; untimed
    print(
        f"tree: {tree}: {len(files):,} files, {input_bytes / 1e6:,.1f} MB; "
        f"outputs on {tmp_root} ({fstype}); {os.cpu_count()} CPUs; "
        f"Python {sys.version.split()[0]}; best of {args.repeat}",
        file=sys.stderr,
    )

    puzzlefs = [sys.executable, "-m", "puzzlefs"]
    q = subprocess.list2cmdline
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="puzzlefs-bench-", dir=tmp_root) as tmpdir:
        tmp = Path(tmpdir)
        steps: list[tuple[str, Callable[[], Result]]] = [
            (FLOOR, lambda: timed_floor(files, args.repeat)),
        ]
        for name, flags in ((PUZZLEFS, []), (PUZZLEFS_C, ["-c"])):
            out = tmp / ("oci-c" if flags else "oci")
            cmd = q([*puzzlefs, "build", *flags, str(tree), f"{out}:bench"]) + " >/dev/null"
            steps.append((name, lambda n=name, c=cmd, o=out: timed_shell(n, c, o, args.repeat)))
        shell_peers = [
            (
                ZSTD,
                "zstd",
                f"tar -cf - -C {q([str(tree)])} . | zstd -q -3 -T2 > {tmp}/out.tar.zst",
                tmp / "out.tar.zst",
            ),
            (
                GZIP,
                "gzip",
                f"tar -cf - -C {q([str(tree)])} . | gzip -6 > {tmp}/out.tar.gz",
                tmp / "out.tar.gz",
            ),
            (
                SQUASHFS,
                "mksquashfs",
                f"mksquashfs {q([str(tree)])} {tmp}/out.sqfs -comp zstd -noappend -quiet "
                ">/dev/null",
                tmp / "out.sqfs",
            ),
        ]
        for name, tool, cmd, out in shell_peers:
            if tool in missing or (args.skip_slow and name in (GZIP, SQUASHFS)):
                continue
            steps.append((name, lambda n=name, c=cmd, o=out: timed_shell(n, c, o, args.repeat)))
        for name, step in steps:
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            results[name] = step()
            clean(tmp)
            tmp.mkdir(exist_ok=True)

    print(
        f"\n{tree}: {len(files):,} files, {input_bytes / 1e6:,.1f} MB, page cache warm, "
        f"outputs on {fstype}, {os.cpu_count()} CPUs, best of {args.repeat}\n"
    )
    print(table(results, input_bytes))
    print()
    print("\n".join(targets(results)))
    print("\nCommands:")
    for r in results.values():
        print(f"- {r.name}: `{r.command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
