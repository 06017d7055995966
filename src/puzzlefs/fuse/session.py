"""A FUSE session on ``/dev/fuse``, spoken directly: read a request, dispatch it,
write the reply.

Why not libfuse (through pyfuse3): its binding runs every request through trio and
cannot ask the kernel for the things an immutable image allows (no OPEN or OPENDIR
requests at all, directory listings and symlinks cached by the kernel, readdirplus
only, large reads). Here a request costs one ``readv``, a header unpack, one handler
call and one ``writev``.

One or more threads serve a session: each blocks in ``readv`` (the GIL released) and
the kernel hands each request to one of them, so with several, a read waiting for the
disk or a network does not hold up the lookups of other processes, and a thread is
always waiting in ``readv`` when the next request comes (with one, an lstat of every
file took 2.7x as long).

Errors become errnos here and nowhere else: a handler raises :class:`FuseError` for a
chosen errno; a :class:`~puzzlefs.errors.PuzzleFSError` gives its own errno (EIO for
a data request: a missing or corrupt chunk is an I/O error to the reader), logged; any
other exception EIO, logged with its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from puzzlefs.errors import PuzzleFSError
from puzzlefs.fuse import _abi

__all__ = ["FuseError", "Operations", "Reply", "Request", "Session"]

log = logging.getLogger(__name__)

Reply = bytes | memoryview | Sequence[bytes | memoryview] | None


class FuseError(Exception):
    """Raised by a handler: answer this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview  # the request after its header; valid until the handler returns


@dataclass(frozen=True, slots=True)
class Connection:
    """What INIT agreed on."""

    minor: int
    flags: int  # the INIT flags both sides support
    max_readahead: int
    max_pages: int

    @property
    def no_open(self) -> bool:
        return bool(self.flags & _abi.NO_OPEN_SUPPORT)

    @property
    def no_opendir(self) -> bool:
        return bool(self.flags & _abi.NO_OPENDIR_SUPPORT)


class Operations(Protocol):
    """What a filesystem gives the session."""

    def handlers(self) -> dict[int, Callable[[Request], Reply]]:
        """Opcode -> handler. Unlisted opcodes get ENOSYS (or EROFS if they write)."""
        ...

    def negotiated(self, conn: Connection) -> None:
        """What INIT agreed on, before it is answered (no request comes earlier)."""
        ...

    def connected(self, conn: Connection) -> None:
        """INIT was answered: the mount is live."""
        ...


# What we ask the kernel for: an immutable tree may be cached without limit.
WANTED = (
    _abi.ASYNC_READ
    | _abi.PARALLEL_DIROPS
    | _abi.DO_READDIRPLUS
    | _abi.NO_OPEN_SUPPORT
    | _abi.NO_OPENDIR_SUPPORT
    | _abi.CACHE_SYMLINKS
    | _abi.MAX_PAGES
    | _abi.EXPLICIT_INVAL_DATA
    | _abi.BIG_WRITES
)
MAX_PAGES = 256  # 1 MiB per READ
MAX_BACKGROUND = 64  # readahead requests the kernel may have in flight
BUFFER_SIZE = 1 << 17  # any request fits: we accept no writes, names are short


class Session:
    """One mounted filesystem's request loop. ``fd`` is the /dev/fuse descriptor the
    mount was made with (the session closes it when the loop ends)."""

    def __init__(self, fd: int, ops: Operations, *, threads: int = 2) -> None:
        self.fd = fd
        self.ops = ops
        self.threads = max(1, threads)
        self._handlers = ops.handlers()
        self._conn: Connection | None = None
        self._stopping = threading.Event()
        self.done = threading.Event()  # every serving thread has ended
        self._workers: list[threading.Thread] = []
        self._running = 0
        self._count_lock = threading.Lock()

    # -- running ------------------------------------------------------------------
    def start(self) -> None:
        """Serve in ``threads`` threads until the filesystem is unmounted or
        :meth:`stop` is called; :attr:`done` is set when the last one ends."""
        self._running = self.threads
        self._workers = [
            threading.Thread(target=self._serve, name=f"puzzlefs-fuse-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for t in self._workers:
            t.start()

    def run(self) -> None:
        self.start()
        self.join()

    def stop(self) -> None:
        """Serve no further request (threads blocked waiting for one stay blocked
        until the connection ends: when the mount goes, or the process does)."""
        self._stopping.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the serving threads; True if they all ended."""
        return self.done.wait(timeout)

    def _serve(self) -> None:
        try:
            self._loop()
        finally:
            with self._count_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.done.set()

    def _loop(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        fd = self.fd
        unpack = _abi.IN_HEADER.unpack_from
        hsize = _abi.IN_HEADER.size
        handlers = self._handlers
        while not self._stopping.is_set():
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                if e.errno == errno.ENOENT:  # a request interrupted before we read it
                    continue
                if e.errno not in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                    log.error("reading /dev/fuse failed: %s", e)
                break  # unmounted
            if n == 0:  # the other end is gone (only a stand-in kernel does that)
                break
            if n < hsize:
                log.error("short FUSE request (%d bytes)", n)
                continue
            length, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack(buf)
            req = Request(opcode, unique, nodeid, uid, gid, pid, view[hsize:n])
            if opcode == _abi.INIT:
                self._init(req)
                continue
            handler = handlers.get(opcode)
            try:
                if handler is None:
                    if opcode in _abi.NO_REPLY:
                        continue
                    if opcode == _abi.DESTROY:
                        self._reply(unique, None)
                        break
                    raise FuseError(errno.EROFS if opcode in _abi.WRITING else errno.ENOSYS)
                reply = handler(req)
                if opcode in _abi.NO_REPLY:
                    continue
            except FuseError as e:
                self._error(unique, e.errno)
                continue
            except PuzzleFSError as e:
                log.error("%s of inode %d failed: %s", _name(opcode), nodeid, e)
                self._error(unique, errno.EIO if opcode == _abi.READ else e.errno)
                continue
            except Exception:
                log.exception("%s of inode %d failed unexpectedly", _name(opcode), nodeid)
                self._error(unique, errno.EIO)
                continue
            self._reply(unique, reply)

    # -- replies ------------------------------------------------------------------
    def _reply(self, unique: int, reply: Reply) -> None:
        if reply is None:
            parts: Sequence[bytes | memoryview] = ()
        elif isinstance(reply, bytes | bytearray | memoryview):
            parts = (reply,)
        else:
            parts = reply
        size = _abi.OUT_HEADER.size + sum(len(p) for p in parts)
        self._write([_abi.OUT_HEADER.pack(size, 0, unique), *parts])

    def _error(self, unique: int, err: int) -> None:
        self._write([_abi.OUT_HEADER.pack(_abi.OUT_HEADER.size, -err, unique)])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted (its caller gave up or died) and the
            # kernel no longer waits for this reply. ENODEV: unmounted meanwhile.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("replying to the kernel failed: %s", e)

    # -- INIT -----------------------------------------------------------------------
    def _init(self, req: Request) -> None:
        major, minor, max_readahead, flags = _abi.INIT_IN.unpack_from(req.body)
        if major != _abi.KERNEL_MAJOR:
            # A kernel speaking another major version: say which one we speak.
            log.error("the kernel speaks FUSE %d.%d; this needs 7.x", major, minor)
            self._reply(
                req.unique,
                _abi.INIT_OUT.pack(_abi.KERNEL_MAJOR, _abi.KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            )
            return
        agreed = flags & WANTED
        conn = Connection(
            min(minor, _abi.KERNEL_MINOR),
            agreed,
            max_readahead,
            MAX_PAGES if agreed & _abi.MAX_PAGES else 32,
        )
        reply = _abi.INIT_OUT.pack(
            _abi.KERNEL_MAJOR,
            conn.minor,
            max_readahead,
            agreed,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            _abi.MIN_MAX_WRITE,
            1,  # time granularity: ns (all our times are 0 anyway)
            conn.max_pages,
            0,
            0,
        )
        self._conn = conn
        self.ops.negotiated(conn)
        self._reply(req.unique, reply)
        try:
            self.ops.connected(conn)
        except Exception:
            log.exception("the readiness callback failed")

    @property
    def connection(self) -> Connection | None:
        return self._conn


def _name(opcode: int) -> str:
    return _abi.OPCODE_NAMES.get(opcode, f"opcode {opcode}")
