"""An opened image: the layer stack, caches and reads."""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from puzzlefs.compression import MAX_CHUNK_SIZE, SeekableBlob
from puzzlefs.digest import Digest
from puzzlefs.errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    MetadataError,
    NotFound,
    UnsafeFile,
    VerityMismatch,
)
from puzzlefs.format import ROOT_INO, FileChunk, Ino, Inode, Kind, RootfsReader
from puzzlefs.oci import ANNOTATION_VERITY_ROOT, Descriptor, ImageLayout, Manifest
from puzzlefs.oci.layout import MAX_ROOTFS_BLOB
from puzzlefs.reader._cache import LRU
from puzzlefs.reader._readahead import Readahead
from puzzlefs.verity import fsverity_digest, measure_verity

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
BLOB_CACHE_BYTES = 128 * 1024 * 1024
# Decompressed zstd frames at the edges of recent reads (see SeekableBlob.read).
FRAME_CACHE_BYTES = 16 * 1024 * 1024
READ_PIECE = 1024 * 1024  # what read_all yields at most at once
MEASURE_GIVE_UP = 16


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
        self.layout = layout
        self.tag = tag
        self.manifest_descriptor, manifest_bytes, self.manifest = layout.read_manifest(tag)
        self._verify_verity = verity_digest is not None
        if verity_digest is not None:
            actual = fsverity_digest(manifest_bytes).hex()
            if actual != verity_digest.lower():
                raise VerityMismatch(f"manifest of {tag!r}", verity_digest.lower(), actual)
        self.rootfs_descriptor = self.manifest.rootfs
        rootfs_bytes = self._read_rootfs(self.rootfs_descriptor)
        self.rootfs = RootfsReader(rootfs_bytes)
        self._verity: dict[bytes, bytes] = self.rootfs.verity()
        self._verified: set[bytes] = set()
        self._inodes: LRU[int, Inode | None] = LRU(INODE_CACHE_ENTRIES)
        self._dirs: LRU[int, dict[bytes, Ino]] = LRU(4096, lambda d: max(1, len(d) // 64))
        self._offsets: LRU[int, list[int]] = LRU(INODE_CACHE_ENTRIES // 4)
        self._blobs: LRU[bytes, bytes | SeekableBlob] = LRU(BLOB_CACHE_BYTES, _blob_weight)
        self._frames: LRU[tuple[bytes, int], bytes] = LRU(FRAME_CACHE_BYTES, len)
        self._nlinks: dict[int, int] | None = None
        self._usage: tuple[int, int] | None = None
        self._attrs: LRU[int, InodeAttr] = LRU(INODE_CACHE_ENTRIES)
        stream = [d.digest.raw for d in self.manifest.chunk_layers]
        self._readahead = Readahead(self._blob_path, stream)
        self._lock = threading.Lock()
        self._walk_lock = threading.Lock()
        self._measure_misses = 0

    # -- opening ---------------------------------------------------------------------
    def _read_rootfs(self, desc: Descriptor) -> bytes:
        try:  # the size is checked before the blob is read
            data = self.layout.blobs.get(desc.digest, size=desc.size, limit=MAX_ROOTFS_BLOB)
        except BlobNotFound:
            raise BlobNotFound(f"rootfs blob {desc.digest.hex} is missing") from None
        except (DigestMismatch, UnsafeFile):
            raise
        except ImageError as e:
            raise ImageError(f"rootfs: {e}") from None
        if self._verify_verity:
            expected = desc.annotations.get(ANNOTATION_VERITY_ROOT)
            if not expected:
                raise ImageError("manifest has no fs-verity digest for the rootfs")
            actual = fsverity_digest(data).hex()
            if actual != expected.lower():
                raise VerityMismatch(f"rootfs blob {desc.digest.hex}", expected.lower(), actual)
        return data

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
            self._inodes.put(node.ino, None if node.kind is Kind.WHT else node)

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
        )
        self._attrs.put(inode.ino, attr)
        return attr

    def usage(self) -> tuple[int, int]:
        """``(stored chunk bytes, visible inodes)``, for statfs (asked often)."""
        if self._usage is None:
            chunks = {d.digest: d.size for d in self.manifest.chunk_layers}
            self._usage = sum(chunks.values()), len(self._nlink_table())
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
        blob = self.blob(chunk.blob.digest, chunk.blob.compressed)
        start = chunk.blob.offset + within
        blob_size = blob.size if isinstance(blob, SeekableBlob) else len(blob)
        if chunk.blob.offset + chunk.len > blob_size:
            raise MetadataError(
                f"file chunk [{chunk.blob.offset}, +{chunk.len}) lies outside blob "
                f"{chunk.blob.digest.hex()} ({blob_size} bytes)"
            )
        if isinstance(blob, SeekableBlob):
            try:
                return blob.read(start, n, self._frames, chunk.blob.digest)
            except ImageError as e:  # a corrupt frame: say which blob
                raise ImageError(f"chunk blob {chunk.blob.digest.hex()}: {e}") from None
        return blob[start : start + n]

    def blob(self, raw_digest: bytes, compressed: bool) -> bytes | SeekableBlob:
        """A chunk blob, verified, decoded for random access, cached."""
        cached = self._blobs.get(raw_digest)
        if cached is not None:
            return cached
        self._readahead.loading(raw_digest)
        data = self._fetch(raw_digest)
        try:
            value: bytes | SeekableBlob = SeekableBlob(data) if compressed else data
        except ImageError as e:  # its seek table: say which blob
            raise ImageError(f"chunk blob {raw_digest.hex()}: {e}") from None
        self._blobs.put(raw_digest, value)
        return value

    def _blob_path(self, raw_digest: bytes) -> str | None:
        path = self.layout.blobs.path(Digest.from_raw(raw_digest))
        return None if path is None else str(path)

    def enable_readahead(self) -> None:
        """Announce the next chunk blobs to the kernel when reads look sequential (for
        a long-lived reader such as a mount; it starts a small helper process)."""
        self._readahead.enable()

    def _fetch(self, raw_digest: bytes) -> bytes:
        """A chunk blob's stored bytes, checked against its fs-verity digest the first
        time (with ``verity_digest``), against its sha256 otherwise.

        One check suffices: the fs-verity digest of the chain is as collision-resistant
        as the sha256 that names the blob, so the first load of each chunk under
        ``--digest`` costs one hash of its bytes, not two.
        """
        digest = Digest.from_raw(raw_digest)
        try:  # a chunk blob is never larger than a chunk: refused before it is read
            data = self.layout.blobs.get(digest, verify=False, limit=MAX_CHUNK_SIZE)
        except BlobNotFound:
            raise BlobNotFound(f"chunk blob {digest.hex} is missing") from None
        if self._verify_verity and raw_digest not in self._verified:
            self._check_verity(raw_digest, data)
            return data
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hex:
            raise ImageError(f"chunk blob {digest.hex} is corrupt (its sha256 is {actual})")
        return data

    def _check_verity(self, raw_digest: bytes, data: bytes) -> None:
        expected = self._verity.get(raw_digest)
        hexd = raw_digest.hex()
        if expected is None:
            raise VerityMismatch(f"chunk blob {hexd}", "an fsVerityData entry", "none")
        actual = self._measured(raw_digest) or fsverity_digest(data)
        if actual != expected:
            raise VerityMismatch(f"chunk blob {hexd}", expected.hex(), actual.hex())
        with self._lock:
            self._verified.add(raw_digest)

    def _measured(self, raw_digest: bytes) -> bytes | None:
        """The kernel's fs-verity measurement of a blob file, where it has one: a cheap
        ioctl instead of hashing the whole blob in user space.

        Asking costs an open and an ioctl per blob (a quarter of the user-space hash on
        a mount); after ``MEASURE_GIVE_UP`` blobs in a row without fs-verity, the store
        is taken to have none and is no longer asked (user-space hashing is as safe).
        """
        if self._measure_misses >= MEASURE_GIVE_UP:
            return None
        path = self.layout.blobs.path(Digest.from_raw(raw_digest))
        measured = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            pass
        else:
            try:
                measured = measure_verity(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        self._measure_misses = 0 if measured is not None else self._measure_misses + 1
        return measured


def _blob_weight(v: bytes | SeekableBlob) -> int:
    return v.size if isinstance(v, SeekableBlob) else len(v)


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
