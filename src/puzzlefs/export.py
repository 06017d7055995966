"""An image -> a reproducible tar (POSIX pax format), for the tar-based world.

Sorted depth-first by name bytes (as ``tar --sort=name``), names ``./path``, numeric
owners only, the image's mtimes (0 without a times blob), xattrs as ``SCHILY.xattr.*``
pax records, hard links as links to the first path. Sockets cannot be represented in
tar and are left out with a warning. The same image always gives the same bytes.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from puzzlefs._limits import MAX_MAJOR, MAX_MINOR, device_in_range
from puzzlefs.errors import MetadataError, one_line
from puzzlefs.format import Inode, Kind
from puzzlefs.progress import Progress
from puzzlefs.reader import Image

__all__ = ["export_tar"]

_TYPES = {
    Kind.DIR: tarfile.DIRTYPE,
    Kind.FILE: tarfile.REGTYPE,
    Kind.LNK: tarfile.SYMTYPE,
    Kind.CHR: tarfile.CHRTYPE,
    Kind.BLK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


class _FileReader(io.RawIOBase):
    """A file's contents as a stream, one chunk piece at a time (bounded memory)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._buf = memoryview(piece)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _walk_sorted(image: Image) -> Iterator[tuple[bytes, Inode]]:
    """Depth-first, siblings by name bytes; refuses directory loops (Image.walk checks
    the same, in its own order)."""
    root = image.root
    yield b"", root
    stack: list[Iterator[tuple[bytes, Inode]]] = []
    seen = {root.ino}

    def children(path: bytes, inode: Inode) -> Iterator[tuple[bytes, Inode]]:
        for name, child in sorted(image.listdir(inode), key=lambda e: e[0]):
            yield (path + b"/" + name if path else name), child

    stack.append(children(b"", root))
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        path, inode = item
        yield path, inode
        if inode.kind is Kind.DIR:
            if inode.ino in seen:
                raise MetadataError(f"directory loop at {path!r}")
            seen.add(inode.ino)
            stack.append(children(path, inode))


def export_tar(
    image: Image, out: BinaryIO, warn: bool = True, progress: Progress | None = None
) -> list[str]:
    """Write the image's tree to ``out`` as a tar; return the warnings."""
    warnings: list[str] = []
    first_path: dict[int, str] = {}
    with tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for path, inode in _walk_sorted(image):
            name = "./" + os.fsdecode(path) if path else "."
            if inode.kind is Kind.DIR and path:
                name += "/"
            if inode.kind is Kind.SOCK or inode.kind not in _TYPES:
                warnings.append(f"{name}: {inode.kind.value} cannot be stored in a tar; left out")
                continue
            info = tarfile.TarInfo(name)
            sec, nsec = divmod(image.mtime_ns(inode), 1_000_000_000)
            info.mtime = sec
            info.uid, info.gid = inode.uid, inode.gid
            info.uname = info.gname = ""
            info.mode = inode.permissions
            info.pax_headers = {}
            for key, value in inode.xattrs:
                try:  # a pax keyword is UTF-8 (its value may be any bytes)
                    keyword = "SCHILY.xattr." + key.decode("utf-8")
                except UnicodeDecodeError:
                    warnings.append(
                        f"{name}: xattr {key!r} has a name that is not UTF-8, which a tar"
                        " cannot hold; left out"
                    )
                    continue
                info.pax_headers[keyword] = value.decode("utf-8", "surrogateescape")
            if nsec:  # the exact time, as GNU tar writes it in pax
                info.pax_headers["mtime"] = f"{sec}.{nsec:09d}".rstrip("0")
            fileobj = None
            if inode.kind is Kind.FILE and inode.ino in first_path:
                info.type = tarfile.LNKTYPE
                info.linkname = first_path[inode.ino]
            else:
                info.type = _TYPES[inode.kind]
                if inode.kind is Kind.FILE:
                    first_path[inode.ino] = name
                    info.size = inode.size
                    fileobj = io.BufferedReader(_FileReader(image.read_all(inode)), 1 << 20)
                elif inode.kind is Kind.LNK:
                    info.linkname = os.fsdecode(inode.symlink_target or b"")
                elif inode.kind in (Kind.CHR, Kind.BLK):
                    if not device_in_range(inode.major, inode.minor):
                        # (nor could tar hold it: its fields stop at 2^21 - 1)
                        raise MetadataError(
                            f"{name}: device {inode.major}:{inode.minor} is beyond what"
                            f" Linux can create (majors up to {MAX_MAJOR}, minors up to"
                            f" {MAX_MINOR})"
                        )
                    info.devmajor, info.devminor = inode.major, inode.minor
            tar.addfile(info, fileobj)
            if progress and fileobj is not None:
                progress.add("files")
                progress.add("bytes", inode.size)
    if progress:
        progress.done()
    if warn:
        for w in warnings:
            print(f"warning: {one_line(w)}", file=sys.stderr)
    return warnings
