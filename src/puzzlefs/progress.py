"""Progress on a terminal, silence elsewhere: long commands show what they are doing
when a person is watching (stderr is a TTY) and print nothing into pipes and logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.counts: dict[str, int] = {}
        self._last = 0.0
        self._start = time.monotonic()
        self._shown = False

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.2:
                self._last = now
                self._show()

    def _show(self) -> None:
        parts = []
        for key, value in self.counts.items():
            if key == "bytes":
                parts.append(f"{value / 1e6:,.1f} MB")
            else:
                parts.append(f"{value:,} {key}")
        elapsed = time.monotonic() - self._start
        self.stream.write(f"\r\x1b[K{self.label}: {', '.join(parts)} ({elapsed:.1f}s)")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self.enabled and self._shown:
            self._show()
            self.stream.write("\n")
            self.stream.flush()
