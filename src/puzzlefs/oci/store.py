"""Content-addressed blob stores: one interface, a disk and a memory implementation.

Disk writes are crash-safe without an fsync per blob: each blob is written to an
unnamed file (O_TMPFILE) and linked into place, or where the filesystem cannot, to a
temporary file in the same directory and renamed into place; :meth:`sync` flushes
the whole filesystem once before index.json (the only thing that makes blobs
reachable) is replaced.

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
import errno
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import BlobNotFound, DigestMismatch, ImageError
from puzzlefs.oci._lock import flocked

_libc = ctypes.CDLL(None, use_errno=True)


# O_TMPFILE unsupported by the filesystem (EOPNOTSUPP, EISDIR on old kernels,
# EINVAL), or /proc/self/fd missing (ENOENT), not allowed (EACCES, EPERM) or
# not linkable (EXDEV).
_NO_TMPFILE = {
    errno.EOPNOTSUPP,
    errno.EISDIR,
    errno.EINVAL,
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EXDEV,
}


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class BlobStore(ABC):
    """Blobs by sha256. ``get`` verifies content unless told the caller will."""

    @abstractmethod
    def has(self, digest: Digest) -> bool: ...

    @abstractmethod
    def size(self, digest: Digest) -> int: ...

    @abstractmethod
    def _read(self, digest: Digest) -> bytes: ...

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

    def get(self, digest: Digest, *, verify: bool = True) -> bytes:
        data = self._read(digest)
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
        return len(self._read(digest))

    def _read(self, digest: Digest) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobNotFound(f"blob not found: {digest}") from None

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
        self._tmpfile = True  # O_TMPFILE works here (until it fails once)

    def path(self, digest: Digest) -> Path:
        return self.root / digest.hex

    # The lock is the blob directory's own (through any symlink), so layouts that share
    # a store share its lock.
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._ensure_root()
        with flocked(self.root, shared=True):
            yield

    @contextlib.contextmanager
    def collecting(self, *, wait: bool = True) -> Iterator[bool]:
        self._ensure_root()
        with flocked(self.root, wait=wait) as locked:
            yield locked

    def _ensure_root(self) -> None:
        if not self._made:
            self.root.mkdir(parents=True, exist_ok=True)
            self._made = True

    def has(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob not found: {digest}") from None

    def _read(self, digest: Digest) -> bytes:
        try:
            with open(self.path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(f"blob not found: {digest}") from None
        except IsADirectoryError:
            raise ImageError(f"blob {digest} is not a regular file") from None

    def put_verified(self, digest: Digest, data: bytes | memoryview) -> bool:
        # A build stores thousands of blobs: plain os calls on str paths, no pathlib.
        final = os.path.join(self.root, digest.hex)
        if os.path.exists(final):
            return False
        self._ensure_root()
        if self._tmpfile:
            try:
                return self._put_unnamed(digest.hex, data)
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
                self._tmpfile = False  # this filesystem (or /proc) cannot: named files
        return self._put_named(digest.hex, data)

    def _put_unnamed(self, name: str, data: bytes | memoryview) -> bool:
        """An O_TMPFILE file, linked into place once written: one directory update
        instead of a create and a rename, and nothing to clean up if we fail."""
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            try:
                _write_all(fd, data)
                os.fchmod(fd, 0o644)  # whatever the umask
                # A dir_fd makes Python use linkat(), which can follow the /proc link
                # (plain link() would try to link the symlink itself).
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                return False  # another writer stored the same bytes first
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)
        return True

    def _put_named(self, name: str, data: bytes | memoryview) -> bool:
        """A temporary file in the same directory, renamed into place once written."""
        tmp = os.path.join(self.root, f".tmp-{name}-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, data)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.root, name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True

    def put_stream(self, digest: Digest, pieces: Iterable[bytes | memoryview]) -> bool:
        """Written to a temporary file as the pieces come (bounded memory, whatever the
        size), hashed on the way, and renamed into place only if the sha256 matches."""
        final = os.path.join(self.root, digest.hex)
        if os.path.exists(final):
            return False
        self._ensure_root()
        tmp = os.path.join(self.root, f".tmp-{digest.hex}-{os.getpid()}-{threading.get_ident()}")
        h = hashlib.sha256()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                for piece in pieces:
                    h.update(piece)
                    _write_all(fd, piece)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            if h.hexdigest() != digest.hex:
                raise DigestMismatch(f"blob {digest.hex}", digest.hex, h.hexdigest())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
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
