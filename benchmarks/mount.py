#!/usr/bin/env python3
"""Cold reads through a puzzlefs FUSE mount (issues 3 and 4), against squashfs peers.

One large tree (default /usr/lib/x86_64-linux-gnu) is built as a puzzlefs image,
plain and with -c, and as a zstd squashfs. In the same run, with the kernel's caches
dropped before each measurement (`echo 3 > /proc/sys/vm/drop_caches`) and a fresh
mount each time (no daemon cache carried over), it times

    tar -cf - . | cat > /dev/null     (not -f /dev/null: GNU tar would skip reading)
    find . | wc -l

over: puzzlefs plain, puzzlefs -c, puzzlefs plain with --digest (user-space fs-verity
checks of every chunk), squashfuse_ll, and the kernel's squashfs (loop mount); and
find alone over benchmarks/fuse_floor.py, a pyfuse3 filesystem whose replies are all
made in advance: the floor of the binding puzzlefs mounts with. Each
configuration is measured --repeat times, round-robin, and the median is reported with
the ratios to squashfuse_ll and to the kernel. Then the re-read of the same tree through
the same mount (page cache warm) for plain and --digest. Not a test: nothing asserts.

Needs root, /dev/fuse, and Debian's fuse3, squashfs-tools and squashfuse.

    sudo python3 benchmarks/mount.py [TREE] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TAR = "tar -cf - . | cat > /dev/null"
FIND = "find . | wc -l"
TAG = "bench"
PACKAGES = "fuse3 squashfs-tools squashfuse"


@dataclass
class Config:
    name: str
    mount: Callable[[Path], None]
    unmount: Callable[[Path], None]
    times: dict[str, list[float]] = field(default_factory=dict)
    commands: tuple[str, ...] = ("tar", "find")


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: str, cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{cmd!r} failed in {cwd}: {done.stderr.strip()[:500]}")
    return elapsed, done.stdout.strip()


def puzzlefs_mount(image: str, *extra: str) -> Callable[[Path], None]:
    def mount(mnt: Path) -> None:
        sh(["puzzlefs", "mount", *extra, image, str(mnt)])

    return mount


def puzzlefs_umount(mnt: Path) -> None:
    sh(["puzzlefs", "umount", str(mnt)])
    wait_daemon_gone(mnt)


def wait_daemon_gone(mnt: Path, timeout: float = 10.0) -> None:
    """The daemon exits right after the unmount; wait so runs do not overlap."""
    needle = str(mnt).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"mount" in cmdline and needle in cmdline and int(pid) != os.getpid():
                busy = True
        if not busy:
            return
        time.sleep(0.05)


class FuseFloor:
    """benchmarks/fuse_floor.py: a pyfuse3 filesystem with every reply made in advance,
    so what ``find`` costs through it is the binding's and the kernel's share alone."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, mnt: Path) -> None:
        script = Path(__file__).with_name("fuse_floor.py")
        self.proc = subprocess.Popen([sys.executable, str(script), self.image, str(mnt)])
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fuse_floor.py did not mount {mnt}")
            time.sleep(0.02)

    def unmount(self, mnt: Path) -> None:
        sh(["fusermount3", "-u", str(mnt)])
        if self.proc is not None:
            self.proc.wait(timeout=30)


@contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
    else:
        with tempfile.TemporaryDirectory(prefix="puzzlefs-mount-bench-") as d:
            yield Path(d)


def build_all(tree: Path, work: Path) -> dict[str, str]:
    """Images, reused if the work directory already has them. Returns the digests."""
    digests: dict[str, str] = {}
    for name, flags in (("plain", []), ("zstd", ["-c"])):
        oci = work / f"oci-{name}"
        stamp = work / f"oci-{name}.digest"
        if not stamp.exists():
            shutil.rmtree(oci, ignore_errors=True)
            t = time.perf_counter()
            out = sh(["puzzlefs", "build", *flags, str(tree), f"{oci}:{TAG}"]).stdout
            m = re.search(r"manifest digest: ([0-9a-f]{64})", out)
            if not m:
                raise SystemExit(f"puzzlefs build printed no digest: {out!r}")
            stamp.write_text(m.group(1))
            print(f"built {oci.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        digests[name] = stamp.read_text().strip()
    sqfs = work / "tree.sqfs"
    if not sqfs.exists():
        t = time.perf_counter()
        sh(["mksquashfs", str(tree), str(sqfs) + ".tmp", "-comp", "zstd", "-noappend", "-quiet"])
        os.rename(str(sqfs) + ".tmp", sqfs)
        print(f"built {sqfs.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return digests


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report(
    tree: Path,
    work: Path,
    configs: list[Config],
    entries: str,
    rereads: dict[str, list[float]],
    repeat: int,
) -> None:
    med = {c.name: {k: statistics.median(v) for k, v in c.times.items()} for c in configs}
    ref, kern = med["squashfuse_ll"], med["kernel squashfs"]
    sqfs = (work / "tree.sqfs").stat().st_size
    sizes = {
        "puzzlefs": du(work / "oci-plain"),
        "puzzlefs -c": du(work / "oci-zstd"),
        "puzzlefs --digest": du(work / "oci-plain"),
        "squashfuse_ll": sqfs,
        "kernel squashfs": sqfs,
    }
    inodes = {}
    for f in tree.rglob("*"):
        st = f.lstat()
        if stat.S_ISREG(st.st_mode):
            inodes[st.st_ino] = st.st_size
    tree_mb = sum(inodes.values()) / 1e6
    print(
        f"\n{tree} ({tree_mb:.0f} MB in files, {entries} entries), median of {repeat}, "
        "caches dropped before each, fresh mount each:\n"
    )
    print(
        "| mount | stored MB | tar s | vs squashfuse_ll | vs kernel "
        "| find s | vs squashfuse_ll | vs kernel |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        m = med[c.name]
        cells = [c.name, f"{sizes[c.name] / 1e6:.0f}" if c.name in sizes else ""]
        for what, digits in (("tar", 2), ("find", 3)):
            if what in m:
                cells += [
                    f"{m[what]:.{digits}f}",
                    f"{m[what] / ref[what]:.2f}x",
                    f"{m[what] / kern[what]:.2f}x",
                ]
            else:
                cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")
    plain, dig = med["puzzlefs"], med["puzzlefs --digest"]
    reread_dig = statistics.median(rereads["puzzlefs --digest"])
    reread_plain = statistics.median(rereads["puzzlefs"])
    print(
        f"\n--digest vs plain: first tar {dig['tar'] / plain['tar']:.2f}x; re-read through "
        f"the same mount (page cache warm) {reread_dig:.2f} s vs {reread_plain:.2f} s; "
        f"find {dig['find'] / plain['find']:.2f}x"
    )
    print("\nall times (s):", file=sys.stderr)
    for c in configs:
        runs = ", ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in c.times.items())
        print(f"  {c.name}: {runs}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("tree", nargs="?", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per configuration")
    ap.add_argument("--workdir", help="keep images here (reused by the next run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches, loop mounts)")
    for tool in ("puzzlefs", "mksquashfs", "squashfuse_ll", "fusermount3", "tar"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: apt-get install {PACKAGES})")

    tree = Path(args.tree).resolve()
    with workdir(args.workdir) as work:
        digests = build_all(tree, work)
        sqfs = work / "tree.sqfs"
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        configs = [
            Config("puzzlefs", puzzlefs_mount(f"{work / 'oci-plain'}:{TAG}"), puzzlefs_umount),
            Config("puzzlefs -c", puzzlefs_mount(f"{work / 'oci-zstd'}:{TAG}"), puzzlefs_umount),
            Config(
                "puzzlefs --digest",
                puzzlefs_mount(f"{work / 'oci-plain'}:{TAG}", "--digest", digests["plain"]),
                puzzlefs_umount,
            ),
            Config(
                "pyfuse3 floor (find only)",
                (floor := FuseFloor(f"{work / 'oci-plain'}:{TAG}")).mount,
                floor.unmount,
                commands=("find",),
            ),
            Config(
                "squashfuse_ll",
                lambda m: sh(["squashfuse_ll", str(sqfs), str(m)]) and None,
                lambda m: sh(["fusermount3", "-u", str(m)]) and None,
            ),
            Config(
                "kernel squashfs",
                lambda m: (
                    sh(["mount", "-t", "squashfs", "-o", "loop,ro", str(sqfs), str(m)]) and None
                ),
                lambda m: sh(["umount", "-d", str(m)]) and None,
            ),
        ]
        counts: dict[str, set[str]] = {}
        rereads: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for c in configs:
                for what, cmd in (("tar", TAR), ("find", FIND)):
                    if what not in c.commands:
                        continue
                    c.mount(mnt)
                    try:
                        drop_caches()
                        seconds, out = timed(cmd, mnt)
                        c.times.setdefault(what, []).append(seconds)
                        if what == "find":
                            counts.setdefault(c.name, set()).add(out)
                        elif c.name in ("puzzlefs", "puzzlefs --digest"):
                            again, _ = timed(cmd, mnt)  # page cache warm now
                            rereads.setdefault(c.name, []).append(again)
                    finally:
                        c.unmount(mnt)

        if len({v for s in counts.values() for v in s}) != 1:
            print(f"warning: find counts differ: {counts}", file=sys.stderr)
        report(tree, work, configs, counts["puzzlefs"].pop(), rereads, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
