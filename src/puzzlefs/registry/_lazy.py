"""A mount straight from a registry: a local layout whose blob store fetches what it
lacks, so the whole read path (tables, chunk reader, verification, FUSE) stays as it is
for a local image.

- The manifest(s), the rootfs and the times blob are fetched before the mount goes
  live (:func:`prepare`); each chunk on first use, by the serving thread that needs it,
  into the cache layout (:mod:`puzzlefs.registry._cache`), verified by sha256 first;
  the chunk reader then checks it again as for any local image (its sha256, or its
  fs-verity digest under ``--digest``).
- Readahead: a miss on a chunk queues the next ones in the stream (the order of the
  files in the tree) for the background workers, the window doubling while misses
  stay sequential. ``--prefetch all`` queues every chunk; a prefetch list (a file of
  ``sha256:`` digests, one a line, as ``--record`` writes them in first-use order)
  goes first. A chunk a reader waits for is never queued behind others: the reader
  fetches it itself, or waits for the worker that already is.
- Failure: each fetch is retried with backoff (bounded in attempts and time), then the
  reader gets EIO and the log a line; nothing waits longer than that, and the next read
  tries again, so the mount recovers when the registry does.
- Memory: a blob in flight per thread; the queues hold digests only. The cache keeps
  every chunk fetched (at most the image's size); remove its directory, or run
  ``puzzlefs gc`` on it, when no mount uses it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import BlobNotFound, PuzzleFSError
from puzzlefs.oci import Descriptor, ImageLayout
from puzzlefs.oci.store import DiskBlobStore
from puzzlefs.registry._client import Registry

__all__ = ["Fetcher", "LazyLayout", "RemoteBlobStore", "read_list"]

log = logging.getLogger(__name__)

P_LIST, P_READAHEAD, P_ALL = 0, 1, 2  # prefetch priorities: lower first
MIN_WINDOW, MAX_WINDOW = 4, 32  # readahead, in chunks
WAIT_FOR_OTHER = 120.0  # seconds a reader waits for another thread's fetch of its blob
MAX_BLOB = 1 << 30  # a chunk (or any blob fetched whole) larger than this is refused


class Fetcher:
    """Fetches chunk blobs of one image into a local store: on demand, and in the
    background from a priority queue served by ``workers`` threads."""

    def __init__(
        self,
        registry: Registry,
        repo: str,
        store: DiskBlobStore,
        chunks: list[tuple[bytes, int, str]],
        *,
        workers: int = 8,
        readahead: bool = True,
    ) -> None:
        self.registry = registry
        self.repo = repo
        self.store = store
        self._stream: list[Digest] = []
        self._pos: dict[Digest, int] = {}
        self._sizes: dict[Digest, int] = {}
        for raw, size, _ in chunks:  # Manifest.chunk_blobs()
            digest = Digest.from_raw(raw)
            if digest not in self._pos:
                self._pos[digest] = len(self._stream)
                self._stream.append(digest)
                self._sizes[digest] = size
        self._workers = workers
        self._readahead = readahead
        self._lock = threading.Lock()
        self._inflight: dict[Digest, threading.Event] = {}
        self._queue: list[tuple[int, int, Digest]] = []
        self._queued: dict[Digest, int] = {}  # the best priority each is queued at
        self._seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._last_miss = -(1 << 62)
        self._window = 0
        self._record_fd: int | None = None
        self._recorded: set[Digest] = set()
        self._started = False
        self._stats = {"demand": 0, "prefetched": 0, "failed": 0, "bytes": 0}
        self._failures_logged = 0

    # -- in the serving process ------------------------------------------------------
    def start(
        self,
        *,
        prefetch_all: bool = False,
        first: Iterable[Digest] = (),
        record: str | None = None,
    ) -> None:
        """Start the background workers (in the process that serves the mount)."""
        if record is not None:
            self._record_fd = os.open(
                record, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
        with self._lock:
            listed = [d for d in first if d in self._pos]
            self._enqueue(listed, P_LIST)
            if prefetch_all:
                self._enqueue(self._stream, P_ALL)
            self._started = True
        for i in range(self._workers):
            threading.Thread(target=self._work, name=f"puzzlefs-fetch-{i}", daemon=True).start()
        log.info(
            "fetching from %s/%s: %d chunks, %d present; prefetch: %d listed%s",
            self.registry.host, self.repo, len(self._stream),
            sum(1 for d in self._stream if self.store.has(d)), len(listed),
            ", then all" if prefetch_all else "",
        )  # fmt: skip

    def used(self, digest: Digest) -> None:
        """A reader loads this blob (it was not in the reader's own cache)."""
        if digest not in self._pos:
            return
        fd = self._record_fd
        if fd is not None and digest not in self._recorded:
            with self._lock:
                fresh = digest not in self._recorded
                self._recorded.add(digest)
            if fresh:
                try:
                    os.write(fd, f"{digest}\n".encode())
                except OSError as e:
                    log.warning("cannot record the access list: %s", e)
                    self._record_fd = None

    def missed(self, digest: Digest) -> None:
        """A reader needs a blob the store lacks: read ahead of it."""
        pos = self._pos.get(digest)
        if pos is None or not self._readahead or not self._started:
            return
        with self._lock:
            if 0 < pos - self._last_miss <= max(self._window, MIN_WINDOW):
                self._window = min(max(2 * self._window, MIN_WINDOW), MAX_WINDOW)
            else:
                self._window = MIN_WINDOW
            self._last_miss = pos
            ahead = self._stream[pos + 1 : pos + 1 + self._window]
            self._enqueue([d for d in ahead if not self.store.has(d)], P_READAHEAD)

    def demand(self, digest: Digest) -> None:
        """Have the blob in the store, or raise (after the client's retries)."""
        deadline = time.monotonic() + WAIT_FOR_OTHER
        while not self.store.has(digest):
            event, mine = self._claim(digest)
            if mine:
                try:
                    self._fetch(digest, "demand")
                finally:
                    self._release(digest, event)
                return
            # Another thread fetches it: wait for that, then look again (it may fail).
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise BlobNotFound(f"chunk blob {digest.hex}: gave up waiting for its fetch")

    # -- inside ------------------------------------------------------------------------
    def _enqueue(self, digests: Iterable[Digest], priority: int) -> None:
        """(The lock is held.) A digest already queued at a lower priority is queued
        again at this one; the entry left behind is skipped when it comes up."""
        added = False
        for d in digests:
            if d in self._inflight or self._queued.get(d, P_ALL + 1) <= priority:
                continue
            self._queued[d] = priority
            heapq.heappush(self._queue, (priority, next(self._seq), d))
            added = True
        if added:
            self._wake.notify_all()

    def _claim(self, digest: Digest) -> tuple[threading.Event, bool]:
        with self._lock:
            event = self._inflight.get(digest)
            if event is not None:
                return event, False
            event = threading.Event()
            self._inflight[digest] = event
            return event, True

    def _release(self, digest: Digest, event: threading.Event) -> None:
        with self._lock:
            self._inflight.pop(digest, None)
        event.set()

    def _fetch(self, digest: Digest, why: str) -> None:
        limit = max(self._sizes.get(digest, 0), 0) or MAX_BLOB
        try:
            data = self.registry.get_blob(self.repo, digest, limit=min(limit, MAX_BLOB))
        except PuzzleFSError as e:
            with self._lock:
                self._stats["failed"] += 1
            if why == "demand":
                log.error("fetching chunk %s for a reader failed: %s", digest.hex, e)
            raise
        self.store.put_verified(digest, data)  # the client checked its sha256
        with self._lock:
            self._stats[why] += 1
            self._stats["bytes"] += len(data)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                priority, _, digest = heapq.heappop(self._queue)
                if self._queued.get(digest) == priority:
                    del self._queued[digest]
            if self.store.has(digest):
                continue
            event, mine = self._claim(digest)
            if not mine:
                continue
            try:
                self._fetch(digest, "prefetched")
            except PuzzleFSError as e:
                # Dropped: a reader that needs it fetches it itself (and gets the error).
                if self._failures_logged < 10:
                    self._failures_logged += 1
                    log.warning("prefetch of chunk %s failed: %s", digest.hex, e)
            except Exception:
                log.exception("prefetch of chunk %s failed unexpectedly", digest.hex)
            finally:
                self._release(digest, event)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)


class RemoteBlobStore(DiskBlobStore):
    """A layout's blob store that fetches the chunks it lacks through a
    :class:`Fetcher`. ``has`` and ``size`` answer for what is local."""

    def __init__(self, root: Path, fetcher: Fetcher) -> None:
        super().__init__(root)
        self.fetcher = fetcher

    def _read(self, digest: Digest, size: int | None, limit: int | None) -> bytes:
        self.fetcher.used(digest)
        try:
            return super()._read(digest, size, limit)
        except BlobNotFound:
            pass
        self.fetcher.missed(digest)
        self.fetcher.demand(digest)
        return super()._read(digest, size, limit)


class LazyLayout(ImageLayout):
    """The cache layout, its tag pinned to what the registry named at mount time, its
    chunks fetched on first use."""

    def __init__(self, path: Path, tag: str, root: Descriptor, fetcher: Fetcher) -> None:
        super().__init__(path, blobs=RemoteBlobStore(path / "blobs" / "sha256", fetcher))
        self._pinned = (tag, root)

    def resolve(self, tag: str) -> Descriptor:
        if tag == self._pinned[0]:
            return self._pinned[1]
        return super().resolve(tag)


def read_list(path: str | os.PathLike[str]) -> list[Digest]:
    """A prefetch list: ``sha256:<hex>`` (or bare hex) per line; # comments."""
    out: list[Digest] = []
    with open(path, encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                out.append(Digest.parse(text) if ":" in text else Digest(text))
            except PuzzleFSError:
                from puzzlefs.errors import UsageError

                raise UsageError(f"{path}:{n}: not a sha256 digest: {text[:80]!r}") from None
    return out
