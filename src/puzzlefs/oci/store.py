"""Content-addressed blob stores: one interface, a disk and a memory implementation.

Disk writes are crash-safe without an fsync per blob: each blob is written whole or
not at all (:class:`puzzlefs._files.AtomicDir`: an unnamed O_TMPFILE file linked into
place, or a temporary file renamed into place); :meth:`~BlobStore.sync` flushes the
whole filesystem once before index.json (the only thing that makes blobs reachable) is
replaced. Disk reads trust nothing in the directory: a blob that is a symlink, a FIFO
or a device is refused, and a blob's size is checked against what the caller knows it
must be (its descriptor's size) or may be (the largest chunk) before it is read.

The store's rules, which make concurrent writers safe without knowing of each other
(several layouts may share one store through a ``blobs/sha256`` symlink):

- A blob, once stored, is only ever removed by garbage collection, never by a
  writer, not even one that failed: another writer may have found it present and
  be about to commit a tag that needs it.
- Writers hold the store's lock shared (:meth:`BlobStore.writing`) from their first
  existence check to their last commit; garbage collection holds it exclusively
  (:meth:`BlobStore.collecting`), so it never sees a half-built image.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

from puzzlefs._files import AtomicDir, check_size, read_regular
from puzzlefs.digest import Digest
from puzzlefs.errors import BlobNotFound, DigestMismatch, UnsafeFile
from puzzlefs.oci._lock import flocked

__all__ = ["BlobStore", "DiskBlobStore", "MemoryBlobStore"]

_libc = ctypes.CDLL(None, use_errno=True)


class BlobStore(ABC):
    """Blobs by sha256. ``get`` verifies content unless told the caller will.

    ``get``'s ``size`` is what the blob must measure (its descriptor's size) and
    ``limit`` the most it may; a blob that does not fit either is refused before it
    is read (:class:`~puzzlefs.errors.ImageError`, or
    :class:`~puzzlefs.errors.UnsafeFile` above ``limit``).
    """

    @abstractmethod
    def has(self, digest: Digest) -> bool: ...

    @abstractmethod
    def size(self, digest: Digest) -> int: ...

    @abstractmethod
    def _read(self, digest: Digest, size: int | None, limit: int | None) -> bytes: ...

    @abstractmethod
    def put_verified(self, digest: Digest, data: bytes | memoryview) -> bool:
        """Store ``data`` whose sha256 the caller computed; return False if it existed."""

    def put(self, data: bytes | memoryview) -> Digest:
        digest = Digest(hashlib.sha256(data).hexdigest())
        self.put_verified(digest, data)
        return digest

    def put_stream(self, digest: Digest, pieces: Iterable[bytes | memoryview]) -> bool:
        """Store the bytes of ``pieces`` (a download, say) if their sha256 is
        ``digest``; raise :class:`DigestMismatch` and store nothing if it is not.
        False if the blob existed (``pieces`` is then not consumed)."""
        if self.has(digest):
            return False
        data = b"".join(pieces)
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(f"blob {digest.hex}", digest.hex, actual)
        return self.put_verified(digest, data)

    def get(
        self,
        digest: Digest,
        *,
        verify: bool = True,
        size: int | None = None,
        limit: int | None = None,
    ) -> bytes:
        data = self._read(digest, size, limit)
        if verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest.hex:
                raise DigestMismatch(f"blob {digest.hex}", digest.hex, actual)
        return data

    def sync(self) -> None:  # noqa: B027 - memory stores have nothing to flush
        """Make every stored blob durable."""

    def path(self, digest: Digest) -> Path | None:
        """A file holding the blob, where the store has one (for fs-verity ioctls)."""
        return None

    def directory(self) -> str | None:
        """The directory of one file per blob, named by its hex digest, where the store
        is one (for hints to the kernel, which need no checks)."""
        return None

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held by a writer from its first ``has``/``put`` to its tag's commit."""
        yield

    @contextlib.contextmanager
    def collecting(self, *, wait: bool = True) -> Iterator[bool]:
        """Held by garbage collection: no writer is between ``put`` and commit.
        Yields False (with ``wait=False``) when a writer holds the store."""
        yield True


class MemoryBlobStore(BlobStore):
    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}
        self._lock = threading.Lock()

    def has(self, digest: Digest) -> bool:
        return digest in self._blobs

    def size(self, digest: Digest) -> int:
        return len(self._find(digest))

    def _find(self, digest: Digest) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobNotFound(f"blob not found: {digest}") from None

    def _read(self, digest: Digest, size: int | None, limit: int | None) -> bytes:
        data = self._find(digest)
        check_size(f"blob {digest.hex}", len(data), size, limit)
        return data

    def put_verified(self, digest: Digest, data: bytes | memoryview) -> bool:
        with self._lock:
            if digest in self._blobs:
                return False
            self._blobs[digest] = bytes(data)
            return True

    def corrupt(self, digest: Digest, data: bytes) -> None:
        """Replace a blob's bytes without checking them: for tests of tampering."""
        self._blobs[digest] = data


class DiskBlobStore(BlobStore):
    """``<oci_dir>/blobs/sha256/<hex>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made = False  # root exists (checked once)
        self._dir = AtomicDir(root)

    def path(self, digest: Digest) -> Path:
        return self.root / digest.hex

    def directory(self) -> str:
        return str(self.root)

    # The lock is the blob directory's own (through any symlink), so layouts that share
    # a store share its lock.
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._ensure_root()
        with flocked(self.root, shared=True):
            yield

    @contextlib.contextmanager
    def collecting(self, *, wait: bool = True) -> Iterator[bool]:
        if not self.root.is_dir():
            # No store yet: nothing to collect, and nothing to create (gc --dry-run
            # changes nothing); a writer that makes it meanwhile has nothing to fear.
            yield True
            return
        with flocked(self.root, wait=wait) as locked:
            yield locked

    def _ensure_root(self) -> None:
        if not self._made:
            self.root.mkdir(parents=True, exist_ok=True)
            self._made = True

    def _lstat(self, digest: Digest) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(self.root, digest.hex))
        except FileNotFoundError:
            return None

    def has(self, digest: Digest) -> bool:
        st = self._lstat(digest)
        return st is not None and stat.S_ISREG(st.st_mode)

    def size(self, digest: Digest) -> int:
        st = self._lstat(digest)
        if st is None:
            raise BlobNotFound(f"blob not found: {digest}")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"blob {digest.hex} is not a regular file")
        return st.st_size

    def _read(self, digest: Digest, size: int | None, limit: int | None) -> bytes:
        path = os.path.join(self.root, digest.hex)
        try:
            return read_regular(path, f"blob {digest.hex}", size=size, limit=limit)
        except FileNotFoundError:
            raise BlobNotFound(f"blob not found: {digest}") from None

    def put_verified(self, digest: Digest, data: bytes | memoryview) -> bool:
        # A build stores thousands of blobs: plain os calls on str paths, no pathlib.
        st = self._lstat(digest)
        if st is not None and stat.S_ISREG(st.st_mode):
            return False
        self._ensure_root()
        # Something that is not a blob (a FIFO, a symlink) is replaced, not kept.
        return self._dir.write(digest.hex, data, keep_existing=st is None, durable=False)

    def put_stream(self, digest: Digest, pieces: Iterable[bytes | memoryview]) -> bool:
        """Written to a temporary file as the pieces come (bounded memory, whatever the
        size), hashed on the way, and put into place only if the sha256 matches."""
        st = self._lstat(digest)
        if st is not None and stat.S_ISREG(st.st_mode):
            return False
        self._ensure_root()
        h = hashlib.sha256()
        with self._dir.create(digest.hex, durable=False) as f:
            for piece in pieces:
                h.update(piece)
                f.write(piece)
            if h.hexdigest() != digest.hex:  # raised inside: nothing is kept
                raise DigestMismatch(f"blob {digest.hex}", digest.hex, h.hexdigest())
        return True

    def sync(self) -> None:
        if not self.root.exists():
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(self.root))
        finally:
            os.close(fd)
