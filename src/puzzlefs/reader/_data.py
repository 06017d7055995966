"""File contents: chunk blobs loaded, verified and cached, and pieces read out of them.

Every blob is checked before a byte of it is used: against its fs-verity digest from the
rootfs when the image was opened with a digest (the kernel's measurement where the blob
has fs-verity, computed here otherwise), against its sha256 otherwise. Loaded blobs
(compressed ones as :class:`~puzzlefs.compression.SeekableBlob`) and decompressed zstd
frames live in bounded LRU caches; safe to use from several threads, and a blob wanted
by several at once is loaded once.

With readahead on (a mount), a reader walking the stream also has the next few blobs
loaded, checked and (compressed ones) decompressed whole by ``PREFETCH_THREADS`` loader
threads: reading a blob, hashing it and zstd all run outside the GIL, so that work
moves to the second core while the serving thread answers the kernel. A blob a loader
fails on is left to the reader that needs it, which then meets the error itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from puzzlefs.compression import MAX_CHUNK_SIZE
from puzzlefs.digest import Digest
from puzzlefs.errors import (
    BlobNotFound,
    ImageError,
    MetadataError,
    PuzzleFSError,
    VerityMismatch,
)
from puzzlefs.oci import ImageLayout
from puzzlefs.reader._cache import LRU
from puzzlefs.reader._readahead import Readahead
from puzzlefs.reference_compat import raw_chunk_verity_ok
from puzzlefs.verity import fsverity_digest, measure_verity

if TYPE_CHECKING:
    from puzzlefs.compression import SeekableBlob

__all__ = ["ChunkReader"]

log = logging.getLogger(__name__)

BLOB_CACHE_BYTES = 128 * 1024 * 1024
# Decompressed zstd frames at the edges of recent reads (see SeekableBlob.read).
FRAME_CACHE_BYTES = 16 * 1024 * 1024
MEASURE_GIVE_UP = 16
PREFETCH_THREADS = 2

_Key = tuple[bytes, bool]  # a blob as it is used: (raw sha256, compressed)


class ChunkReader:
    """Reads pieces of chunk blobs of one layout.

    ``verity_of(raw sha256)`` gives a chunk's fs-verity digest from the rootfs, and
    ``verify_verity`` says whether to check it (the image was opened with a digest).
    ``stream``: the chunks in the manifest's order, for readahead. ``zstd_image``: the
    image was built compressed (its chunk layers say ``+zstd``), for the reference's
    records of chunks it stored raw (:mod:`puzzlefs.reference_compat`).
    """

    def __init__(
        self,
        layout: ImageLayout,
        verity_of: Callable[[bytes], bytes | None],
        *,
        verify_verity: bool,
        stream: Iterable[bytes] = (),
        zstd_image: bool = False,
    ) -> None:
        self.layout = layout
        self._verity_of = verity_of
        self._verify_verity = verify_verity
        self._zstd_image = zstd_image  # the manifest's chunk layers say +zstd
        self._verified: set[bytes] = set()
        self._blobs: LRU[_Key, bytes | SeekableBlob] = LRU(BLOB_CACHE_BYTES, _blob_weight)
        self._frames: LRU[tuple[bytes, int], bytes] = LRU(FRAME_CACHE_BYTES, len)
        self._loading: dict[_Key, threading.Event] = {}  # loads under way, by anyone
        self._readahead = Readahead(layout.blobs.directory(), stream, prefetch=self._prefetch)
        self._queue: queue.SimpleQueue[_Key] | None = None  # the loaders' work
        self._lock = threading.Lock()
        self._measure_misses = 0
        if zstd_image:
            # The codec, loaded now: a mount makes its reader beside the first requests,
            # and the first read would otherwise wait for it.
            import puzzlefs.compression._seekable  # noqa: F401

    def read(self, digest: bytes, compressed: bool, offset: int, length: int, end: int) -> bytes:
        """``length`` bytes from ``offset`` of a chunk's uncompressed bytes, where the
        file's piece of that chunk ends at ``end`` (checked against the blob)."""
        blob = self.blob(digest, compressed)
        size = len(blob) if isinstance(blob, bytes) else blob.size
        if end > size:
            raise MetadataError(
                f"file chunk ending at {end} lies outside blob {digest.hex()} ({size} bytes)"
            )
        if isinstance(blob, bytes):
            return blob[offset : offset + length]
        try:
            return blob.read(offset, length, self._frames, digest)
        except ImageError as e:  # a corrupt frame: say which blob
            raise ImageError(f"chunk blob {digest.hex()}: {e}") from None

    def read_request(self, reads: list[tuple[bytes, bool, int, int, int]]) -> list[bytes]:
        """The pieces one read request needs (each as :meth:`read` takes it): the
        loaders fetch the others while this thread fetches the first, so that a cold
        read of several chunks waits for the disk once, not once per chunk."""
        self._readahead.next_request()
        if len(reads) > 1:
            self.want([(r[0], r[1]) for r in reads[1:]])
        return [self.read(*r) for r in reads]

    def blob(self, raw_digest: bytes, compressed: bool) -> bytes | SeekableBlob:
        """A chunk blob, verified, decoded for random access, cached."""
        key = (raw_digest, compressed)
        sequential = self._readahead.accessed(raw_digest, compressed)
        cached = self._blobs.get(key)
        if cached is not None:
            return cached
        # A sequential reader will want all of it: one call decodes it whole.
        loaded = self._load(key, whole=sequential, wait=True)
        assert loaded is not None
        return loaded

    def _load(self, key: _Key, *, whole: bool, wait: bool) -> bytes | SeekableBlob | None:
        """Load, check and cache a blob, unless another thread is at it: then wait for
        it (``wait``) or leave it (None). ``whole``: decompress a compressed blob whole
        (for a sequential reader) rather than frame by frame on demand."""
        mine = threading.Event()
        while (other := self._loading.setdefault(key, mine)) is not mine:
            if not wait:
                return None
            other.wait()
            cached = self._blobs.get(key)
            if cached is not None:
                return cached
            # That load failed: this thread tries, and meets the error itself.
        try:
            value = self._blobs.get(key)  # cached between the caller's look and now
            if value is None:
                value = self._decode(key, self._fetch(*key), whole)
                self._blobs.put(key, value)
            return value
        finally:
            del self._loading[key]
            mine.set()

    @staticmethod
    def _decode(key: _Key, data: bytes, whole: bool) -> bytes | SeekableBlob:
        raw_digest, compressed = key
        if not compressed:
            return data
        from puzzlefs.compression import SeekableBlob  # zstd: only for compressed images

        try:
            blob = SeekableBlob(data)
            return blob.read_all() if whole else blob
        except ImageError as e:  # its seek table or a frame: say which blob
            raise ImageError(f"chunk blob {raw_digest.hex()}: {e}") from None

    def want(self, keys: list[tuple[bytes, bool]]) -> None:
        """Blobs a reader will read next, after one it reads now: the loaders load
        those not cached meanwhile, so that a cold read of several chunks waits for
        the disk once, not once per chunk."""
        todo = [k for k in keys if self._unloaded(k)]
        if todo:
            self._prefetch(todo)

    def _unloaded(self, key: _Key) -> bool:
        """Neither cached nor being loaded by anyone."""
        return key not in self._loading and self._blobs.get(key) is None

    def _prefetch(self, keys: list[_Key]) -> None:
        """Have the loaders load these blobs ahead of a sequential reader."""
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    work: queue.SimpleQueue[_Key] = queue.SimpleQueue()
                    for i in range(PREFETCH_THREADS):
                        threading.Thread(
                            target=self._loader,
                            args=(work,),
                            name=f"puzzlefs-load-{i}",
                            daemon=True,
                        ).start()
                    self._queue = work
        for key in keys:
            self._queue.put(key)

    def _loader(self, work: queue.SimpleQueue[_Key]) -> None:
        while True:
            key = work.get()
            if not self._unloaded(key):
                continue
            try:
                self._load(key, whole=True, wait=False)
            except PuzzleFSError as e:  # the reader that needs it will say so
                log.debug("prefetch of chunk blob %s: %s", key[0].hex(), e)
            except Exception:
                log.exception("prefetch of chunk blob %s failed unexpectedly", key[0].hex())

    def enable_readahead(self) -> None:
        """Announce the next chunk blobs to the kernel when reads look sequential (for
        a long-lived reader such as a mount; it starts a small helper process)."""
        self._readahead.enable()

    def _fetch(self, raw_digest: bytes, compressed: bool) -> bytes:
        """A chunk blob's stored bytes, checked against its fs-verity digest the first
        time (with ``verify_verity``), against its sha256 otherwise.

        One check suffices: the fs-verity digest of the chain is as collision-resistant
        as the sha256 that names the blob, so the first load of each chunk under
        ``--digest`` costs one hash of its bytes, not two.
        """
        digest = Digest.from_raw(raw_digest)
        try:  # a chunk blob is never larger than a chunk: refused before it is read
            data = self.layout.blobs.get(digest, verify=False, limit=MAX_CHUNK_SIZE)
        except BlobNotFound:
            raise BlobNotFound(f"chunk blob {digest.hex} is missing") from None
        if self._verify_verity and raw_digest not in self._verified:
            self._check_verity(raw_digest, data, compressed)
            return data
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hex:
            raise ImageError(f"chunk blob {digest.hex} is corrupt (its sha256 is {actual})")
        return data

    def _check_verity(self, raw_digest: bytes, data: bytes, compressed: bool) -> None:
        expected = self._verity_of(raw_digest)
        hexd = raw_digest.hex()
        if expected is None:
            raise VerityMismatch(f"chunk blob {hexd}", "an fsVerityData entry", "none")
        actual = self._measured(raw_digest) or fsverity_digest(data)
        if actual != expected and not raw_chunk_verity_ok(
            expected, data, referenced_raw=not compressed, zstd_image=self._zstd_image
        ):
            raise VerityMismatch(f"chunk blob {hexd}", expected.hex(), actual.hex())
        with self._lock:
            self._verified.add(raw_digest)

    def _measured(self, raw_digest: bytes) -> bytes | None:
        """The kernel's fs-verity measurement of a blob file, where it has one: a cheap
        ioctl instead of hashing the whole blob in user space.

        Asking costs an open and an ioctl per blob (a quarter of the user-space hash on
        a mount); after ``MEASURE_GIVE_UP`` blobs in a row without fs-verity, the store
        is taken to have none and is no longer asked (user-space hashing is as safe).
        """
        if self._measure_misses >= MEASURE_GIVE_UP:
            return None
        path = self.layout.blobs.path(Digest.from_raw(raw_digest))
        measured = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            try:
                measured = measure_verity(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        self._measure_misses = 0 if measured is not None else self._measure_misses + 1
        return measured


def _blob_weight(v: bytes | SeekableBlob) -> int:
    return len(v) if isinstance(v, bytes) else v.size
