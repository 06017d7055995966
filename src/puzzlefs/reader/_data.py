"""File contents: chunk blobs loaded, verified and cached, and pieces read out of them.

Every blob is checked before a byte of it is used: against its fs-verity digest from the
rootfs when the image was opened with a digest (the kernel's measurement where the blob
has fs-verity, computed here otherwise), against its sha256 otherwise. Loaded blobs
(compressed ones as :class:`~puzzlefs.compression.SeekableBlob`) and decompressed zstd
frames live in bounded LRU caches; safe to use from several threads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable

from puzzlefs.compression import MAX_CHUNK_SIZE, SeekableBlob
from puzzlefs.digest import Digest
from puzzlefs.errors import BlobNotFound, ImageError, MetadataError, VerityMismatch
from puzzlefs.oci import ImageLayout
from puzzlefs.reader._cache import LRU
from puzzlefs.reader._readahead import Readahead
from puzzlefs.reference_compat import raw_chunk_verity_ok
from puzzlefs.verity import fsverity_digest, measure_verity

__all__ = ["ChunkReader"]

BLOB_CACHE_BYTES = 128 * 1024 * 1024
# Decompressed zstd frames at the edges of recent reads (see SeekableBlob.read).
FRAME_CACHE_BYTES = 16 * 1024 * 1024
MEASURE_GIVE_UP = 16


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
        self._blobs: LRU[bytes, bytes | SeekableBlob] = LRU(BLOB_CACHE_BYTES, _blob_weight)
        self._frames: LRU[tuple[bytes, int], bytes] = LRU(FRAME_CACHE_BYTES, len)
        self._readahead = Readahead(self._blob_path, stream)
        self._lock = threading.Lock()
        self._measure_misses = 0

    def read(self, digest: bytes, compressed: bool, offset: int, length: int, end: int) -> bytes:
        """``length`` bytes from ``offset`` of a chunk's uncompressed bytes, where the
        file's piece of that chunk ends at ``end`` (checked against the blob)."""
        blob = self.blob(digest, compressed)
        size = blob.size if isinstance(blob, SeekableBlob) else len(blob)
        if end > size:
            raise MetadataError(
                f"file chunk ending at {end} lies outside blob {digest.hex()} ({size} bytes)"
            )
        if isinstance(blob, SeekableBlob):
            try:
                return blob.read(offset, length, self._frames, digest)
            except ImageError as e:  # a corrupt frame: say which blob
                raise ImageError(f"chunk blob {digest.hex()}: {e}") from None
        return blob[offset : offset + length]

    def blob(self, raw_digest: bytes, compressed: bool) -> bytes | SeekableBlob:
        """A chunk blob, verified, decoded for random access, cached."""
        cached = self._blobs.get(raw_digest)
        if cached is not None:
            return cached
        self._readahead.loading(raw_digest)
        data = self._fetch(raw_digest, compressed)
        try:
            value: bytes | SeekableBlob = SeekableBlob(data) if compressed else data
        except ImageError as e:  # its seek table: say which blob
            raise ImageError(f"chunk blob {raw_digest.hex()}: {e}") from None
        self._blobs.put(raw_digest, value)
        return value

    def enable_readahead(self) -> None:
        """Announce the next chunk blobs to the kernel when reads look sequential (for
        a long-lived reader such as a mount; it starts a small helper process)."""
        self._readahead.enable()

    def _blob_path(self, raw_digest: bytes) -> str | None:
        path = self.layout.blobs.path(Digest.from_raw(raw_digest))
        return None if path is None else str(path)

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
    return v.size if isinstance(v, SeekableBlob) else len(v)
