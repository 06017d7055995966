"""The data path of a build: every file's contents as one stream, read into large
buffers, cut by FastCDC, and each chunk hashed, optionally compressed,
fs-verity-digested and stored.

Why worker processes and not threads: at heart the per-chunk work is per 4 KiB (one
zstd frame and one fs-verity leaf hash per 4 KiB block), and each of those C calls
drops and retakes the GIL. Threads then spend their time handing the GIL to each
other: here, two threads hashing 4 KiB blocks ran slower than one. A process has a GIL
of its own. The main process reads and cuts into memory it shares with the workers (an
anonymous shared mapping they inherit at fork), so chunk bytes are never copied,
pickled or sent: a task is a buffer number and the (offset, length) of its chunks, and
its result a few bytes per chunk. Workers store the blobs themselves.

Results are taken in stream order, so the output is the same whatever the number of
workers. Small builds, ``workers=1``, stores that are not directories, and processes
that already run threads (where fork is unsafe) do the same steps inline.

Memory is bounded by the buffers (a few MiB each, a fixed number of them), never by the
size of the data.

Workers cannot outlive the build: each asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG``), so a build killed with SIGKILL or by the OOM killer leaves no
process behind, and none holds the store's lock (which forked children never inherit,
see :mod:`puzzlefs.oci._lock`).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from puzzlefs.chunking import ChunkParams, Cutter, Readable
from puzzlefs.compression import ZstdOptions, compress_chunk
from puzzlefs.digest import Digest
from puzzlefs.oci.store import BlobStore, DiskBlobStore
from puzzlefs.verity import fsverity_digest

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["StoreChunk", "StoredChunk", "run", "store_chunk", "worker_count"]

# Each buffer holds this much of the stream (more for huge maximum chunk sizes): large
# reads, and tasks big enough that handing them to a worker costs little.
BUFFER_SIZE = 4 << 20
# Below this much file data, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20
# One process reads and cuts (about 1 GB/s); more workers than this would wait for it.
MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True, slots=True)
class StoredChunk:
    digest: bytes  # raw sha256 of the stored bytes
    verity: bytes  # fs-verity digest of the stored bytes
    size: int  # stored size
    compressed: bool
    new: bool  # written by this build (not already in the store)


# ``zstd`` below is how chunks are compressed, None for not at all.
StoreChunk = Callable[[BlobStore, memoryview, ZstdOptions | None], StoredChunk]


def store_chunk(store: BlobStore, data: memoryview, zstd: ZstdOptions | None) -> StoredChunk:
    """Store one chunk. ``data`` is a view into a buffer that is reused afterwards."""
    stored: bytes | memoryview
    if zstd is not None:
        stored, compressed = compress_chunk(data, zstd)
    else:
        stored, compressed = data, False
    digest = Digest.of(stored)
    new = store.put_verified(digest, stored)
    return StoredChunk(digest.raw, fsverity_digest(stored), len(stored), compressed, new)


def worker_count(workers: int | None, store: BlobStore, data_bytes: int) -> int:
    """How many worker processes a build uses; 0 means inline."""
    if workers is None:
        workers = min(_cpus(), MAX_DEFAULT_WORKERS) if data_bytes >= PARALLEL_MIN_BYTES else 1
    if (
        workers <= 1
        or not isinstance(store, DiskBlobStore)
        or "fork" not in multiprocessing.get_all_start_methods()
        or threading.active_count() > 1
    ):
        return 0
    return workers


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


E = TypeVar("E")  # what the caller keeps about each chunk until its result is in


def run(
    stream: Readable,
    params: ChunkParams,
    store: BlobStore,
    zstd: ZstdOptions | None,
    workers: int,
    store_one: StoreChunk,
    on_chunk: Callable[[int], E],
    on_stored: Callable[[StoredChunk, E], None],
) -> None:
    """Chunk ``stream`` and store every chunk with ``store_one``.

    ``on_chunk(length)`` is called for each chunk as it is cut, in stream order (the
    stream has then read at least to its end); ``on_stored(result, kept)`` then gets
    each chunk's result with what ``on_chunk`` returned for it, also in stream order.
    With ``workers`` > 0, that many processes do the storing.
    """
    size = max(BUFFER_SIZE, 2 * params.max)
    pipe: _Pipeline[E] = (
        _Workers(size, workers, store, zstd, store_one, on_stored)
        if workers > 0
        else _Inline(size, store, zstd, store_one, on_stored)
    )
    cutter = Cutter(params)
    carry = b""  # the unfinished chunk at the end of the last buffer
    try:
        while True:
            index, buf = pipe.acquire()
            n = len(carry)
            buf[:n] = carry
            filled = n + _fill(stream, buf[n:])
            final = filled < len(buf)
            lengths, used = cutter.cut(buf[:filled], final)
            # A copy: the buffer may be reused before the next one is filled.
            carry = bytes(buf[used:filled])
            spans, kept, offset = [], [], 0
            for length in lengths:
                spans.append((offset, length))
                kept.append(on_chunk(length))
                offset += length
            pipe.submit(index, spans, kept)
            if final:
                break
        pipe.drain()
    finally:
        pipe.close()


def _fill(stream: Readable, buf: memoryview) -> int:
    """Read until ``buf`` is full or the stream ends; return the bytes read."""
    filled, size = 0, len(buf)
    while filled < size:
        n = stream.readinto(buf[filled:])
        if not n:
            break
        filled += n
    return filled


class _Pipeline(Generic[E]):
    def acquire(self) -> tuple[int, memoryview]:
        """A buffer that no pending chunk uses any more, and its number."""
        raise NotImplementedError

    def submit(self, index: int, spans: list[tuple[int, int]], kept: list[E]) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Wait for every submitted chunk; report its result."""

    def close(self) -> None:
        """Release workers (after an error too)."""


class _Inline(_Pipeline[E]):
    def __init__(
        self,
        size: int,
        store: BlobStore,
        zstd: ZstdOptions | None,
        store_one: StoreChunk,
        on_stored: Callable[[StoredChunk, E], None],
    ) -> None:
        self._buf = memoryview(bytearray(size))
        self._store, self._zstd = store, zstd
        self._store_one, self._on_stored = store_one, on_stored

    def acquire(self) -> tuple[int, memoryview]:
        return 0, self._buf

    def submit(self, index: int, spans: list[tuple[int, int]], kept: list[E]) -> None:
        buf = self._buf
        for (offset, length), k in zip(spans, kept, strict=True):
            result = self._store_one(self._store, buf[offset : offset + length], self._zstd)
            self._on_stored(result, k)


# A worker process's share of the build, set when it starts.
_worker: tuple[memoryview, int, BlobStore, ZstdOptions | None, StoreChunk] | None = None
_Result = tuple[bytes, bytes, int, bool, bool]


_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the build) dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def _start_worker(
    parent: int,
    shared: mmap.mmap,
    size: int,
    store: BlobStore,
    zstd: ZstdOptions | None,
    store_one: StoreChunk,
) -> None:
    global _worker
    _die_with_parent(parent)
    # Ctrl-C and SIGTERM go to the whole process group: they are the main process's
    # to handle (it stops the pool). They were blocked across the fork (see
    # _Workers.submit): ignored from here on, a pending one is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _worker = (memoryview(shared), size, store, zstd, store_one)


def _store_task(index: int, spans: Sequence[tuple[int, int]]) -> list[_Result]:
    assert _worker is not None
    view, size, store, zstd, store_one = _worker
    base = index * size
    out: list[_Result] = []
    for offset, length in spans:
        start = base + offset
        r = store_one(store, view[start : start + length], zstd)
        out.append((r.digest, r.verity, r.size, r.compressed, r.new))
    return out


class _Workers(_Pipeline[E]):
    """Buffers in a shared mapping; one task per buffer, taken back in order."""

    def __init__(
        self,
        size: int,
        workers: int,
        store: BlobStore,
        zstd: ZstdOptions | None,
        store_one: StoreChunk,
        on_stored: Callable[[StoredChunk, E], None],
    ) -> None:
        count = 2 * workers + 2  # each worker busy, one task queued for each, one filling
        self._size = size
        self._shared = mmap.mmap(-1, count * size)  # MAP_SHARED | MAP_ANONYMOUS
        view = memoryview(self._shared)
        self._buffers = [view[i * size : (i + 1) * size] for i in range(count)]
        self._free = deque(range(count))
        self._pending: deque[tuple[Future[list[_Result]] | None, int, list[E]]] = deque()
        self._on_stored = on_stored
        self._started = False  # the workers are forked by the first submit
        # Imported here: most of multiprocessing, which small builds never need.
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(os.getpid(), self._shared, size, store, zstd, store_one),
        )

    def acquire(self) -> tuple[int, memoryview]:
        while not self._free:
            self._settle()
        index = self._free.popleft()
        return index, self._buffers[index]

    def submit(self, index: int, spans: list[tuple[int, int]], kept: list[E]) -> None:
        future: Future[list[_Result]] | None = None
        if spans and not self._started:
            # The first submit forks the workers: with the stop signals blocked, so that
            # none can interrupt a child before it ignores them (a KeyboardInterrupt in
            # an at-fork hook is printed as "Exception ignored").
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                future = self._pool.submit(_store_task, index, spans)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self._started = True
        elif spans:
            future = self._pool.submit(_store_task, index, spans)
        self._pending.append((future, index, kept))

    def _settle(self) -> None:
        future, index, kept = self._pending[0]
        results = future.result() if future is not None else []
        self._pending.popleft()
        self._free.append(index)
        self._report(results, kept)

    def _report(self, results: list[_Result], kept: list[E]) -> None:
        for (digest, verity, size, compressed, new), k in zip(results, kept, strict=True):
            self._on_stored(StoredChunk(digest, verity, size, compressed, new), k)

    def drain(self) -> None:
        while self._pending:
            self._settle()

    def close(self) -> None:
        # Blobs that tasks in flight store stay for gc (the store's rules): nothing to
        # wait for but the workers themselves.
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._buffers.clear()
