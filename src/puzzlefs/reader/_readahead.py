"""Readahead of chunk blobs for sequential readers (the FUSE mount turns it on).

On a cold cache, loading a chunk blob is mostly waiting for the disk, and loading one
blob at a time leaves the disk idle between requests. Chunks are stored in stream order
(FORMAT.md §3: the manifest lists them so), which is also the order of the files in the
tree, so a reader that walks the tree asks for blobs in about that order. When a blob
asked for follows the previous one in the stream, the next ones are announced to the
kernel (``POSIX_FADV_WILLNEED``), which reads them in the background, in parallel; the
window opens when a read request goes on from where the last one ended, then doubles on
each sequential step, as the kernel's own page readahead does, and a random access gets
none.

The announcing (open, fadvise, close per blob, which can block on a cold disk) is done
by a small helper process fed hex digests through a pipe. Measured on a mount, that
beats doing it in the serving thread (which then waits for the disk) and in a thread of
the same process (every hint is three trips through the GIL, which the serving thread,
hashing, then keeps waiting for: a third more CPU under ``--digest``). Even the write
to the pipe is left to a thread of its own: a serving thread that makes a system call
waits to get the GIL back, which with the loaders busy cost 12% of its time on a cold
``tar``. The pipe is non-blocking: a helper that falls behind loses hints, never
stalls a reader.
"""

from __future__ import annotations

import os
import queue
import select
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

MAX_WINDOW = 64  # blobs ahead (64 KiB on average each) announced to the kernel
NEAR = 8  # blobs ahead loaded into memory
IO_DEPTH = 8  # blobs announced at once: the disk works best with several requests in flight

_HELPER = """
import os, queue, sys, threading
todo = queue.SimpleQueue()
def work():
    while True:
        path = todo.get()
        try:
            # Never follow a symlink, nor wait on a FIFO, where a blob should be: a
            # store can hold anything, and a helper stuck in open() would outlive the
            # mount.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        os.close(fd)
for _ in range(int(sys.argv[1])):
    threading.Thread(target=work, daemon=True).start()
base = os.fsencode(sys.argv[2]) + b"/"
for line in sys.stdin.buffer:
    todo.put(base + line[:-1])
"""


class Readahead:
    """``prefetch`` is handed the next ``NEAR`` blobs of a sequential reader (with the
    compressed flag of the blob being loaded), to have them in memory before they are
    asked for; the kernel is told of up to ``max_window``."""

    def __init__(
        self,
        directory: str | None,
        stream: Iterable[bytes],
        *,
        prefetch: Callable[[list[tuple[bytes, bool]]], None] | None = None,
        max_window: int = MAX_WINDOW,
    ) -> None:
        self._directory = directory  # of the blob files (None: no kernel hints)
        self._stream: list[bytes] = []
        self._index: dict[bytes, int] = {}
        for digest in stream:  # the reference may list a chunk twice: keep the first
            if digest not in self._index:
                self._index[digest] = len(self._stream)
                self._stream.append(digest)
        self._max_window = max_window
        self._lock = threading.Lock()
        self._start = threading.Lock()
        self._last = -(1 << 62)  # stream position of the last blob used
        self._window = 0
        self._hinted = -1  # blobs up to here were announced
        self._prefetch = prefetch
        self._queued = -1  # blobs up to here were handed to prefetch
        self._enabled = False
        self._new_request = True  # no blob accessed yet for the current request
        self._helper: Any = None  # a subprocess.Popen, started lazily
        self._outbox: queue.SimpleQueue[bytes] | None = None  # hints for the helper

    def enable(self) -> None:
        self._enabled = True

    def next_request(self) -> None:
        """The blobs accessed from now on serve a new read request (see accessed)."""
        self._new_request = True

    def accessed(self, digest: bytes, compressed: bool = False) -> bool:
        """A reader uses this blob (cached or not): maybe announce the next ones. True
        when the access continues a sequential walk of the stream.

        Hits count as much as misses: with the loaders ahead of a reader, every blob it
        reaches is cached, and it must still move the window on, or the reader runs
        out of loaded blobs and loads the next one itself. Both kinds of hints go out
        in batches, half a window at a time."""
        if not self._enabled:
            return False
        pos = self._index.get(digest)
        if pos is None:
            return False
        if pos == self._last:  # another piece of the same blob
            return self._window > 0
        near: list[bytes] = []
        with self._lock:
            if 0 < pos - self._last <= max(self._window, 2):
                # The blobs of one large read follow each other in the stream
                # whatever the reader does next (a program's start-up faults in 1 MiB
                # of a library here and there): only a request that goes on from
                # where the last one ended opens the window. Once open, it grows on
                # every step.
                if self._window or self._new_request:
                    self._window = min(max(2 * self._window, 4), self._max_window)
            else:
                self._window = 0
                self._hinted = self._queued = pos
            self._last = pos
            self._new_request = False
            window = self._window
            if self._prefetch is not None and self._queued - pos <= NEAR // 2 and window:
                start, stop = max(self._queued, pos) + 1, min(pos + 1 + NEAR, len(self._stream))
                if start < stop:
                    near = self._stream[start:stop]
                    self._queued = stop - 1
            lines = b""
            if self._hinted - pos <= window // 2 and self._directory is not None:
                start, stop = max(self._hinted, pos) + 1, min(pos + 1 + window, len(self._stream))
                if start < stop:
                    self._hinted = stop - 1
                    lines = b"".join(d.hex().encode() + b"\n" for d in self._stream[start:stop])
        if near and self._prefetch is not None:
            self._prefetch([(d, compressed) for d in near])
        if lines:
            self._send(lines)
        return window > 0

    def _send(self, lines: bytes) -> None:
        """Hand hints to the sender thread: a serving thread never makes the system call
        itself (getting the GIL back after one, with loaders busy, costs more than the
        call)."""
        if self._outbox is None:
            with self._start:
                if self._outbox is None:
                    outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
                    threading.Thread(
                        target=self._sender, args=(outbox,), name="puzzlefs-hints", daemon=True
                    ).start()
                    self._outbox = outbox
        self._outbox.put(lines)

    def _sender(self, outbox: queue.SimpleQueue[bytes]) -> None:
        pipe = self._start_helper()
        while pipe is not None:
            lines = outbox.get()
            while lines:  # pieces of whole lines, each written atomically
                cut = lines.rfind(b"\n", 0, select.PIPE_BUF) + 1 or len(lines)
                try:
                    os.write(pipe, lines[:cut])
                except BlockingIOError:
                    break  # the helper is behind: these hints are dropped
                except OSError:  # the helper is gone
                    pipe = None
                    break
                lines = lines[cut:]
        # No helper (it could not start, or it died): no more kernel hints, so that
        # nothing is queued for this thread any longer; loading ahead goes on.
        self._directory = None

    def _start_helper(self) -> int | None:
        """The helper's pipe (None if it cannot start: no kernel hints then)."""
        import subprocess

        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(IO_DEPTH), str(self._directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,  # above all, never hold a FUSE device open
            )
        except OSError:
            return None
        assert self._helper.stdin is not None
        pipe: int = self._helper.stdin.fileno()
        os.set_blocking(pipe, False)
        return pipe
