"""The mount part of a case: ``puzzlefs mount`` (the CLI, in a subprocess whose memory
is capped like the worker's), a walk that stats, lists and reads everything (bounded),
``puzzlefs umount``; and the forceful cleanup a hung or crashed mount needs.

Kept small on purpose: the mount implementation is being replaced, and this must keep
working over any implementation of the same CLI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from . import runner

# What a reader may get from a mount of a broken image: the bad entry fails.
CLEAN_ERRNOS = {
    errno.EIO,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.EINVAL,
    errno.ENODATA,
    errno.EOPNOTSUPP,
    errno.E2BIG,
    errno.ERANGE,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EFBIG,
    errno.EOVERFLOW,
    errno.ENXIO,
}
DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}  # the daemon is gone
MAX_ENTRIES = 3000
MAX_FILE_READ = 1 << 20
MAX_TOTAL_READ = 8 << 20


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "puzzlefs", *args]


MARKER = "PUZZLEFS_FUZZ_CASE"  # in the environment of everything a case's mount starts


def _env(case: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    src = f"{runner.SRC}:{path}" if path else runner.SRC
    return dict(os.environ, PYTHONPATH=src, **{MARKER: os.path.realpath(case)})


def marked_processes(case: Path) -> list[int]:
    """Processes started for this case's mount (the daemon, its helpers), found by the
    marker in their environment, which they inherit."""
    marker = f"{MARKER}={os.path.realpath(case)}".encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            pids.append(int(pid))
    return pids


def mount_and_read(ref: str, case: Path, result: runner.Result, digest: str | None) -> None:
    mnt = case / "mnt"
    mnt.mkdir()
    log = case / "mount.log"
    argv = ["mount", "--log-file", str(log), ref, str(mnt)]
    if digest:
        argv += ["--digest", digest]
    try:
        proc = subprocess.run(
            _cli(*argv), capture_output=True, text=True, timeout=30, env=_env(case), check=False
        )
    except subprocess.TimeoutExpired:
        result.add("mount", runner.HANG, "puzzlefs mount did not return within 30s")
        _note(result, runner.HANG)
        force_unmount_under(case)
        return
    outcome, message = runner.classify("mount", proc.returncode, proc.stdout, proc.stderr, None)
    if proc.returncode < 0:
        outcome, message = runner.CRASH, f"puzzlefs mount killed by signal {-proc.returncode}"
    result.add("mount", outcome, message)
    if outcome != runner.ACCEPTED:
        _note(result, outcome)
        force_unmount_under(case)
        return
    worst = _walk(mnt, result)
    proc = subprocess.run(
        _cli("umount", str(mnt)), capture_output=True, text=True, timeout=30, env=_env(case)
    )
    if proc.returncode != 0:
        got, message = runner.classify("umount", proc.returncode, proc.stdout, proc.stderr, None)
        if worst == runner.CRASH and got == runner.CLEAN:
            got = runner.ACCEPTED  # a dead daemon's mount: already counted as a crash
        result.add("umount", runner.INTERNAL if got == runner.CLEAN else got, message)
        force_unmount_under(case)
    deadline = time.monotonic() + 5
    while (left := marked_processes(case)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        cmdlines = []
        for pid in left:
            with contextlib.suppress(OSError):
                cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes()[:80])
        result.add("processes", runner.LEFTOVER, f"left running after umount: {cmdlines}")
        worst = runner.LEFTOVER
        force_unmount_under(case)
    logged = log.read_text(errors="replace") if log.exists() else ""
    if "Traceback" in logged or "unexpectedly" in logged:
        lines = [ln for ln in logged.splitlines() if "unexpectedly" in ln or "Error" in ln]
        result.add("daemon", runner.INTERNAL, "daemon log: " + " / ".join(lines[:3]))
        worst = runner.INTERNAL
    _note(
        result, worst if result.runs.get("umount") in (None, runner.ACCEPTED) else runner.INTERNAL
    )


def _note(result: runner.Result, outcome: str) -> None:
    result.runs["mount-worst"] = outcome


def _walk(mnt: Path, result: runner.Result) -> str:
    """Everything a reader does, bounded; the worst outcome it met."""
    worst = runner.ACCEPTED
    budget = [MAX_TOTAL_READ]
    count = 0
    stack = [os.fsencode(mnt)]
    errors: dict[str, int] = {}

    def failed(what: str, e: OSError) -> bool:
        nonlocal worst
        if e.errno in DEAD_ERRNOS:
            result.add("reads", runner.CRASH, f"{what}: {e.strerror} (the daemon died)")
            worst = runner.CRASH
            return True
        if e.errno not in CLEAN_ERRNOS:
            result.add(
                "reads", runner.INTERNAL, f"{what}: unexpected {errno.errorcode.get(e.errno or 0)}"
            )
            worst = runner.INTERNAL
        name = errno.errorcode.get(e.errno or 0, "?")
        errors[name] = errors.get(name, 0) + 1
        return False

    while stack and count < MAX_ENTRIES:
        d = stack.pop()
        try:
            names = os.listdir(d)
        except OSError as e:
            if failed("listdir", e):
                return worst
            continue
        for name in names:
            count += 1
            path = os.path.join(d, name)
            try:
                st = os.lstat(path)
                for key in os.listxattr(path, follow_symlinks=False):
                    os.getxattr(path, key, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
                elif stat.S_ISLNK(st.st_mode):
                    os.readlink(path)
                elif stat.S_ISREG(st.st_mode) and budget[0] > 0:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        want = min(MAX_FILE_READ, budget[0])
                        while want > 0 and (data := os.read(fd, min(want, 128 << 10))):
                            want -= len(data)
                            budget[0] -= len(data)
                    finally:
                        os.close(fd)
            except OSError as e:
                if failed("stat/read", e):
                    return worst
    if errors:
        result.messages["reads"] = f"errnos met: {errors}"
    result.runs["reads"] = worst
    return worst


# -- cleanup ----------------------------------------------------------------------------


def _mounts_under(case: Path) -> list[tuple[str, str]]:
    """(mount point, device major:minor) of every mount inside ``case``."""
    prefix = os.path.realpath(case) + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                out.append((point, fields[2]))
    return out


def force_unmount_under(case: Path) -> None:
    """Abort and lazily unmount every mount left under ``case``, and kill the daemons
    this run started for it (found by the case's path on their command line)."""
    mounts = _mounts_under(case)
    for point, dev in mounts:
        minor = dev.split(":")[1]
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for pid in marked_processes(case):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if mounts:
        time.sleep(0.05)
