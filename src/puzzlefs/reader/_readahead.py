"""Readahead of chunk blobs for sequential readers (the FUSE mount turns it on).

On a cold cache, loading a chunk blob is mostly waiting for the disk, and loading one
blob at a time leaves the disk idle between requests. Chunks are stored in stream order
(FORMAT.md §3: the manifest lists them so), which is also the order of the files in the
tree, so a reader that walks the tree asks for blobs in about that order. When a blob
asked for follows the previous one in the stream, the next ones are announced to the
kernel (``POSIX_FADV_WILLNEED``), which reads them in the background, in parallel; the
window doubles on each sequential step, as the kernel's own page readahead does, and a
random access gets none.

The announcing (open, fadvise, close per blob, which can block on a cold disk) is done
by a small helper process fed blob paths through a pipe. Measured on a mount, that
beats doing it in the serving thread (which then waits for the disk) and in a thread of
the same process (every hint is three trips through the GIL, which the serving thread,
hashing, then keeps waiting for: a third more CPU under ``--digest``). The pipe is
non-blocking: a helper that falls behind loses hints, never stalls a reader.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

MAX_WINDOW = 64  # blobs ahead (64 KiB on average each)

_HELPER = """
import os, sys
for line in sys.stdin.buffer:
    try:
        # Never follow a symlink, nor wait on a FIFO, where a blob should be: a store
        # can hold anything, and a helper stuck in open() would outlive the mount.
        fd = os.open(line[:-1], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        continue
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    os.close(fd)
"""


class Readahead:
    def __init__(
        self,
        path: Callable[[bytes], str | None],
        stream: Iterable[bytes],
        *,
        max_window: int = MAX_WINDOW,
    ) -> None:
        self._path = path
        self._stream: list[bytes] = []
        self._index: dict[bytes, int] = {}
        for digest in stream:  # the reference may list a chunk twice: keep the first
            if digest not in self._index:
                self._index[digest] = len(self._stream)
                self._stream.append(digest)
        self._max_window = max_window
        self._lock = threading.Lock()
        self._last = -(1 << 62)  # stream position of the last blob loaded
        self._window = 0
        self._hinted = -1  # blobs up to here were announced
        self._enabled = False
        self._helper: Any = None  # a subprocess.Popen, started lazily
        self._pipe: int | None = None  # its stdin

    def enable(self) -> None:
        self._enabled = True

    def loading(self, digest: bytes) -> None:
        """A blob is about to be loaded (it was not cached): maybe announce the next."""
        if not self._enabled:
            return
        pos = self._index.get(digest)
        if pos is None:
            return
        with self._lock:
            if 0 < pos - self._last <= max(self._window, 2):
                self._window = min(max(2 * self._window, 4), self._max_window)
            else:
                self._window = 0
                self._hinted = pos
            self._last = pos
            start = max(self._hinted + 1, pos + 1)
            stop = min(pos + 1 + self._window, len(self._stream))
            if start >= stop:
                return
            self._hinted = stop - 1
            paths = [self._path(d) for d in self._stream[start:stop]]
            self._send(b"".join(os.fsencode(p) + b"\n" for p in paths if p is not None))

    def _send(self, lines: bytes) -> None:
        if not lines:
            return
        if self._helper is None:
            import subprocess  # the first time a sequential reader needs it

            try:
                self._helper = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _HELPER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    close_fds=True,  # above all, never hold a FUSE device open
                )
            except OSError:
                self._enabled = False
                return
            assert self._helper.stdin is not None
            self._pipe = self._helper.stdin.fileno()
            os.set_blocking(self._pipe, False)
        assert self._pipe is not None
        # Pieces of whole lines, each small enough to be written atomically.
        while lines:
            cut = lines.rfind(b"\n", 0, select.PIPE_BUF) + 1 or len(lines)
            try:
                os.write(self._pipe, lines[:cut])
            except BlockingIOError:
                return  # the helper is behind: these hints are dropped
            except OSError:  # the helper is gone: no more readahead
                self._enabled = False
                return
            lines = lines[cut:]
