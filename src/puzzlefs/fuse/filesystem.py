"""The puzzlefs filesystem on the FUSE session: a translator from requests to the
image's tables (metadata) and chunk reader (data), nothing more.

Inode numbers are the image's own (the root is 1). The image never changes, so the
kernel may keep everything: entries, negative entries and attributes for a year, no
OPEN or OPENDIR requests at all (the kernel then keeps file pages and directory
listings cached across opens), symlink targets cached, and listings only as
readdirplus (each subdirectory arrives with its attributes, so a walk needs no LOOKUP to
descend; other names are looked up when they are used).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from puzzlefs.errors import MetadataError
from puzzlefs.fuse import _abi
from puzzlefs.fuse.session import Connection, FuseError, Reply, Request
from puzzlefs.reader._cache import LRU
from puzzlefs.reader._tables import ENTRY, INODE, INODE_KIND, Attr, Tables

if TYPE_CHECKING:
    from puzzlefs.reader._data import ChunkReader

__all__ = ["TIMEOUT", "ImageFS"]

log = logging.getLogger(__name__)

TIMEOUT = 365 * 24 * 3600  # seconds: the image never changes under the kernel
BLKSIZE = 128 * 1024  # st_blksize: the kernel's read size, a hint for cp and friends
NAME_MAX = 255
_CHUNK_LISTS = 4096  # files whose chunk lists are kept decoded (open files, mostly)


class ImageFS:
    """Serves one image. ``on_live`` is called once INIT has been answered."""

    def __init__(
        self,
        tables: Tables,
        data: ChunkReader | Callable[[], ChunkReader],
        *,
        stored_bytes: int | Callable[[], int] = 0,
        on_live: Callable[[Connection], None] | None = None,
        allow_uids: frozenset[int] | None = None,
        serial_reads: bool = False,
    ) -> None:
        self.tables = tables
        # One READ at a time, where reads wait only for the local disk (and the loaders
        # do most of that): two serving threads decoding at once only pass the GIL back
        # and forth (a cold tar of a -c image took 10-20% longer), while metadata
        # requests, which need the second thread, never wait for a read.
        self._read_lock = threading.Lock() if serial_reads else None
        # A ChunkReader is not callable; a factory is.
        self._make_data = data if callable(data) else None
        self._data = None if callable(data) else data
        self._data_lock = threading.Lock()
        self._stored_bytes = stored_bytes
        self.on_live = on_live
        self.allow_uids = allow_uids
        self.conn: Connection | None = None
        self._chunks: LRU[int, tuple[list[int], list[tuple[int, int, int, bool]]]] = LRU(
            _CHUNK_LISTS
        )

    # -- the session's side --------------------------------------------------------
    def handlers(self) -> dict[int, Callable[[Request], Reply]]:
        table: dict[int, Callable[[Request], Reply]] = {
            _abi.LOOKUP: self.lookup,
            _abi.GETATTR: self.getattr,
            _abi.READLINK: self.readlink,
            _abi.OPEN: self.open,
            _abi.OPENDIR: self.opendir,
            _abi.READ: self.read,
            _abi.READDIR: self.readdir,
            _abi.READDIRPLUS: self.readdirplus,
            _abi.RELEASE: _nothing,
            _abi.RELEASEDIR: _nothing,
            _abi.STATFS: self.statfs,
            _abi.GETXATTR: self.getxattr,
            _abi.LISTXATTR: self.listxattr,
            _abi.FORGET: _nothing,  # inodes are rows of the tables: nothing to forget
            _abi.BATCH_FORGET: _nothing,
            _abi.INTERRUPT: _nothing,  # every request is short: let it finish
        }
        if self.tables.xattr_count == 0:
            # No inode has one: answering ENOSYS once tells the kernel to ask no more
            # (getxattr then fails with EOPNOTSUPP at once, as on a filesystem without
            # xattrs). `ls -l` asks two of each file it lists, and `exec` one: 5,865
            # round trips for a directory of 3,000, 45% of its requests.
            del table[_abi.GETXATTR]
        if self.allow_uids is not None:
            return {op: self._guarded(h) for op, h in table.items()}
        return table

    def negotiated(self, conn: Connection) -> None:
        self.conn = conn

    def connected(self, conn: Connection) -> None:
        if self.on_live is not None:
            self.on_live(conn)
        threading.Thread(target=self._prepare, name="puzzlefs-prepare", daemon=True).start()

    def _prepare(self) -> None:
        """Beside the first requests: the index read ahead, and the chunk reader made
        (by the first read, its imports alone held that read up for 50 ms on a cold
        page cache)."""
        self.tables.prefetch()
        try:
            self.data  # noqa: B018  # made and kept
        except Exception as e:  # the first read meets it again, and says so
            log.debug("preparing the chunk reader: %s", e)

    def _guarded(self, handler: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
        """``-o allow_root``: the kernel lets everyone in (allow_other), we only the
        mounting user and root."""
        allowed = self.allow_uids or frozenset()

        def guarded(req: Request) -> Reply:
            if req.uid not in allowed and req.opcode not in _abi.NO_REPLY:
                raise FuseError(errno.EACCES)
            return handler(req)

        return guarded

    @property
    def data(self) -> ChunkReader:
        """The chunk reader, made on first use when given as a factory."""
        data = self._data
        if data is None:
            with self._data_lock:
                if self._data is None:
                    assert self._make_data is not None
                    self._data = self._make_data()
                data = self._data
        return data

    @property
    def stored_bytes(self) -> int:
        value = self._stored_bytes
        if callable(value):
            value = self._stored_bytes = value()
        return value

    # -- helpers --------------------------------------------------------------------
    def _attr(self, nodeid: int) -> Attr:
        row = self.tables.row_of(nodeid)
        if row is None:
            raise FuseError(errno.ENOENT)
        return self.tables.attr(row)

    def _attr_fields(self, row: int) -> tuple[int, ...]:
        """A row as the fields of struct fuse_attr (the times: mtime for all three)."""
        ino, size, mode, nlink, uid, gid, a, b, _, _, t, tn, _ = self.tables.raw_attr(row)
        return (
            ino, size, (size + 511) >> 9, t, t, t, tn, tn, tn,
            mode, nlink, uid, gid, _rdev(mode, a, b), BLKSIZE, 0,
        )  # fmt: skip

    def _entry(self, row: int) -> bytes:
        fields = self._attr_fields(row)
        return _abi.ENTRY_OUT.pack(fields[0], 0, TIMEOUT, TIMEOUT, 0, 0, *fields)

    # -- metadata -----------------------------------------------------------------
    def lookup(self, req: Request) -> Reply:
        parent = self._attr(req.nodeid)
        if parent.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        body = req.body
        end = bytes(body).find(b"\0")
        name = bytes(body[: end if end >= 0 else len(body)])
        if len(name) > NAME_MAX:  # FUSE allows longer; no name in an image is
            raise FuseError(errno.ENAMETOOLONG)
        row = self.tables.lookup(parent, name)
        if row is None:
            # A negative entry the kernel may cache as long as a positive one.
            return _NEGATIVE
        return self._entry(row)

    def getattr(self, req: Request) -> Reply:
        row = self.tables.row_of(req.nodeid)
        if row is None:
            raise FuseError(errno.ENOENT)
        return _abi.ATTR_OUT.pack(TIMEOUT, 0, 0, *self._attr_fields(row))

    def readlink(self, req: Request) -> Reply:
        attr = self._attr(req.nodeid)
        if attr.kind != stat.S_IFLNK:
            raise FuseError(errno.EINVAL)
        return self.tables.symlink_target(attr)

    def statfs(self, req: Request) -> Reply:
        blocks = (self.stored_bytes + 4095) // 4096
        return _abi.STATFS_OUT.pack(blocks, 0, 0, self.tables.count, 0, 4096, NAME_MAX, 4096, 0)

    def getxattr(self, req: Request) -> Reply:
        size, _ = _abi.GETXATTR_IN.unpack_from(req.body)
        raw = bytes(req.body[_abi.GETXATTR_IN.size :])
        name = raw[: raw.find(b"\0")] if b"\0" in raw else raw
        for key, value in self.tables.xattrs(self._attr(req.nodeid)):
            if key == name:
                return _sized(value, size)
        raise FuseError(errno.ENODATA)

    def listxattr(self, req: Request) -> Reply:
        size, _ = _abi.GETXATTR_IN.unpack_from(req.body)
        keys = b"".join(k + b"\0" for k, _ in self.tables.xattrs(self._attr(req.nodeid)))
        return _sized(keys, size)

    # -- opening: the kernel need not ask (no-open); when it does, keep its caches ----
    def open(self, req: Request) -> Reply:
        if self.conn is not None and self.conn.no_open:
            raise FuseError(errno.ENOSYS)
        flags, _ = _abi.GETXATTR_IN.unpack_from(req.body)  # fuse_open_in: flags, open_flags
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        if self._attr(req.nodeid).kind != stat.S_IFREG:
            raise FuseError(errno.EISDIR)
        return _abi.OPEN_OUT.pack(0, _abi.FOPEN_KEEP_CACHE, 0)

    def opendir(self, req: Request) -> Reply:
        if self.conn is not None and self.conn.no_opendir:
            raise FuseError(errno.ENOSYS)
        if self._attr(req.nodeid).kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        return _abi.OPEN_OUT.pack(0, _abi.FOPEN_KEEP_CACHE | _abi.FOPEN_CACHE_DIR, 0)

    # -- directories --------------------------------------------------------------
    def readdir(self, req: Request) -> Reply:
        return self._listing(req, plus=False)

    def readdirplus(self, req: Request) -> Reply:
        return self._listing(req, plus=True)

    def _listing(self, req: Request, *, plus: bool) -> Reply:
        """Entries from the requested position on, as many as fit, packed straight
        from the tables into one buffer (find and ls spend most of their requests
        here: no objects per entry).

        A readdirplus entry carries its attributes only for a directory. For any other
        entry the kernel gets none (node id 0, which it takes as "no attributes given",
        not as a missing name): it then makes no inode for it until someone looks it
        up. `find` descends every directory and looks at no file, and a program
        listing a directory opens a few of its names, while an inode made for each
        entry cost the kernel about 3-4 us (a cold `find` of 10k entries spent 30-50
        ms of system time there); a stat of a name not yet looked up costs one LOOKUP,
        as on squashfuse."""
        directory = self._attr(req.nodeid)
        if directory.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        _, offset, size, _, _, _, _ = _abi.READ_IN.unpack_from(req.body)
        first, count = directory.a, directory.b
        if offset >= count:
            return b""
        buf, inodes_at, entries_at, strings = self.tables.raw_tables()
        unpack_entry, entry_size = ENTRY.unpack_from, ENTRY.size
        unpack_inode, inode_size = INODE.unpack_from, INODE.size
        head_size = (_abi.DIRENTPLUS if plus else _abi.DIRENT).size
        # Where the dirent starts in a record: after the (zeroed) entry_out in a plus one.
        dirent_at = head_size - _abi.DIRENT.size
        pack_plus, pack_dirent = _abi.DIRENTPLUS.pack_into, _abi.DIRENT.pack_into
        out = bytearray(size)  # zeroed: an entry_out left alone has node id 0
        pos = 0
        unpack_kind = INODE_KIND.unpack_from
        at = entries_at + (first + offset) * entry_size
        for off in range(offset + 1, count + 1):  # a record's off: where the next one is
            row, name_at, name_len, _ = unpack_entry(buf, at)
            at += entry_size
            rec = (head_size + name_len + 7) & ~7
            if pos + rec > size:
                break
            inode_at = inodes_at + row * inode_size
            ino, mode = unpack_kind(buf, inode_at)
            if plus and mode & _S_IFMT == stat.S_IFDIR:
                _, isize, _, nlink, uid, gid, _, _, _, _, t, tn, _ = unpack_inode(buf, inode_at)
                pack_plus(
                    out, pos,
                    ino, 0, TIMEOUT, TIMEOUT, 0, 0,
                    ino, isize, (isize + 511) >> 9, t, t, t, tn, tn, tn,
                    mode, nlink, uid, gid, 0, BLKSIZE, 0,
                    ino, off, name_len, mode >> 12,
                )  # fmt: skip
            else:
                pack_dirent(out, pos + dirent_at, ino, off, name_len, mode >> 12)
            start = pos + head_size
            out[start : start + name_len] = strings[name_at : name_at + name_len]
            pos += rec
        return memoryview(out)[:pos]

    # -- files --------------------------------------------------------------------
    def read(self, req: Request) -> Reply:
        if self._read_lock is None:
            return self._read(req)
        with self._read_lock:
            return self._read(req)

    def _read(self, req: Request) -> Reply:
        _, offset, size, _, _, _, _ = _abi.READ_IN.unpack_from(req.body)
        row = self.tables.row_of(req.nodeid)
        if row is None:
            raise FuseError(errno.ENOENT)
        cached = self._chunks.get(row)
        attr = self.tables.attr(row)
        if attr.kind != stat.S_IFREG:
            raise FuseError(errno.EISDIR if attr.kind == stat.S_IFDIR else errno.EINVAL)
        if cached is None:
            pieces = self.tables.chunks(attr)
            cached = ([p[0] for p in pieces], pieces)
            self._chunks.put(row, cached)
        starts, pieces = cached
        end = min(offset + size, attr.size)
        if offset >= end:
            return b""
        i = bisect.bisect_right(starts, offset) - 1
        reads: list[tuple[bytes, bool, int, int, int]] = []
        pos = offset
        while pos < end and i < len(pieces):
            file_off, blob_off, blob, compressed = pieces[i]
            piece_end = starts[i + 1] if i + 1 < len(pieces) else attr.size
            n = min(piece_end, end) - pos
            digest, _ = self.tables.blob(blob)
            reads.append(
                (digest, compressed, blob_off + pos - file_off, n, blob_off + piece_end - file_off)
            )
            pos += n
            i += 1
        if pos < end:
            raise MetadataError(f"inode {attr.ino}: its chunks end before its size")
        return self.data.read_request(reads)


def _nothing(req: Request) -> Reply:
    return None


def _rdev(mode: int, a: int, b: int) -> int:
    fmt = mode & 0o170000
    if fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
        return (b & 0xFF) | (a << 8) | ((b & ~0xFF) << 12)
    return 0


def _sized(value: bytes, size: int) -> bytes:
    """The getxattr/listxattr protocol: size 0 asks how large; too small is ERANGE."""
    if size == 0:
        return _abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value


_S_IFMT = 0o170000  # the file type bits (stat.S_IFMT, without a call per entry)
_NEGATIVE = _abi.ENTRY_OUT.pack(0, 0, TIMEOUT, 0, 0, 0, *([0] * 16))
