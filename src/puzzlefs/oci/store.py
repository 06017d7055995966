"""Content-addressed blob stores: one interface, a disk and a memory implementation.

Disk writes are crash-safe without an fsync per blob: each blob is written to a
temporary file in the same directory and renamed into place, and :meth:`sync` flushes
the whole filesystem once before index.json (the only thing that makes blobs
reachable) is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import BlobNotFound, DigestMismatch, ImageError

_libc = ctypes.CDLL(None, use_errno=True)


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

    def path(self, digest: Digest) -> Path:
        return self.root / digest.hex

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
        final = self.path(digest)
        if final.exists():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{digest.hex}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
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
