"""The pyfuse3 adapter: a protocol translator over :mod:`puzzlefs.reader`, nothing more.

Inode numbers in (the image's own; the root is 1, as FUSE wants), ``EntryAttributes``
and bytes out. Every handler's errors are translated in one place, :func:`_handler`:
a :class:`~puzzlefs.errors.PuzzleFSError` becomes its ``errno``, anything else EIO
with a traceback in the log, so only ``FUSEError`` ever reaches pyfuse3. Data errors
(a missing, corrupt or tampered chunk blob) are logged with the blob's digest and
give EIO to the reader; the rest of the tree keeps working.

pyfuse3 runs every handler on one trio thread, and so do reads here, blob loading
included. Handing cache misses to worker threads (``trio.to_thread``, or a pool of
loaders the loop awaits) measured slower: a cold ``tar`` of a large tree took 1.35 to
1.5 times as long (the threads and the loop fight over the GIL, and hashing is most of
a load), and eight concurrent random readers were no faster on a compressed image and
slower on a plain one. What helps is the reader's readahead, which has the kernel fetch
the next blobs in parallel while the loop works.

Images are immutable, so the kernel may cache everything for as long as it likes:
long entry and attribute timeouts, negative lookups cached, ``keep_cache`` on open.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from puzzlefs.errors import PuzzleFSError
from puzzlefs.format import Inode, Kind
from puzzlefs.reader import Image, InodeAttr, NotFound

__all__ = ["TIMEOUT", "PuzzleFS"]

log = logging.getLogger(__name__)

TIMEOUT = 365 * 24 * 3600.0  # seconds; the image never changes under the kernel
BLKSIZE = 128 * 1024  # st_blksize: the kernel's read size, a hint for cp and friends
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[Concatenate["PuzzleFS", P], Coroutine[Any, Any, R]]


def _handler(*, data: bool = False) -> Callable[[Handler[P, R]], Handler[P, R]]:
    """The one place where errors become errnos.

    ``data``: the handler serves file contents; every failure there is EIO (a chunk
    blob that is missing is an I/O error to the reader, not "no such file").
    """

    def wrap(fn: Handler[P, R]) -> Handler[P, R]:
        async def wrapper(self: PuzzleFS, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except NotFound as e:
                if data:
                    log.error("%s failed: %s", self._what(fn.__name__, args), e)
                raise pyfuse3.FUSEError(errno.EIO if data else e.errno) from None
            except PuzzleFSError as e:
                log.error("%s failed: %s", self._what(fn.__name__, args), e)
                raise pyfuse3.FUSEError(errno.EIO if data else e.errno) from None
            except Exception:
                log.exception("%s failed unexpectedly", self._what(fn.__name__, args))
                raise pyfuse3.FUSEError(errno.EIO) from None

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return wrap


class PuzzleFS(pyfuse3.Operations):
    """A read-only view of one opened :class:`~puzzlefs.reader.Image`.

    ``on_ready`` is called once, when the kernel's INIT request arrives: from then on
    the mount answers requests (the daemon uses it to report readiness).
    """

    supports_dot_lookup = False  # no NFS export: we keep no parent pointers
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        image: Image,
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.image = image
        self.on_ready = on_ready
        self._files: dict[int, Inode] = {}
        self._dirs: dict[int, list[tuple[bytes, Inode]]] = {}
        self._next_fh = 1

    # -- plumbing -----------------------------------------------------------------
    def init(self) -> None:
        # Must not raise (pyfuse3 calls it from C while answering INIT).
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception("readiness callback failed")

    def _what(self, op: str, args: tuple[Any, ...]) -> str:
        """For log lines: the operation and the inode it was about."""
        subject = args[0] if args else None
        if op == "read" and isinstance(subject, int) and subject in self._files:
            return f"read of inode {self._files[subject].ino}"
        return op if op == "readdir" else f"{op} of inode {subject}"

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return _entry_attributes(self.image.attr(inode))

    def _inode(self, ino: int) -> Inode:
        return self.image.inode(ino)

    # -- metadata -----------------------------------------------------------------
    @_handler()
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if parent.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._entry(parent)
        try:
            child = self.image.lookup(parent, name)
        except NotFound:
            # A negative entry the kernel may cache as long as a positive one.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._entry(child)

    @_handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._inode(inode))

    @_handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.kind is not Kind.LNK or node.symlink_target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.symlink_target

    @_handler()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        for key, value in self._inode(inode).xattrs:
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_handler()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [key for key, _ in self._inode(inode).xattrs]

    @_handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data_bytes, inodes = self.image.usage()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (data_bytes + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = inodes
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------------
    @_handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._inode(inode)
        if node.kind is not Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # One listing per open: offsets stay stable across readdir calls, and a
        # large directory is listed once, not once per reply buffer.
        fh = self._fh()
        self._dirs[fh] = self.image.listdir(node)
        return fh

    @_handler()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(child), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------
    @_handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._inode(inode)
        if node.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind is Kind.DIR else errno.EINVAL)
        fh = self._fh()
        self._files[fh] = node
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_handler(data=True)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return self.image.read(node, off, size)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Nothing to forget: inodes are decoded on demand and live in bounded caches.
        pass

    # -- everything that writes: read-only (the mount is ``ro`` too) -------------
    async def setattr(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any, **kwargs: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any, **kwargs: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any, **kwargs: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any, **kwargs: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any, **kwargs: Any) -> tuple[pyfuse3.FileInfo, Any]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any, **kwargs: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any, **kwargs: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any, **kwargs: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)


def _entry_attributes(a: InodeAttr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = TIMEOUT
    e.attr_timeout = TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = BLKSIZE
    e.st_blocks = a.blocks
    # Times stay 0 (the epoch): the format stores none.
    return e
