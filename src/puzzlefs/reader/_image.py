"""An opened image as Python objects: the layer stack resolved inode by inode through
pycapnp, for extraction, export, delta builds and the tests (the mount serves from the
compact tables of :mod:`puzzlefs.reader._tables` instead)."""

from __future__ import annotations

import bisect
import logging
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError, MetadataError, NotFound
from puzzlefs.format import ROOT_INO, FileChunk, Ino, Inode, Kind, RootfsReader
from puzzlefs.format.times import Times, decode_times
from puzzlefs.oci import ImageLayout, Manifest
from puzzlefs.reader._cache import LRU
from puzzlefs.reader._data import ChunkReader
from puzzlefs.reader._open import OpenedImage

log = logging.getLogger(__name__)

_FMT = {
    Kind.DIR: stat.S_IFDIR,
    Kind.FILE: stat.S_IFREG,
    Kind.LNK: stat.S_IFLNK,
    Kind.CHR: stat.S_IFCHR,
    Kind.BLK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCK: stat.S_IFSOCK,
    Kind.UNKNOWN: 0,
}
INODE_CACHE_ENTRIES = 65536
READ_PIECE = 1024 * 1024  # what read_all yields at most at once


def is_valid_name(name: bytes) -> bool:
    """A directory entry name that is safe to create: one path component."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


@dataclass(frozen=True, slots=True)
class InodeAttr:
    ino: Ino
    mode: int  # type | permissions
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int  # 512-byte units
    mtime_ns: int = 0  # 0 where the image keeps no times


class Image:
    """One tag of an OCI layout, opened.

    ``verity_digest`` (hex): the fs-verity digest of the manifest, as ``build`` printed
    it. With it, the manifest, the rootfs and every chunk are checked against the
    fs-verity chain before use; without it, against their sha256 only.
    """

    def __init__(
        self,
        layout: ImageLayout,
        tag: str,
        *,
        verity_digest: str | None = None,
    ) -> None:
        self.opened = OpenedImage(layout, tag, verity_digest=verity_digest)
        self.layout = layout
        self.tag = tag
        self.manifest_descriptor = self.opened.manifest_descriptor
        self.manifest = self.opened.manifest
        self.rootfs_descriptor = self.opened.rootfs_descriptor
        self.rootfs = RootfsReader(self.opened.rootfs_bytes())
        times = self.opened.times_bytes()
        self.times: Times | None = decode_times(times) if times is not None else None
        self._verity: dict[bytes, bytes] = self.rootfs.verity()
        self._inodes: LRU[int, Inode | None] = LRU(INODE_CACHE_ENTRIES)
        self._dirs: LRU[int, dict[bytes, Ino]] = LRU(4096, lambda d: max(1, len(d) // 64))
        self._offsets: LRU[int, list[int]] = LRU(INODE_CACHE_ENTRIES // 4)
        self._nlinks: dict[int, int] | None = None
        self._usage: tuple[int, int] | None = None
        self._attrs: LRU[int, InodeAttr] = LRU(INODE_CACHE_ENTRIES)
        self.data = ChunkReader(
            layout,
            self._verity.get,
            verify_verity=self.opened.verify_verity,
            stream=self.opened.chunk_stream,
            zstd_image=self.opened.zstd_image,
        )
        self._walk_lock = threading.Lock()

    @property
    def verity_data(self) -> dict[bytes, bytes]:
        """The rootfs's fsVerityData: chunk sha256 -> fs-verity digest (raw)."""
        return dict(self._verity)

    @property
    def chunk_digests(self) -> list[Digest]:
        """Every chunk blob any layer uses (for verify/copy), sorted."""
        return sorted(Digest.from_raw(d) for d in self._verity) or [
            d.digest for d in self.manifest.chunk_layers
        ]

    # -- inodes ---------------------------------------------------------------------
    def find(self, ino: int) -> Inode | None:
        """The inode as the layer stack shows it; None if a whiteout deleted it."""
        cached = self._inodes.get(ino)
        if cached is not None or (ino in self._inodes._items):
            return cached
        for layer in range(self.rootfs.layer_count):
            inode = self.rootfs.find(ino, layer, lazy=True)
            if inode is not None:
                result = None if inode.kind is Kind.WHT else inode
                self._inodes.put(ino, result)
                return result
        raise MetadataError(f"inode {ino} is referenced but not stored in any layer")

    def inode(self, ino: int) -> Inode:
        found = self.find(ino)
        if found is None:
            raise NotFound(f"inode {ino} was deleted")
        return found

    @property
    def root(self) -> Inode:
        root = self.inode(ROOT_INO)
        if root.kind is not Kind.DIR:
            raise MetadataError("the root inode is not a directory")
        return root

    def _dir_index(self, inode: Inode) -> dict[bytes, Ino]:
        index = self._dirs.get(inode.ino)
        if index is None:
            index = {}
            for e in inode.entries:
                if not is_valid_name(e.name):
                    raise MetadataError(f"directory {inode.ino} has an invalid entry {e.name!r}")
                if e.name in index:
                    raise MetadataError(f"directory {inode.ino} lists {e.name!r} twice")
                index[e.name] = e.ino
            self._dirs.put(inode.ino, index)
        return index

    def lookup(self, parent: Inode, name: bytes) -> Inode:
        if parent.kind is not Kind.DIR:
            raise NotFound(f"inode {parent.ino} is not a directory")
        ino = self._dir_index(parent).get(name)
        if ino is None:
            raise NotFound(f"{name!r} not found")
        found = self.find(ino)
        if found is None:
            raise NotFound(f"{name!r} was deleted")
        return found

    def listdir(self, parent: Inode) -> list[tuple[bytes, Inode]]:
        """Visible entries in stored order (whiteouts hidden)."""
        out = []
        for name, ino in self._dir_index(parent).items():
            found = self.find(ino)
            if found is not None:
                out.append((name, found))
        return out

    def resolve_path(self, path: str | bytes) -> Inode:
        """Follow a ``/``-separated path from the root (symlinks are not followed)."""
        p = path.encode() if isinstance(path, str) else path
        inode = self.root
        for part in p.split(b"/"):
            if part:
                inode = self.lookup(inode, part)
        return inode

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every visible path, pre-order, ``b""`` for the root. Refuses directory loops."""
        root = self.root
        yield b"", root
        stack: list[tuple[bytes, Inode]] = [(b"", root)]
        seen = {root.ino}
        while stack:
            path, inode = stack.pop()
            subdirs = []
            for name, child in self.listdir(inode):
                child_path = path + b"/" + name if path else name
                if child.kind is Kind.DIR:
                    if child.ino in seen:
                        raise MetadataError(f"directory loop at {child_path!r}")
                    seen.add(child.ino)
                    subdirs.append((child_path, child))
                yield child_path, child
            stack.extend(reversed(subdirs))

    def nlink(self, inode: Inode) -> int:
        return self._nlink_table().get(inode.ino, 1)

    def _nlink_table(self) -> dict[int, int]:
        # The format stores no link counts: one walk counts the paths to each inode,
        # and for a directory its "." and each subdirectory's "..".
        if self._nlinks is None:
            with self._walk_lock:  # once, even if a background warm_up() is at it
                if self._nlinks is None:
                    self._prefill()
                    counts: dict[int, int] = {}
                    dirs: dict[bytes, int] = {}  # path -> ino (a directory has one path)
                    for path, node in self.walk():
                        if node.kind is Kind.DIR:
                            dirs[path] = node.ino
                            counts[node.ino] = 2  # its entry (or the root's ".."), "."
                            if path:
                                parent = dirs[path.rpartition(b"/")[0]]
                                counts[parent] += 1
                        else:
                            counts[node.ino] = counts.get(node.ino, 0) + 1
                    self._nlinks = counts
        return self._nlinks

    def _prefill(self) -> None:
        """Decode a single-layer image's inodes in one linear pass into the inode cache
        (where it fits): twice as fast as one binary search per inode, and the walk and
        the lookups after it then find everything decoded."""
        if self.rootfs.layer_count != 1:
            return
        for i, node in enumerate(self.rootfs.layer(0, lazy=True)):
            if i >= INODE_CACHE_ENTRIES:
                break
            if node.kind is Kind.WHT:
                if node.ino not in self._inodes._items:
                    self._inodes.put(node.ino, None)
            elif self._inodes.get(node.ino) is None:  # its number's first inode wins
                self._inodes.put(node.ino, node)  # over a whiteout (WHITEOUT_YIELDS)

    def warm_up(self) -> None:
        """Compute now what the first ``stat`` of a file would (the link counts); for a
        background thread started when a mount goes live."""
        self._nlink_table()

    def attr(self, inode: Inode) -> InodeAttr:
        # Cached: a directory's nlink lists it, and FUSE asks for attributes often.
        cached = self._attrs.get(inode.ino)
        if cached is not None:
            return cached
        size = inode.size
        attr = InodeAttr(
            inode.ino,
            _FMT[inode.kind] | inode.permissions,
            self.nlink(inode),
            inode.uid,
            inode.gid,
            size,
            _makedev(inode.major, inode.minor) if inode.kind in (Kind.CHR, Kind.BLK) else 0,
            (size + 511) // 512,
            self.mtime_ns(inode),
        )
        self._attrs.put(inode.ino, attr)
        return attr

    def mtime_ns(self, inode: Inode) -> int:
        """The inode's modification time (ns since the epoch); 0 without a times blob."""
        return self.times.mtime_ns(inode.ino) if self.times is not None else 0

    def usage(self) -> tuple[int, int]:
        """``(stored chunk bytes, visible inodes)``, for statfs (asked often)."""
        if self._usage is None:
            self._usage = self.opened.stored_chunk_bytes(), len(self._nlink_table())
        return self._usage

    # -- data -------------------------------------------------------------------------
    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a regular file from ``offset``."""
        if inode.kind is not Kind.FILE:
            raise ImageError(f"inode {inode.ino} is not a regular file")
        starts = self._chunk_starts(inode)
        end = min(offset + size, starts[-1])
        if offset >= end:
            return b""
        i = bisect.bisect_right(starts, offset) - 1
        parts = []
        pos = offset
        while pos < end:
            chunk = inode.chunks[i]
            within = pos - starts[i]
            n = min(chunk.len - within, end - pos)
            parts.append(self._read_chunk(chunk, within, n))
            pos += n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self, inode: Inode) -> Iterator[bytes]:
        """A file's contents, piece by piece: at most ``READ_PIECE`` bytes each, so that
        memory stays bounded whatever the chunk references say."""
        for chunk in inode.chunks:
            for within in range(0, chunk.len, READ_PIECE):
                yield self._read_chunk(chunk, within, min(READ_PIECE, chunk.len - within))

    def _chunk_starts(self, inode: Inode) -> list[int]:
        starts = self._offsets.get(inode.ino)
        if starts is None:
            starts = [0, *accumulate(c.len for c in inode.chunks)]
            self._offsets.put(inode.ino, starts)
        return starts

    def _read_chunk(self, chunk: FileChunk, within: int, n: int) -> bytes:
        ref = chunk.blob
        return self.data.read(
            ref.digest, ref.compressed, ref.offset + within, n, ref.offset + chunk.len
        )

    def enable_readahead(self) -> None:
        self.data.enable_readahead()


def _makedev(major: int, minor: int) -> int:
    # glibc's encoding, as os.makedev, but without its range checks on hostile values.
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0xFFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0xFF)
    ) & 0xFFFFFFFFFFFFFFFF


def open_image(oci_dir: str | Path, tag: str, *, verity_digest: str | None = None) -> Image:
    return Image(ImageLayout(oci_dir), tag, verity_digest=verity_digest)


__all__ = ["Image", "InodeAttr", "Manifest", "NotFound", "is_valid_name", "open_image"]
