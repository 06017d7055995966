"""Helpers for the FUSE tests: the CLI in a subprocess (with a timeout, so nothing
hangs), builds, and the checks that a mountpoint was left clean."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 60
TAG = "t"


def cli(
    *args: str | os.PathLike[str], timeout: float = TIMEOUT, **kw: object
) -> subprocess.CompletedProcess[str]:
    """``puzzlefs ARGS``, never hanging: a timeout fails the test."""
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "puzzlefs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def build(rootfs: Path, oci: Path, tag: str = TAG, *flags: str) -> str:
    """Build with the CLI; returns the manifest digest it printed."""
    done = cli("build", *flags, rootfs, f"{oci}:{tag}")
    assert done.returncode == 0, done.stderr
    line = [x for x in done.stdout.splitlines() if "manifest digest" in x][-1]
    return line.rsplit(" ", 1)[1]


def mount_entry(path: Path) -> tuple[str, str] | None:
    """``(fstype, source)`` of the mount at ``path``, or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4].replace("\\040", " ") == target:
                found = (fields[sep + 1], fields[sep + 2])
    return found


def daemon_pids(mountpoint: Path) -> list[int]:
    """Processes whose command line is a ``mount`` of ``mountpoint``."""
    needle = os.fsencode(os.path.realpath(mountpoint))
    rel = os.fsencode(str(mountpoint))
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and (needle in argv or rel in argv):
            pids.append(int(pid))
    return pids


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def assert_clean(mountpoint: Path) -> None:
    """Nothing mounted, no daemon left, and the directory usable (no dead FUSE mount)."""
    assert mount_entry(mountpoint) is None, f"{mountpoint} is still mounted"
    assert wait_until(lambda: not daemon_pids(mountpoint)), "the daemon is still running"
    os.listdir(mountpoint)  # ENOTCONN here would be a stale mount


def force_clean(mountpoint: Path) -> None:
    """Teardown: whatever the test did, leave no mount and no daemon behind."""
    if mount_entry(mountpoint) is not None:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
    if not wait_until(lambda: not daemon_pids(mountpoint), timeout=5):
        for pid in daemon_pids(mountpoint):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Mounted:
    path: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


MountFn = Callable[..., "contextlib.AbstractContextManager[Mounted]"]


@dataclass
class DataTree:
    root: Path
    files: dict[str, bytes]
