#!/usr/bin/env python3
"""Build speed against the floor and the peers, in one run, on one large real tree.

Times, with the page cache warm (an untimed read pass before every timed run):

- read + sha256 of every regular file (each hard-linked file once), in this process,
  with 1 MiB reads: the floor, the least any tool that reads and hashes the tree needs;
- ``puzzlefs build`` and ``puzzlefs build -c`` into a fresh OCI directory (the CLI, so
  interpreter start-up counts; a build ends with a syncfs of its blob store, which the
  peers do not do);
- ``tar -cf - -C TREE . | gzip -6`` (how OCI v1 layers are made), ``tar | zstd -3 -T2``
  and ``mksquashfs TREE out -comp zstd`` (Debian's squashfs-tools, all cores).

Then prints one Markdown table: time, CPU time (user + sys of everything the step ran,
so the cores used show), output size, and each time as a ratio to the floor and to each
peer, followed by the build speed targets of issue 2, as measured. Nothing here asserts
on times: this is a measurement, not a test.

Outputs go to a temporary directory under ``--tmp`` (default /var/tmp: a disk, not
tmpfs, which would hide the cost of writing). Every run writes a new output and nothing
is deleted until the end: on ext4 without a journal, inodes freed in the last minutes
make creating files slow (``recently_deleted`` in the inode allocator), which would
bill one step for another's clean-up. The filesystem is synced before each run, so no
run pays for another's writeback. With ``--repeat N``, N rounds of all steps run and
each step keeps its best time; rounds, because the speed of a shared machine drifts
and each ratio should compare runs made close together. A run during which someone
dropped the kernel's caches is made again.

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
_SHORT = {FLOOR: "floor", ZSTD: "tar\\|zstd", GZIP: "tar\\|gzip", SQUASHFS: "mksquashfs"}


@dataclass
class Result:
    name: str
    seconds: float
    cpu: float
    size: int | None  # bytes written, None for the floor
    others: float  # CPUs that other processes kept busy meanwhile
    create_us: float  # what creating an empty file cost just before


@dataclass
class Step:
    name: str
    command: Callable[[Path], str] | None  # the shell command writing OUT; None: the floor
    ext: str = ""


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
    """Bytes of all files under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, names in os.walk(path) for f in names)


def cpu_used() -> float:
    """User + sys CPU seconds of this process and of its waited-for descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def caches_dropped() -> int:
    """How many times anyone has written to /proc/sys/vm/drop_caches since boot."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def create_cost(directory: Path, count: int = 200) -> float:
    """Microseconds to create an empty file in a new directory under ``directory``.

    puzzlefs writes one file per chunk, the peers one file in all, so this cost weighs
    on puzzlefs alone. It is not a constant: on ext4 without a journal, every create
    scans past the inodes freed in the last minutes (``recently_deleted``), so a build
    right after a mass deletion is slow. The files stay until the end: deleting them
    would slow the next run down.
    """
    probe = Path(tempfile.mkdtemp(prefix="create-", dir=directory))
    t0 = time.perf_counter()
    for i in range(count):
        os.close(os.open(probe / f"{i:064x}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / count * 1e6


def measure(step: Step, files: list[Path], out: Path) -> Result:
    """One timed run of ``step`` writing ``out``, page cache warm; made again (a few
    times at most) if someone dropped the kernel's caches meanwhile."""
    for attempt in range(3):
        run_out = out.with_name(f"{out.name}-{attempt}")
        result, dropped = _measure_once(step, files, run_out)
        if not dropped:
            break
        print(f"  caches were dropped during {step.name}: again", file=sys.stderr)
    return result


def _measure_once(step: Step, files: list[Path], out: Path) -> tuple[Result, bool]:
    read_all(files, hash_it=False)  # warm again: the kernel may have dropped pages
    create_us = create_cost(out.parent)
    os.sync()  # earlier runs' writeback is theirs
    drops, busy0, cpu0 = caches_dropped(), machine_busy(), cpu_used()
    t0 = time.perf_counter()
    if step.command is None:
        read_all(files, hash_it=True)
    else:
        subprocess.run(["bash", "-o", "pipefail", "-c", step.command(out)], check=True)
    seconds = time.perf_counter() - t0
    cpu = cpu_used() - cpu0
    others = max(0.0, machine_busy() - busy0 - cpu) / seconds
    size = tree_size(out) if step.command is not None else None
    result = Result(step.name, seconds, cpu, size, others, create_us)
    return result, caches_dropped() != drops


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    real, best, fstype = str(path.resolve()), "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mnt = fields[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


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
            "" if r.size is None else f"{r.size / 1e6:,.1f}",
            "" if r.size is None else f"{r.size / input_bytes:.1%}",
        ]
        row += ["" if c == r.name else f"{r.seconds / results[c].seconds:.2f}x" for c in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Result]) -> list[str]:
    """Issue 2's targets, as measured: text, not assertions."""

    def t(name: str) -> float | None:
        r = results.get(name)
        return r.seconds if r else None

    out = []
    for label, a, b, limit in (
        ("uncompressed build", PUZZLEFS, FLOOR, 3.0),
        ("`-c` build", PUZZLEFS_C, ZSTD, 2.0),
    ):
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
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("tree", nargs="?", help=f"the tree to build (default {DEFAULT_TREE})")
    p.add_argument("--path", dest="path_opt", help="the tree (same as the positional PATH)")
    p.add_argument("--tmp", default="/var/tmp", help="where outputs go (a disk, not tmpfs)")
    p.add_argument("--skip-slow", action="store_true", help="skip tar | gzip and mksquashfs")
    p.add_argument("--repeat", type=int, default=1, help="rounds; each step keeps its best")
    args = p.parse_args(argv)

    tree = Path(args.path_opt or args.tree or DEFAULT_TREE).resolve()
    if not tree.is_dir():
        p.error(f"{tree} is not a directory")
    tmp_root = Path(args.tmp)
    fstype = filesystem_of(tmp_root)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {tmp_root} is {fstype}: writes cost less than on a disk", file=sys.stderr)
    missing = [t for t in ("tar", "gzip", "zstd", "mksquashfs") if not shutil.which(t)]
    if missing:
        print(
            f"warning: not installed: {', '.join(missing)} "
            "(apt-get install -y squashfs-tools zstd); their rows are left out",
            file=sys.stderr,
        )

    files = list(regular_files(tree))
    input_bytes = read_all(files, hash_it=False)
    about = (
        f"{tree}: {len(files):,} files, {input_bytes / 1e6:,.1f} MB, page cache warm; "
        f"outputs on {fstype}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; "
        f"best of {args.repeat}"
    )
    print(about, file=sys.stderr)

    q = subprocess.list2cmdline
    src = q([str(tree)])
    puzzlefs = q([sys.executable, "-m", "puzzlefs", "build"])
    steps = [
        Step(FLOOR, None),
        Step(PUZZLEFS, lambda out: f"{puzzlefs} {src} {out}:bench >/dev/null", "oci"),
        Step(PUZZLEFS_C, lambda out: f"{puzzlefs} -c {src} {out}:bench >/dev/null", "oci"),
    ]
    peers = [
        Step(ZSTD, lambda out: f"tar -cf - -C {src} . | zstd -q -3 -T2 > {out}", "tar.zst"),
        Step(GZIP, lambda out: f"tar -cf - -C {src} . | gzip -6 > {out}", "tar.gz"),
        Step(
            SQUASHFS,
            lambda out: f"mksquashfs {src} {out} -comp zstd -noappend -quiet >/dev/null",
            "sqfs",
        ),
    ]
    tools = {ZSTD: "zstd", GZIP: "gzip", SQUASHFS: "mksquashfs"}
    for step in peers:
        if tools[step.name] not in missing and not (
            args.skip_slow and step.name in (GZIP, SQUASHFS)
        ):
            steps.append(step)

    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="puzzlefs-bench-", dir=tmp_root) as tmpdir:
        for round_ in range(args.repeat):
            for i, step in enumerate(steps):
                print(f"round {round_ + 1}: {step.name}", file=sys.stderr, flush=True)
                out = Path(tmpdir) / f"{round_}-{i}.{step.ext}"
                result = measure(step, files, out)
                best = results.get(step.name)
                if best is None or result.seconds < best.seconds:
                    results[step.name] = result
        print("removing the outputs", file=sys.stderr)

    print(f"\n{about.replace('; ', ', ')}\n")
    print(table(results, input_bytes))
    print()
    print("\n".join(targets(results)))
    busiest = max(r.others for r in results.values())
    if busiest > 0.25:
        print(
            f"\nOther processes and kernel threads (writeback included) kept up to "
            f"{busiest:.1f} of {os.cpu_count()} CPUs busy during the best runs: on a shared "
            "machine, times are inflated and ratios less certain."
        )
    creates = [results[n].create_us for n in (PUZZLEFS, PUZZLEFS_C) if n in results]
    if creates:
        print(
            f"\nCreating an empty file in the output directory took {min(creates):.0f} to "
            f"{max(creates):.0f} us just before the best puzzlefs runs (it writes one file "
            "per chunk; tens of us is normal, hundreds means recently deleted inodes are "
            "being scanned: see create_cost() in benchmarks/build.py)."
        )
    print("\nCommands (OUT: a new path for every run):")
    for step in steps:
        command = "in this process: hashlib.sha256 per file, 1 MiB reads"
        if step.command is not None:
            command = step.command(Path("OUT"))
        print(f"- {step.name}: `{command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
