#!/usr/bin/env python3
"""Mount benchmark (issue 12): puzzlefs mount against squashfuse_ll, kernel squashfs and
kernel erofs, in one run, interleaved, through each one's command line only.

Whatever ``puzzlefs`` is installed is measured (the console script beside this
interpreter, else the first on PATH; ``--puzzlefs CMD`` to choose). Every measurement
is taken cold unless it says warm: caches dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``), then a fresh mount, then the workload at once (so a
daemon's start-up work overlaps it, as it would a container's). Each round measures
every configuration once (A B C D, A B C D, ...); tables give medians, the spread, and
ratios to squashfuse_ll, kernel squashfs and kernel erofs (above 1 is slower, except
for MB/s, where above 1 is faster).

Tests (``--only``, comma-separated; default all):

  mount     mount command, start to return, cold; puzzlefs also on its first mount (a
            never-mounted copy of the image, its index built in an empty directory
            of its own each time)                                  synthetic trees
  find      find . | wc -l                                         synthetic trees
  stat      lstat() of every path, by benchmarks/probe.c          synthetic trees
  ls        ls -l of the 3,000-entry directory                     synthetic trees
  tar       tar -cf - . | cat >/dev/null, cold then warm           --data-tree
  seq       read every file of 1 MiB or more, 1 MiB read()s, MB/s  --data-tree
  random    4 KiB pread()s at random offsets in those files, us    --data-tree
  python    chroot MNT python3.11 -c "import json, asyncio, ...", cold then warm
  python-unchecked   the same on the tree with unchecked-hash .pyc files
  debian    chroot MNT sh -c 'dpkg -l >/dev/null; perl -MPOSIX -e 1', cold then warm
  requests  FUSE requests each workload causes, per opcode, counted in the kernel
            (tracefs; Linux 6.15+), and microseconds per request

Configurations: puzzlefs (plain; also -c and --digest where data is read),
benchmarks/fuse_floor.py (a pyfuse3 filesystem whose every reply is made before it
mounts: the binding's floor; find, stat, ls, requests), squashfuse_ll, kernel squashfs
(mksquashfs -comp zstd, loop mount), kernel erofs (mkfs.erofs -zlz4hc, loop mount).
FUSE mounts get ``-o dev,suid`` (chroot'ed programs open /dev/null). The daemon's
memory (VmRSS; RssAnon, its own part; VmHWM, the peak) is read after each workload.
A measurement during which someone else dropped the caches (/proc/vmstat counts every
drop) is taken again if it was short or warm, else kept and counted as disturbed.

Images and trees are cached in ``--workdir`` (default /var/tmp/puzzlefs-mount-bench);
puzzlefs images are built again by another puzzlefs (command or --version) or with
``--rebuild``. ``--json FILE`` keeps every number, ``--from-json FILE`` prints the
tables again.
Every mount and loop device is cleaned up on any exit, Ctrl-C included. Needs root,
/dev/fuse, gcc, and Debian's fuse3, squashfs-tools, squashfuse, erofs-utils (and
debootstrap for the Debian tree). Not a test: nothing asserts.

    sudo python3 benchmarks/mount.py --quick      # ~1 min once the images are built
    sudo python3 benchmarks/mount.py --repeat 5 --repeat-large 3 --json base.json
    sudo python3 benchmarks/mount.py --only find,stat --sizes 300k --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fusetrace  # noqa: E402
import peers  # noqa: E402
import trees  # noqa: E402
import workloads  # noqa: E402

TESTS = (
    "mount",
    "find",
    "stat",
    "ls",
    "tar",
    "seq",
    "random",
    "python",
    "python-unchecked",
    "debian",
    "requests",
)
METADATA_TESTS = ("mount", "find", "stat", "ls")
CONTAINER_TESTS = ("python", "python-unchecked", "debian")
TAR = "tar -cf - . | cat > /dev/null"  # not -f /dev/null: GNU tar would skip reading
FIND = "find . | wc -l"
LARGE_FILE = 1 << 20  # seq and random read the data tree's files of at least this size
RETRIES = 3  # measurements disturbed by someone else's drop_caches are taken again
RETAKE_UNDER = 10.0  # seconds: cold measurements longer than this are kept, marked
ENV = workloads.CHROOT_ENV  # every workload runs with this environment and nothing else
REF, KSQ, KEROFS = "squashfuse_ll", "kernel squashfs", "kernel erofs"
FIRST = "puzzlefs, first mount"
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
PACKAGES = "fuse3 squashfs-tools squashfuse erofs-utils gcc (and debootstrap)"


# -- results ---------------------------------------------------------------------------
@dataclass
class Row:
    """One configuration's measurements in one table."""

    test: str
    tree: str
    server: str
    phase: str  # cold, warm
    unit: str  # s, MB/s, us
    values: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)  # rss_mb, p99_us, ...
    errors: list[str] = field(default_factory=list)
    disturbed: int = 0  # values measured while someone else dropped the caches
    rounds: list[int] = field(default_factory=list)  # the round of each value


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)  # "test tree": lines

    def row(self, test: str, tree: str, server: str, phase: str, unit: str) -> Row:
        for r in self.rows:
            if (r.test, r.tree, r.server, r.phase) == (test, tree, server, phase):
                return r
        r = Row(test, tree, server, phase, unit)
        self.rows.append(r)
        return r

    def note(self, key: str, line: str) -> None:
        lines = self.commands.setdefault(key, [])
        if line not in lines:
            lines.append(line)


@dataclass
class Sample:
    value: float
    extra: dict[str, float] = field(default_factory=dict)
    disturbed: bool = False  # someone else dropped the caches while it ran


# -- running things --------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def drops() -> int:
    """How many times anyone has dropped the caches since boot (/proc/vmstat)."""
    text = Path("/proc/vmstat").read_text()
    return sum(int(v) for k, v in (x.split() for x in text.splitlines()) if k.startswith("drop_"))


class Disturbed(Exception):
    """Someone else dropped the caches during a measurement (tests on this machine do):
    a warm run was made cold, a cold one colder. Short ones and warm ones are taken
    again (RETRIES times at most); long cold ones, which would hardly ever escape, are
    kept and counted as disturbed in their row."""

    def __init__(self, samples: dict[str, Sample]) -> None:
        super().__init__("caches dropped by someone else")
        self.samples = samples


def run(cmd: str | list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Wall time of one workload command (its own session: Ctrl-C reaches us, and we end
    it), and its standard output. Fails with its stderr if it fails."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        cwd=cwd,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise RuntimeError(f"{shown!r} failed ({proc.returncode}): {err.strip()[:400]}")
    return elapsed, out


def probe_values(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def memory(m: peers.Mounted) -> dict[str, float]:
    mem = peers.daemon_memory(m.daemons) or {}
    return {f"{k}_mb": v / 1024 for k, v in mem.items()}


# -- the benchmark ---------------------------------------------------------------------
@dataclass
class Tree:
    label: str  # in the tables: 10k, python, usr-lib, ...
    path: Path
    images: peers.ImageSet
    entries: int = 0  # find . | wc -l should print this
    big_dir: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, results: Results) -> None:
        self.args = args
        self.work = work
        self.results = results
        self.puzzlefs = peers.puzzlefs_command(args.puzzlefs)
        self.mounts = peers.Mounts(work / "mnt", work / "images")
        self.probe = self._compile_probe()
        version = subprocess.run([*self.puzzlefs, "--version"], capture_output=True, text=True)
        self.identity = f"{' '.join(self.puzzlefs)}: {version.stdout.strip()}"
        self._trees: dict[str, Tree] = {}

    def _compile_probe(self) -> Path:
        src = Path(__file__).with_name("probe.c")
        exe = self.work / "probe"
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            peers.sh(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)])
        return exe

    # trees and images
    def tree(self, label: str) -> Tree:
        if label in self._trees:
            return self._trees[label]
        if label in CONTAINER_TESTS:
            if label == "debian":
                path = (
                    Path(self.args.debian_rootfs)
                    if self.args.debian_rootfs
                    else workloads.debian_rootfs()
                )
            else:
                path = workloads.python_tree(self.work, unchecked=label == "python-unchecked")
            key = label
            big = None
        elif label == "data":
            path = Path(self.args.data_tree).resolve()
            key = "data-" + "-".join(path.parts[1:])
            big = None
        else:
            info = trees.cached_tree(self.work, trees.parse_size(label), self.args.seed)
            path, key, big = Path(info.path), Path(info.path).name, info.big_dir
        images = peers.ImageSet(
            path, self.work / "images" / key, self.puzzlefs, self.identity, self.args.rebuild
        )
        entries = sum(1 for _ in self.paths(path, images)) + 1
        t = Tree(path.name if label == "data" else label, path, images, entries, big)
        self._trees[label] = t
        return t

    def paths(self, tree: Path, images: peers.ImageSet) -> list[str]:
        """Every path below the tree's root, walked on the source (cached)."""
        listing = images.dir / "paths.nul"
        if not listing.exists():
            images.dir.mkdir(parents=True, exist_ok=True)
            found = []
            for dirpath, dirnames, filenames in os.walk(tree):
                dirnames.sort()
                rel = os.path.relpath(dirpath, tree)
                for name in [*dirnames, *sorted(filenames)]:
                    found.append(name if rel == "." else f"{rel}/{name}")
            tmp = listing.with_suffix(".tmp")
            tmp.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in found))
            tmp.rename(listing)
        return [os.fsdecode(p) for p in listing.read_bytes().split(b"\0")[:-1]]

    def large_files(self, t: Tree) -> Path:
        """The data tree's regular files of LARGE_FILE bytes or more (``--seq-mb`` caps
        their total), as a probe list."""
        listing = self.work / f"large-{t.images.dir.name}-{self.args.seq_mb}.nul"
        if not listing.exists():
            chosen, total = [], 0
            for rel in self.paths(t.path, t.images):
                p = t.path / rel
                if p.is_file() and not p.is_symlink() and p.stat().st_size >= LARGE_FILE:
                    size = p.stat().st_size
                    if self.args.seq_mb and total + size > self.args.seq_mb * 1e6:
                        continue
                    chosen.append(rel)
                    total += size
            listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in chosen))
        return listing

    def servers(self, t: Tree, test: str) -> list[peers.Server]:
        im = t.images
        plain, digest = im.oci(compressed=False)
        out = []
        if test == "mount":
            out.append(peers.first_mount_server(FIRST, self.puzzlefs, im.pristine()))
        out.append(peers.puzzlefs_server("puzzlefs", self.puzzlefs, plain))
        if test in ("tar", "seq", "random", *CONTAINER_TESTS):
            zstd, _ = im.oci(compressed=True)
            out.append(peers.puzzlefs_server("puzzlefs -c", self.puzzlefs, zstd))
        if test == "tar":
            out.append(
                peers.puzzlefs_server("puzzlefs --digest", self.puzzlefs, plain, "--digest", digest)
            )
        if test in ("find", "stat", "ls", "requests") and not self.args.no_floor:
            out.append(peers.floor_server(t.path))
        out.append(peers.squashfuse_server(im.squashfs()))
        if test != "requests":
            out.append(peers.kernel_server(KSQ, "squashfs", im.squashfs()))
            out.append(peers.kernel_server(KEROFS, "erofs", im.erofs()))
        return out

    # the loop
    def rounds(
        self,
        test: str,
        t: Tree,
        servers: list[peers.Server],
        unit: str,
        once: Callable[[peers.Server], dict[str, Sample]],
        workload: str,
    ) -> None:
        large = t.entries >= 50_000
        repeat = self.args.repeat_large if large else self.args.repeat
        key = f"{test} {t.label}"
        self.results.note(key, f"before each: {DROP}; then a fresh mount, then the workload")
        self.results.note(key, f"workload (cwd = the mount): {workload}")
        for s in servers:
            self.results.note(key, f"{s.name}: {s.command()}")
        started, load0 = time.time(), load()
        for r in range(repeat):
            for s in servers:
                print(f"[{test} {t.label}] round {r + 1}/{repeat}: {s.name}", file=sys.stderr)
                try:
                    samples = self.undisturbed(once, s, key)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    print(f"  failed: {e}", file=sys.stderr)
                    self.results.row(test, t.label, s.name, "cold", unit).errors.append(str(e))
                    continue
                for phase, sample in samples.items():
                    row = self.results.row(test, t.label, s.name, phase, unit)
                    row.values.append(sample.value)
                    row.rounds.append(r)
                    row.disturbed += sample.disturbed
                    for k, v in sample.extra.items():
                        row.extra.setdefault(k, []).append(v)
        self.results.meta.setdefault("load", {})[key] = {
            "start": load0,
            "end": load(),
            "seconds": round(time.time() - started, 1),
        }
        print_tables(self.results, test, t.label)

    def undisturbed(
        self, once: Callable[[peers.Server], dict[str, Sample]], s: peers.Server, key: str
    ) -> dict[str, Sample]:
        for attempt in range(1, RETRIES + 1):
            try:
                return once(s)
            except Disturbed as e:
                last = e.samples
                count = self.results.meta.setdefault("retaken", {})
                count[key] = count.get(key, 0) + 1
                print(f"  caches dropped by someone else: again ({attempt})", file=sys.stderr)
        return last  # kept, marked disturbed

    def cold(
        self, server: peers.Server, work: Callable[[peers.Mounted], dict[str, Sample]]
    ) -> dict[str, Sample]:
        drop_caches()
        before = drops()
        t = time.perf_counter()
        with self.mounts.mounted(server) as m:
            samples = work(m)
        if drops() != before:
            for sample in samples.values():
                sample.disturbed = True
            if "warm" in samples or time.perf_counter() - t < RETAKE_UNDER:
                raise Disturbed(samples)
        return samples

    # tests
    def test_mount(self, t: Tree) -> None:
        servers = self.servers(t, "mount")
        # Mount the image once first, so that "puzzlefs" is not its first mount.
        with self.mounts.mounted(next(s for s in servers if s.name == "puzzlefs")):
            pass

        def once(s: peers.Server) -> dict[str, Sample]:
            return self.cold(s, lambda m: {"cold": Sample(m.seconds, memory(m))})

        self.rounds("mount", t, servers, "s", once, "(the mount command)")

    def test_find(self, t: Tree) -> None:
        counts: dict[str, set[int]] = {}

        def work(m: peers.Mounted) -> dict[str, Sample]:
            seconds, out = run(FIND, m.mnt)
            counts.setdefault(m.server.name, set()).add(int(out))
            return {"cold": Sample(seconds, memory(m))}

        self.rounds("find", t, self.servers(t, "find"), "s", lambda s: self.cold(s, work), FIND)
        wrong = {k: v for k, v in counts.items() if v != {t.entries}}
        if wrong:
            print(f"warning: find counted {wrong}, the tree has {t.entries}", file=sys.stderr)

    def test_stat(self, t: Tree) -> None:
        listing = t.images.dir / "paths.nul"
        cmd = [str(self.probe), "stat", str(listing)]

        def work(m: peers.Mounted) -> dict[str, Sample]:
            _, out = run(cmd, m.mnt)
            v = probe_values(out)
            return {"cold": Sample(v["seconds"], memory(m))}

        self.rounds(
            "stat",
            t,
            self.servers(t, "stat"),
            "s",
            lambda s: self.cold(s, work),
            f"{' '.join(cmd)}  (lstat of all {t.entries - 1} paths; the loop's time)",
        )

    def test_ls(self, t: Tree) -> None:
        cmd = f"ls -l {t.big_dir} > /dev/null"

        def work(m: peers.Mounted) -> dict[str, Sample]:
            seconds, _ = run(cmd, m.mnt)
            return {"cold": Sample(seconds, memory(m))}

        self.rounds("ls", t, self.servers(t, "ls"), "s", lambda s: self.cold(s, work), cmd)

    def test_tar(self, t: Tree) -> None:
        def work(m: peers.Mounted) -> dict[str, Sample]:
            cold, _ = run(TAR, m.mnt)
            mem = memory(m)
            warm, _ = run(TAR, m.mnt)
            return {"cold": Sample(cold, mem), "warm": Sample(warm, memory(m))}

        self.rounds(
            "tar",
            t,
            self.servers(t, "tar"),
            "s",
            lambda s: self.cold(s, work),
            f"{TAR}, then again on the same mount (warm)",
        )

    def test_seq(self, t: Tree) -> None:
        listing = self.large_files(t)
        cmd = [str(self.probe), "read", str(listing)]

        def work(m: peers.Mounted) -> dict[str, Sample]:
            _, out = run(cmd, m.mnt)
            v = probe_values(out)
            return {"cold": Sample(v["bytes"] / v["seconds"] / 1e6, memory(m))}

        n = listing.read_bytes().count(b"\0")
        self.rounds(
            "seq",
            t,
            self.servers(t, "seq"),
            "MB/s",
            lambda s: self.cold(s, work),
            f"{' '.join(cmd)}  ({n} files of 1 MiB or more, read whole in 1 MiB calls)",
        )

    def test_random(self, t: Tree) -> None:
        listing = self.large_files(t)
        cmd = [str(self.probe), "random", str(listing), str(self.args.random_reads), "1"]

        def work(m: peers.Mounted) -> dict[str, Sample]:
            _, out = run(cmd, m.mnt)
            v = probe_values(out)
            extra = {"p99_us": v["p99_us"], **memory(m)}
            return {"cold": Sample(v["mean_us"], extra)}

        self.rounds(
            "random",
            t,
            self.servers(t, "random"),
            "us",
            lambda s: self.cold(s, work),
            f"{' '.join(cmd)}  ({self.args.random_reads} preads of 4 KiB; mean, p99)",
        )

    def test_container(self, t: Tree) -> None:
        argv = workloads.DEBIAN_COMMAND if t.label == "debian" else workloads.PYTHON_COMMAND

        def work(m: peers.Mounted) -> dict[str, Sample]:
            cmd = [workloads.CHROOT, str(m.mnt), *argv]
            cold, _ = run(cmd)
            mem = memory(m)
            warm, _ = run(cmd)
            return {"cold": Sample(cold, mem), "warm": Sample(warm, memory(m))}

        shown = " ".join(a if " " not in a else repr(a) for a in argv)
        self.rounds(
            t.label,
            t,
            self.servers(t, t.label),
            "s",
            lambda s: self.cold(s, work),
            f"env -i PATH={ENV['PATH']} LC_ALL=C chroot MNT {shown}, then again (warm)",
        )

    def test_requests(self, labels: list[str]) -> None:
        why = fusetrace.available()
        if why:
            print(f"requests: skipped ({why})", file=sys.stderr)
            return
        for label in labels:
            t = self.tree(label)
            jobs: list[tuple[str, str | list[str], bool]] = []
            if label in CONTAINER_TESTS:
                argv = workloads.DEBIAN_COMMAND if label == "debian" else workloads.PYTHON_COMMAND
                jobs.append((label, [workloads.CHROOT, "MNT", *argv], False))
            else:
                jobs += [
                    ("find", FIND, True),
                    ("stat", [str(self.probe), "stat", str(t.images.dir / "paths.nul")], True),
                    ("ls", f"ls -l {t.big_dir} > /dev/null", True),
                ]
            for workload, cmd, in_mount in jobs:
                for s in self.servers(t, "requests"):
                    if s.name == "pyfuse3 floor" and label in CONTAINER_TESTS:
                        continue  # it serves no file contents
                    print(f"[requests {label}] {workload}: {s.name}", file=sys.stderr)
                    drop_caches()
                    with self.mounts.mounted(s) as m:
                        here = cmd if isinstance(cmd, str) else s.argv(m.mnt, cmd)
                        with fusetrace.RequestTrace(m.mnt) as trace:
                            seconds, _ = run(here, m.mnt if in_mount else None)
                    self.results.requests.append(
                        {
                            "tree": label,
                            "workload": workload,
                            "server": s.name,
                            "traced_seconds": seconds,
                            "total": trace.total,
                            "lost": trace.lost,
                            "ops": {
                                op: {
                                    "count": st.count,
                                    "errors": st.errors,
                                    "mean_us": round(st.mean_us, 1),
                                    "p99_us": round(st.p99_us, 1),
                                }
                                for op, st in trace.summary.items()
                            },
                        }
                    )
        print_requests(self.results)

    def run_all(self) -> None:
        only = self.args.only
        sizes = self.args.sizes
        for test in METADATA_TESTS:
            if test in only:
                for size in sizes:
                    getattr(self, f"test_{test}")(self.tree(size))
        for test in ("tar", "seq", "random"):
            if test in only:
                getattr(self, f"test_{test}")(self.tree("data"))
        for test in CONTAINER_TESTS:
            if test in only:
                self.test_container(self.tree(test))
        if "requests" in only:
            self.test_requests([*sizes, *(t for t in CONTAINER_TESTS if t in only)])
        for t in self._trees.values():
            self.results.meta.setdefault("images", {})[t.label] = {
                "tree": str(t.path),
                "entries": t.entries,
                "bytes": t.images.sizes(),
                "built with": t.images.commands,
            }


# -- tables ----------------------------------------------------------------------------
def fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "-"
    if unit == "MB/s":
        return f"{v:.0f}"
    if unit == "us":
        return f"{v:.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_round(r: Row, ref: Row) -> list[float]:
    """r's value over ref's in each round both measured: neighbours in time, so the
    machine's drift (other work on it) mostly cancels."""
    theirs = dict(zip(ref.rounds or range(len(ref.values)), ref.values, strict=True))
    mine = zip(r.rounds or range(len(r.values)), r.values, strict=True)
    return [v / theirs[i] for i, v in mine if theirs.get(i)]


def print_tables(results: Results, test: str, tree: str) -> None:
    rows = [r for r in results.rows if r.test == test and r.tree == tree]
    for phase in dict.fromkeys(r.phase for r in rows):
        group = [r for r in rows if r.phase == phase]
        unit = group[0].unit
        meds = {r.server: median(r.values) for r in group}
        extras = list(dict.fromkeys(k for r in group for k in r.extra))
        n = max(len(r.values) for r in group)
        what = test if test == tree else f"{test}, {tree}"
        print(
            f"\n{what}, {phase} ({unit}, median of {n}; per round: the median and range of "
            "the ratio within each round):\n"
        )
        head = ["configuration", unit, "min-max"]
        peers_ = [p for p in (REF, KSQ, KEROFS) if not math.isnan(meds.get(p, float("nan")))]
        head += [f"vs {p}" for p in peers_]
        ref = next((r for r in group if r.server == REF), None)
        if ref is not None:
            head.append(f"per round vs {REF}")
        head += extras
        print("| " + " | ".join(head) + " |")
        print("|---|" + "---:|" * (len(head) - 1))
        for r in group:
            m = meds[r.server]
            spread = f"{fmt(min(r.values), unit)}-{fmt(max(r.values), unit)}" if r.values else ""
            cells = [r.server, fmt(m, unit), spread]
            cells += [f"{m / meds[p]:.2f}x" for p in peers_]
            if ref is not None:
                ratios = per_round(r, ref)
                cells.append(
                    f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""
                )
            for k in extras:
                v = median(r.extra.get(k, []))
                cells.append("" if math.isnan(v) else f"{v:.1f}")
            if r.errors:
                cells[0] += f" ({len(r.errors)} failed)"
            if r.disturbed:
                cells[0] += f" ({r.disturbed} disturbed)"
            print("| " + " | ".join(cells) + " |")
    for line in results.commands.get(f"{test} {tree}", []):
        print(f"    {line}")
    sys.stdout.flush()


def print_requests(results: Results) -> None:
    if not results.requests:
        return
    timed = {
        (r.tree, r.test, r.server): median(r.values)
        for r in results.rows
        if r.phase == "cold" and r.unit == "s"
    }
    print(
        "\nFUSE requests per workload (cold, fresh mount, counted by the kernel's fuse "
        "tracepoints); us/request = the timed median / requests; service = mean time "
        "from the kernel queueing a request to its reply (by opcode: count, failures, "
        "mean service time):\n"
    )
    print("| tree | workload | configuration | requests | us/request | service us | by opcode |")
    print("|---|---|---|---:|---:|---:|---|")
    for q in results.requests:
        ops: dict[str, dict[str, float]] = q["ops"]
        total = int(q["total"])
        seconds = timed.get((q["tree"], q["workload"], q["server"]), float("nan"))
        per = seconds / total * 1e6 if total else float("nan")
        service = sum(o["mean_us"] * o["count"] for o in ops.values()) / total if total else 0
        by = ", ".join(
            f"{op.removeprefix('FUSE_')} {int(o['count'])}"
            + (f" ({int(o['errors'])} failed)" if o["errors"] else "")
            + f" {o['mean_us']:.0f}us"
            for op, o in ops.items()
        )
        lost = f" (lost {q['lost']})" if q["lost"] else ""
        print(
            f"| {q['tree']} | {q['workload']} | {q['server']} | {total}{lost} | "
            f"{fmt(per, 'us')} | {service:.1f} | {by} |"
        )
    sys.stdout.flush()


def print_all(results: Results) -> None:
    for test, tree in dict.fromkeys((r.test, r.tree) for r in results.rows):
        print_tables(results, test, tree)
    print_requests(results)
    images = results.meta.get("images", {})
    if images:
        print("\nimages:")
        for label, info in images.items():
            sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["bytes"].items())
            print(f"  {label}: {info['tree']}, {info['entries']} entries; {sizes}")
            for cmd in info["built with"]:
                print(f"    {cmd}")


# -- main ------------------------------------------------------------------------------
def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup runs for them too."""
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=",".join(TESTS), help="tests, comma-separated")
    ap.add_argument("--sizes", default="10k,100k,300k", help="synthetic tree sizes")
    ap.add_argument("--repeat", type=int, default=5, help="rounds for trees under 50k entries")
    ap.add_argument("--repeat-large", type=int, default=3, help="rounds for larger trees")
    ap.add_argument("--quick", action="store_true", help="10k only, one round, less data")
    ap.add_argument("--workdir", default="/var/tmp/puzzlefs-mount-bench")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--from-json", help="print the tables of an earlier --json and exit")
    ap.add_argument(
        "--puzzlefs", help="the puzzlefs command, e.g. 'python3 -m puzzlefs' (default: installed)"
    )
    ap.add_argument(
        "--rebuild", action="store_true", help="build the puzzlefs images again (new build code)"
    )
    ap.add_argument("--data-tree", default="/usr/lib/x86_64-linux-gnu")
    ap.add_argument("--debian-rootfs", help="a minbase tree (default: make_dataset.sh's)")
    ap.add_argument("--seed", type=int, default=1, help="of the synthetic trees")
    ap.add_argument("--seq-mb", type=int, default=0, help="cap on seq/random data (0: all)")
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--no-floor", action="store_true", help="leave out fuse_floor.py")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeat, args.repeat_large = "10k", 1, 1
        args.seq_mb, args.random_reads = args.seq_mb or 150, 500
    args.only = [t for t in args.only.split(",") if t]
    bad = set(args.only) - set(TESTS)
    if bad:
        ap.error(f"unknown tests {sorted(bad)}; choose from {', '.join(TESTS)}")
    args.sizes = [s for s in args.sizes.split(",") if s]
    for s in args.sizes:
        try:
            trees.parse_size(s)
        except ValueError as e:
            ap.error(str(e))
    return args


def main() -> int:
    args = parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        results = Results(
            meta=data["meta"],
            rows=[Row(**r) for r in data["rows"]],
            requests=data["requests"],
            commands=data["commands"],
        )
        print_all(results)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches, loop mounts, chroot)")
    for tool in ("mksquashfs", "squashfuse_ll", "mkfs.erofs", "fusermount3", "gcc", "losetup"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: apt-get install {PACKAGES})")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results()
    results.meta.update(
        date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        host=platform.node(),
        kernel=platform.release(),
        cpus=os.cpu_count(),
        argv=sys.argv[1:],
    )
    bench = None
    try:
        with interruptible(), fusetrace.tracefs_mounted():
            bench = Bench(args, work, results)
            results.meta["puzzlefs"] = " ".join(bench.puzzlefs)
            bench.run_all()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.mounts.close()
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "meta": results.meta,
                        "rows": [asdict(r) for r in results.rows],
                        "requests": results.requests,
                        "commands": results.commands,
                    },
                    indent=1,
                )
                + "\n"
            )
    print("\n\n# all tables\n")
    print_all(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
