"""The image's tree as compact tables: what a mount serves metadata from.

Built once from the rootfs (all layers merged, whiteouts applied, every field checked),
written as one file, and read back with ``mmap``: opening a 300,000-inode image then
costs a checksum of that file, not a decode of the rootfs, and serving a request costs
a few ``struct`` unpacks, not Python objects per inode.

The file, little-endian, every section 8-byte aligned:

    header        magic, version, counts, section offsets, the digest of what it was
                  made from (the rootfs's sha256, with times that of both blobs),
                  last the sha256 of every other byte of the file
    inodes        sorted by inode number, one 64-byte record each:
                  ino u64, size u64, mode u32, nlink u32, uid u32, gid u32,
                  a u32, b u32, first xattr u32, xattr count u32,
                  mtime seconds i64, nanoseconds u32, 0 u32
                  a, b: directories -> first entry, entry count;
                  files -> first chunk, chunk count; symlinks -> target
                  offset, length in strings; devices -> major, minor
    entries       16 bytes: row of the child, name offset, name length, 0;
                  each directory's entries sorted by name bytes
    chunks        24 bytes: offset in the file, offset in the blob (uncompressed),
                  blob number, 1 if compressed
    blobs         64 bytes: sha256, fs-verity digest (zeros: none recorded)
    xattrs        16 bytes: key offset, key length, value offset, value length
    strings       names, symlink targets, xattr keys and values; last, the
                  problems the build found (UTF-8 lines)

What the tables hold is what a reader of the image may see: names that are single
path components; no inode that is deleted, of an unknown kind, or whose fields Linux
cannot represent (sizes above 2**63-1, device numbers beyond 12:20 bits, symlink
targets that are empty, contain NUL or exceed PATH_MAX); no xattr with an invalid
key or an oversized value; and each directory reachable from the root by exactly one
entry (no loops, no second parents). Everything hidden is counted in ``problems``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from puzzlefs.errors import MetadataError

if TYPE_CHECKING:
    from puzzlefs.format._bulk import DecodedRootfs

__all__ = ["Attr", "Tables", "build_tables"]

MAGIC = b"PZFSIDX\0"
VERSION = 2
HEADER = struct.Struct("<8sII" + "Q" * 14 + "32s32s")
INODE = struct.Struct("<QQIIIIIIIIqII")
INODE_KIND = struct.Struct("<Q8xI")  # an INODE record's ino and mode (its size skipped)
ENTRY = struct.Struct("<IIII")
CHUNK = struct.Struct("<QQII")
BLOB = struct.Struct("<32s32s")
XATTR = struct.Struct("<IIII")

MAX_NAME = 255
MAX_TARGET = 4095  # PATH_MAX - 1
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_SIZE = (1 << 63) - 1
_NO_VERITY = bytes(32)

# Union member (as puzzlefs.format.Kind names them) -> the file type bits of st_mode.
FILE_TYPES = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "lnk": stat.S_IFLNK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
    "sock": stat.S_IFSOCK,
}


@dataclass(frozen=True, slots=True)
class Attr:
    """One inode as the tables give it."""

    row: int
    ino: int
    size: int
    mode: int
    nlink: int
    uid: int
    gid: int
    a: int
    b: int
    xattr_first: int
    xattr_count: int
    mtime: int  # seconds
    mtime_nsec: int
    _pad: int = 0

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def rdev(self) -> int:
        """Major and minor in the kernel's 32-bit encoding (``new_encode_dev``)."""
        if self.kind in (stat.S_IFCHR, stat.S_IFBLK):
            return (self.b & 0xFF) | (self.a << 8) | ((self.b & ~0xFF) << 12)
        return 0


class Tables:
    """A read-only view of an index file's bytes (an mmap, or bytes for tests)."""

    def __init__(self, buf: Any, *, verify: bool = True) -> None:
        if len(buf) < HEADER.size:
            raise MetadataError("index too short")
        head = HEADER.unpack_from(buf, 0)
        magic, version = head[0], head[1]
        if magic != MAGIC or version != VERSION:
            raise MetadataError("not a puzzlefs index of this version")
        (
            self.count,
            self.entry_count,
            self.chunk_count,
            self.blob_count,
            self.xattr_count,
            strings_size,
            self._inodes_at,
            self._entries_at,
            self._chunks_at,
            self._blobs_at,
            self._xattrs_at,
            self._strings_at,
            notes_size,
            self._end,
        ) = head[3:17]
        self.source: bytes = head[17]  # what it was made from (reader.index.source_key)
        body_sha256: bytes = head[18]
        if (
            self._end != len(buf)
            or self._strings_at + strings_size != self._end
            or notes_size > strings_size
        ):
            raise MetadataError("index size does not match its header")
        sections = [
            (self._inodes_at, self.count * INODE.size),
            (self._entries_at, self.entry_count * ENTRY.size),
            (self._chunks_at, self.chunk_count * CHUNK.size),
            (self._blobs_at, self.blob_count * BLOB.size),
            (self._xattrs_at, self.xattr_count * XATTR.size),
        ]
        pos = HEADER.size
        for at, size in sections:
            if at < pos or at % 8:
                raise MetadataError("index sections out of order")
            pos = at + size
        if pos > self._strings_at:
            raise MetadataError("index sections overlap")
        self._buf = buf
        if verify:
            with memoryview(buf) as view:  # released before any error: buf may close
                sound = _checksum(view) == body_sha256
            if not sound:
                raise MetadataError("index checksum mismatch")
        self._view = memoryview(buf)
        self._strings = self._view[self._strings_at : self._end]
        self.problems = (
            bytes(self._view[self._end - notes_size : self._end])
            .decode(errors="replace")
            .splitlines()
            if notes_size
            else []
        )
        first = self._ino_at(0) if self.count else 0
        last = self._ino_at(self.count - 1) if self.count else -1
        self._dense_base = first if last - first + 1 == self.count else None
        root = self.row_of(1)
        if root is None or self.attr(root).kind != stat.S_IFDIR:
            self.close()
            raise MetadataError("the image has no root directory")
        self.root_row = root

    # -- inodes ---------------------------------------------------------------------
    def _ino_at(self, row: int) -> int:
        value: int = struct.unpack_from("<Q", self._buf, self._inodes_at + row * INODE.size)[0]
        return value

    def row_of(self, ino: int) -> int | None:
        """The row of inode ``ino``, or None (deleted, bad, or never stored)."""
        base = self._dense_base
        if base is not None:
            row = ino - base
            return row if 0 <= row < self.count else None
        row = bisect.bisect_left(range(self.count), ino, key=self._ino_at)
        return row if row < self.count and self._ino_at(row) == ino else None

    def attr(self, row: int) -> Attr:
        return Attr(row, *INODE.unpack_from(self._buf, self._inodes_at + row * INODE.size))

    def raw_attr(self, row: int) -> tuple[int, ...]:
        """The record's fields as a tuple (ino, size, mode, nlink, uid, gid, a, b, xa, xn,
        mtime, mtime_nsec, 0): for the hot paths that pack them into replies."""
        return INODE.unpack_from(self._buf, self._inodes_at + row * INODE.size)

    # -- directories ---------------------------------------------------------------
    def entry(self, index: int) -> tuple[int, bytes]:
        """(child row, name) of entry ``index``."""
        row, off, length, _ = ENTRY.unpack_from(self._buf, self._entries_at + index * ENTRY.size)
        return row, bytes(self._strings[off : off + length])

    def _entry_name(self, index: int) -> bytes:
        _, off, length, _ = ENTRY.unpack_from(self._buf, self._entries_at + index * ENTRY.size)
        return bytes(self._strings[off : off + length])

    def lookup(self, directory: Attr, name: bytes) -> int | None:
        """The row of ``name`` in ``directory``, or None."""
        lo, hi = directory.a, directory.a + directory.b
        i = bisect.bisect_left(range(lo, hi), name, key=self._entry_name) + lo
        if i < hi:
            row, found = self.entry(i)
            if found == name:
                return row
        return None

    def raw_tables(self) -> tuple[Any, int, int, memoryview]:
        """For the hot loop that packs whole listings (the FUSE readdirplus): the
        buffer, the offsets of the inode and entry tables (records INODE and ENTRY),
        and the strings. Read-only."""
        return self._buf, self._inodes_at, self._entries_at, self._strings

    def entries(self, directory: Attr, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
        """(position, child row, name) from position ``start`` on."""
        for i in range(directory.a + start, directory.a + directory.b):
            row, name = self.entry(i)
            yield i - directory.a, row, name

    # -- other inode data ------------------------------------------------------------
    def symlink_target(self, attr: Attr) -> bytes:
        return bytes(self._strings[attr.a : attr.a + attr.b])

    def xattrs(self, attr: Attr) -> list[tuple[bytes, bytes]]:
        out = []
        for i in range(attr.xattr_first, attr.xattr_first + attr.xattr_count):
            koff, klen, voff, vlen = XATTR.unpack_from(self._buf, self._xattrs_at + i * XATTR.size)
            out.append(
                (bytes(self._strings[koff : koff + klen]), bytes(self._strings[voff : voff + vlen]))
            )
        return out

    def chunks(self, attr: Attr) -> list[tuple[int, int, int, bool]]:
        """A file's pieces: (offset in the file, offset in the blob, blob, compressed)."""
        base = self._chunks_at
        return [
            (fo, bo, blob, bool(comp))
            for fo, bo, blob, comp in (
                CHUNK.unpack_from(self._buf, base + i * CHUNK.size)
                for i in range(attr.a, attr.a + attr.b)
            )
        ]

    def file_totals(self) -> tuple[int, int]:
        """(regular files, their bytes), each inode once: for progress totals."""
        files = size = 0
        for row in range(self.count):
            _, n, mode, *_ = INODE.unpack_from(self._buf, self._inodes_at + row * INODE.size)
            if stat.S_ISREG(mode):
                files += 1
                size += n
        return files, size

    def blob(self, index: int) -> tuple[bytes, bytes | None]:
        """(sha256, fs-verity digest or None) of chunk blob ``index``."""
        digest, verity = BLOB.unpack_from(self._buf, self._blobs_at + index * BLOB.size)
        return digest, (None if verity == _NO_VERITY else verity)

    def blobs(self) -> Iterator[tuple[bytes, bytes | None]]:
        for i in range(self.blob_count):
            yield self.blob(i)

    def prefetch(self) -> None:
        """Have the kernel read the whole index file in the background (a mapped one):
        a cold walk of the tree then finds its pages in memory instead of faulting
        them in one random read at a time."""
        if isinstance(self._buf, mmap.mmap):
            with contextlib.suppress(OSError, ValueError):  # a hint; closed meanwhile
                self._buf.madvise(mmap.MADV_WILLNEED)

    def close(self) -> None:
        self._strings.release()
        self._view.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()


def _checksum(buf: Any) -> bytes:
    """The sha256 of the whole file but the checksum field (the header's last 32
    bytes): every other byte, header included, is covered."""
    h = hashlib.sha256(buf[: HEADER.size - 32])
    h.update(buf[HEADER.size :])
    return h.digest()


# -- building ---------------------------------------------------------------------------


@dataclass
class Built:
    data: bytes
    problems: list[str] = field(default_factory=list)


def build_tables(decoded: DecodedRootfs, source: bytes, times: bytes | None) -> Built:
    """Merge the layers of a decoded rootfs (and the image's times blob, if any) into
    the index file's bytes."""
    from puzzlefs.reader import _tablebuild

    return _tablebuild.build(decoded, source, times)


def open_tables(path: str, *, verify: bool = True) -> Tables:
    """Map an index file (owned by us, not writable by others) and check it (without
    ``verify``, its header and layout only: the checksum would read it all)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise MetadataError(f"{path}: not a private regular file")
        if st.st_size < HEADER.size:
            raise MetadataError(f"{path}: too short")
        buf = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return Tables(buf, verify=verify)
    except BaseException:
        buf.close()
        raise
