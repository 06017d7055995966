"""A blob store that fails on purpose, for fault tests.

It is a real :class:`DiskBlobStore` (the blobs it does store are ordinary blobs of the
directory), not a monkeypatch: the faults are part of its behaviour, chosen when it
is made, and shared with the worker processes a build forks (the counter lives in
shared memory), so "the 5th blob of the build fails" means the 5th of the whole build.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.oci import DiskBlobStore


class FaultyBlobStore(DiskBlobStore):
    """``fail_put_after=N``: every put after the first N new blobs raises
    ``OSError(put_errno)`` (ENOSPC: a full disk) before writing anything.
    ``fail_sync``: :meth:`sync` raises ``OSError(fail_sync)``.
    ``fail_read``: reading these blobs raises ``OSError(EIO)`` (a bad sector)."""

    def __init__(
        self,
        root: Path,
        *,
        fail_put_after: int | None = None,
        put_errno: int = errno.ENOSPC,
        fail_sync: int | None = None,
        fail_read: set[Digest] | None = None,
    ) -> None:
        super().__init__(root)
        self.fail_put_after = fail_put_after
        self.put_errno = put_errno
        self.fail_sync = fail_sync
        self.fail_read = fail_read or set()
        self._puts = multiprocessing.get_context("fork").Value("q", 0)

    @property
    def puts(self) -> int:
        """New blobs stored so far (by this process and the build's workers)."""
        return int(self._puts.value)

    def put_verified(self, digest: Digest, data: bytes | memoryview) -> bool:
        if self.has(digest):
            return False
        if self.fail_put_after is not None:
            with self._puts.get_lock():
                if self._puts.value >= self.fail_put_after:
                    raise OSError(self.put_errno, os.strerror(self.put_errno), str(self.root))
                self._puts.value += 1
        return super().put_verified(digest, data)

    def sync(self) -> None:
        if self.fail_sync is not None:
            raise OSError(self.fail_sync, os.strerror(self.fail_sync), str(self.root))
        super().sync()

    def _read(self, digest: Digest, size: int | None, limit: int | None) -> bytes:
        if digest in self.fail_read:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.path(digest)))
        return super()._read(digest, size, limit)
