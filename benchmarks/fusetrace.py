"""Count the FUSE requests a workload causes, for any FUSE filesystem, in the kernel.

Linux 6.15 and later have two tracepoints, ``fuse:fuse_request_send`` (the kernel
queues a request for the daemon) and ``fuse:fuse_request_end`` (the reply arrived).
:class:`RequestTrace` records both for one mount only (filtered on its connection, the
mount's device number) in a private tracefs instance, so nothing else on the machine is
traced or disturbed, and summarises them per opcode: how many, how many failed, and the
mean and p99 time from queueing to reply (the daemon's service time plus its queueing,
as the kernel sees it). Tracing costs about a microsecond per event, so traced runs are
for counting, not for the timing tables.

    with RequestTrace(mountpoint) as trace:
        run_workload()
    print(trace.summary)   # {"FUSE_LOOKUP": OpStats(...), ...}
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["OpStats", "RequestTrace", "available"]

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("fuse/fuse_request_send", "fuse/fuse_request_end")
BUFFER_KB = 65536  # per CPU: about 1.4M events each, a 300k-entry stat storm twice over
_SEND = re.compile(
    rb"\s(\d+\.\d+): fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\)"
)
_END = re.compile(
    rb"\s(\d+\.\d+): fuse_request_end: connection (\d+) req (\d+) len \d+ error (-?\d+)"
)
_WRITTEN = re.compile(rb"entries-in-buffer/entries-written: (\d+)/(\d+)")


@dataclass
class OpStats:
    count: int = 0
    errors: int = 0
    latencies_us: list[float] = field(default_factory=list, repr=False)

    @property
    def mean_us(self) -> float:
        return statistics.fmean(self.latencies_us) if self.latencies_us else float("nan")

    @property
    def p99_us(self) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _mounted_tracefs() -> bool:
    return (TRACEFS / "events").is_dir()


def available() -> str | None:
    """None if requests can be traced here, else why not."""
    if os.geteuid() != 0:
        return "tracing needs root"
    if not _mounted_tracefs():
        return f"tracefs is not mounted at {TRACEFS}"
    if not all((TRACEFS / "events" / e).is_dir() for e in EVENTS):
        return "this kernel has no fuse tracepoints (Linux 6.15 or later has them)"
    return None


@contextlib.contextmanager
def tracefs_mounted() -> Iterator[None]:
    """Mount tracefs for the duration if it is not mounted (and unmount it after)."""
    mounted_here = False
    if not _mounted_tracefs() and os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, check=False
        )
        mounted_here = done.returncode == 0
    try:
        yield
    finally:
        if mounted_here:
            subprocess.run(["umount", str(TRACEFS)], capture_output=True, check=False)


class RequestTrace:
    """Trace one FUSE mount's requests while the ``with`` block runs."""

    def __init__(self, mountpoint: str | os.PathLike[str], name: str = "puzzlefs-bench") -> None:
        st = os.stat(mountpoint)
        # The tracepoint prints the kernel's dev_t: major << 20 | minor.
        self.connection = os.major(st.st_dev) << 20 | os.minor(st.st_dev)
        self.dir = TRACEFS / "instances" / f"{name}-{os.getpid()}"
        self.summary: dict[str, OpStats] = {}
        self.lost = 0

    def __enter__(self) -> RequestTrace:
        why = available()
        if why:
            raise RuntimeError(why)
        self.dir.mkdir()
        try:
            (self.dir / "tracing_on").write_text("0\n")
            (self.dir / "buffer_size_kb").write_text(f"{BUFFER_KB}\n")
            for event in EVENTS:
                (self.dir / "events" / event / "filter").write_text(
                    f"connection == {self.connection}\n"
                )
                (self.dir / "events" / event / "enable").write_text("1\n")
            (self.dir / "trace").write_text("")
            (self.dir / "tracing_on").write_text("1\n")
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            (self.dir / "tracing_on").write_text("0\n")
            if kind is None:
                self._parse((self.dir / "trace").read_bytes())
        finally:
            self._remove()

    def _remove(self) -> None:
        # Disable first: an instance with enabled events cannot be removed.
        for event in EVENTS:
            with contextlib.suppress(OSError):
                (self.dir / "events" / event / "enable").write_text("0\n")
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def _parse(self, text: bytes) -> None:
        sent: dict[int, tuple[float, str]] = {}
        summary: dict[str, OpStats] = {}
        m = _WRITTEN.search(text[:4096])
        if m:
            self.lost = int(m.group(2)) - int(m.group(1))
        for line in text.splitlines():
            if line.startswith(b"#"):
                continue
            s = _SEND.search(line)
            if s:
                op = s.group(4).decode()
                sent[int(s.group(3))] = (float(s.group(1)), op)
                summary.setdefault(op, OpStats()).count += 1
                continue
            e = _END.search(line)
            if e and int(e.group(3)) in sent:
                t0, op = sent.pop(int(e.group(3)))
                stats = summary[op]
                stats.latencies_us.append((float(e.group(1)) - t0) * 1e6)
                if int(e.group(4)) != 0:
                    stats.errors += 1
        self.summary = dict(sorted(summary.items(), key=lambda kv: -kv[1].count))

    @property
    def total(self) -> int:
        return sum(s.count for s in self.summary.values())
