"""Progress on a terminal, silence elsewhere: long commands show what they are doing
when a person is watching (stderr is a TTY) and print nothing into pipes and logs.

Counters are shown as they grow; where the work's total is known (:meth:`expect`),
the line also gives the share done and the time left, estimated from the rate so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_INTERVAL = 0.2  # seconds between redraws


def _amount(key: str, value: float) -> str:
    if key == "bytes":
        return f"{value / 1e6:,.1f} MB"
    return f"{value:,.0f} {key}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.0f} s"


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self._last = 0.0
        self._start = time.monotonic()
        self._shown = False

    def expect(self, key: str, total: int) -> None:
        """The whole of ``key`` the work will count: shown as a share, with time left."""
        self.totals[key] = total

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= _INTERVAL:
                self._last = now
                self._show()

    def line(self) -> str:
        """What the progress line says now."""
        elapsed = time.monotonic() - self._start
        parts = []
        share: float | None = None
        for key, value in self.counts.items():
            total = self.totals.get(key)
            if total:
                parts.append(f"{_amount(key, value)} of {_amount(key, total)}")
                done = min(value / total, 1.0)
                share = done if share is None else min(share, done)
            else:
                parts.append(_amount(key, value))
        text = f"{self.label}: {', '.join(parts)}"
        if share is not None:
            text = f"{self.label}: {share:4.0%} {', '.join(parts)}"
            if 0 < share < 1 and elapsed > 1:
                text += f", about {_duration(elapsed * (1 - share) / share)} left"
        return text + f" ({_duration(elapsed)})"

    def _show(self) -> None:
        self.stream.write(f"\r\x1b[K{self.line()}")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self.enabled and self._shown:
            self._show()
            self.stream.write("\n")
            self.stream.flush()
