"""The PuzzleFS metadata (the "rootfs" blob): Python types, and the only code that
touches Cap'n Proto.

Writing follows the reference's allocation order field by field (FORMAT.md §2), because
Cap'n Proto lays objects out in the order they are allocated: the same order gives the
same bytes, so our images are byte-identical to the reference's.

Reading is lazy: a :class:`RootfsReader` keeps the encoded blob and decodes one inode
at a time (binary search per layer), so opening a large image costs nothing up front.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

import capnp

from puzzlefs.errors import MetadataError, UnsupportedVersion

__all__ = [
    "MANIFEST_VERSION",
    "BlobRef",
    "DirEntry",
    "FileChunk",
    "Ino",
    "Inode",
    "Kind",
    "LazyChunks",
    "Rootfs",
    "RootfsReader",
    "encode_rootfs",
]

MANIFEST_VERSION = 3
Ino = NewType("Ino", int)
ROOT_INO = Ino(1)

capnp.remove_import_hook()
_schema: Any = capnp.load(str(Path(__file__).with_name("puzzlefs.capnp")))


class Kind(enum.StrEnum):
    """Inode kinds, named as the schema's union members."""

    UNKNOWN = "unknown"
    FIFO = "fifo"
    CHR = "chr"
    DIR = "dir"
    BLK = "blk"
    FILE = "file"
    LNK = "lnk"
    SOCK = "sock"
    WHT = "wht"


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: bytes  # raw 32-byte sha256 of the stored blob
    offset: int  # in uncompressed bytes
    compressed: bool


@dataclass(frozen=True, slots=True)
class FileChunk:
    blob: BlobRef
    len: int


@dataclass(frozen=True, slots=True)
class DirEntry:
    ino: Ino
    name: bytes


@dataclass(slots=True)
class Inode:
    ino: Ino
    kind: Kind
    uid: int = 0
    gid: int = 0
    permissions: int = 0
    entries: list[DirEntry] = field(default_factory=list)  # dir
    look_below: bool = False  # dir
    chunks: Sequence[FileChunk] = field(default_factory=list)  # file
    major: int = 0  # chr, blk
    minor: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    symlink_target: bytes | None = None

    @property
    def size(self) -> int:
        if self.kind is Kind.FILE:
            if isinstance(self.chunks, LazyChunks):
                return self.chunks.total  # without decoding the chunk list
            return sum(c.len for c in self.chunks)
        if self.kind is Kind.LNK:
            return len(self.symlink_target or b"")
        return 0

    @property
    def has_additional(self) -> bool:
        return bool(self.xattrs) or self.symlink_target is not None


class LazyChunks(Sequence[FileChunk]):
    """A file's chunk list, decoded from the rootfs on first use.

    Listing a directory or stat-ing a file needs a file's size but not its chunks, and
    decoding chunk references through pycapnp is most of what decoding an inode costs:
    readers that serve metadata (the mount) decode the list only when the file is read.
    """

    __slots__ = ("_index", "_items", "_layer", "_reader", "total")

    def __init__(self, reader: RootfsReader, layer: int, index: int, total: int) -> None:
        self._reader = reader
        self._layer = layer
        self._index = index
        self._items: list[FileChunk] | None = None
        self.total = total  # the sum of the chunk lengths: the file's size

    def _list(self) -> list[FileChunk]:
        if self._items is None:
            self._items = self._reader.file_chunks(self._layer, self._index)
        return self._items

    def __len__(self) -> int:
        return len(self._list())

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __iter__(self) -> Iterator[FileChunk]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return self._list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like list

    def __repr__(self) -> str:
        return repr(self._list())


@dataclass
class Rootfs:
    """``layers[0]`` is the newest layer; each layer's inodes are sorted by ino."""

    layers: list[list[Inode]]
    verity: dict[bytes, bytes]  # chunk sha256 -> fs-verity digest, both raw
    manifest_version: int = MANIFEST_VERSION


# ---------------------------------------------------------------------------------
# Encoding


def encode_rootfs(rootfs: Rootfs) -> bytes:
    """Serialise in the reference's allocation order (see module docstring)."""
    msg = _schema.Rootfs.new_message()
    msg.manifestVersion = rootfs.manifest_version
    metas = msg.init("metadatas", len(rootfs.layers))
    lists = [metas[i].init("inodes", len(layer)) for i, layer in enumerate(rootfs.layers)]
    for layer, out in zip(rootfs.layers, lists, strict=True):
        for i, inode in enumerate(layer):
            _encode_inode(inode, out[i])
    entries = sorted(rootfs.verity.items())
    vlist = msg.init("fsVerityData", len(entries))
    for i, (digest, verity) in enumerate(entries):
        v = vlist[i]
        v.digest = digest
        v.verity = verity
    return bytes(msg.to_bytes())


def _encode_inode(inode: Inode, out: Any) -> None:
    out.ino = inode.ino
    mode = out.mode
    kind = inode.kind
    if kind is Kind.DIR:
        d = mode.init("dir")
        d.lookBelow = inode.look_below
        ents = d.init("entries", len(inode.entries))
        for j, e in enumerate(inode.entries):
            ents[j].ino = e.ino
            ents[j].name = e.name
    elif kind is Kind.FILE:
        chunks = mode.init("file", len(inode.chunks))
        for j, c in enumerate(inode.chunks):
            fc = chunks[j]
            fc.len = c.len
            b = fc.init("blob")
            b.digest = c.blob.digest
            b.offset = c.blob.offset
            b.compressed = c.blob.compressed
    elif kind in (Kind.CHR, Kind.BLK):
        dev = mode.init(kind.value)
        dev.minor = inode.minor
        dev.major = inode.major
    else:
        setattr(mode, kind.value, None)
    out.uid = inode.uid
    out.gid = inode.gid
    out.permissions = inode.permissions
    if inode.has_additional:
        add = out.init("additional")
        xs = add.init("xattrs", len(inode.xattrs))
        for j, (key, val) in enumerate(inode.xattrs):
            xs[j].val = val
            xs[j].key = key
        if inode.symlink_target is not None:
            add.symlinkTarget = inode.symlink_target


# ---------------------------------------------------------------------------------
# Decoding


class RootfsReader:
    """Lazy access to an encoded rootfs.

    Each operation opens a fresh zero-copy Cap'n Proto reader: the traversal limit that
    guards against amplification attacks is per reader and cumulative, so one
    long-lived reader would run out of budget in a long mount.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        # Enough to read every word a few times over; hostile pointer loops cannot
        # make a single operation walk more than this.
        self._limit = max(4 * (len(data) // 8), 1 << 16)
        try:
            with self._open() as root:
                version = root.manifestVersion
                self.layer_count = len(root.metadatas)
                self._layer_sizes = [len(m.inodes) for m in root.metadatas]
        except UnsupportedVersion:
            raise
        except Exception as e:
            raise MetadataError(f"rootfs is not a valid Cap'n Proto message: {_short(e)}") from None
        if version != MANIFEST_VERSION:
            raise UnsupportedVersion(
                f"unsupported image version: got {version}, expected {MANIFEST_VERSION}"
            )
        if self.layer_count == 0:
            raise MetadataError("rootfs has no metadata layers")

    def _open(self) -> Any:
        return _schema.Rootfs.from_bytes(
            self._data, traversal_limit_in_words=self._limit, nesting_limit=64
        )

    def find(self, ino: int, layer: int, *, lazy: bool = False) -> Inode | None:
        """The inode ``ino`` in one layer, or None (binary search: layers are sorted).
        ``lazy``: a file's chunk list is decoded when first used (:class:`LazyChunks`)."""
        try:
            with self._open() as root:
                inodes = root.metadatas[layer].inodes
                lo, hi = 0, self._layer_sizes[layer]
                while lo < hi:
                    mid = (lo + hi) // 2
                    node = inodes[mid]
                    found = node.ino
                    if found == ino:
                        at = _preferred(inodes, mid, self._layer_sizes[layer])
                        return _decode_inode(inodes[at], (self, layer, at) if lazy else None)
                    if found < ino:
                        lo = mid + 1
                    else:
                        hi = mid
                return None
        except MetadataError:
            raise
        except Exception as e:
            raise MetadataError(f"corrupt inode {ino} in rootfs: {_short(e)}") from None

    def inode_count(self) -> int:
        """Inodes stored in all layers (what the rootfs blob's size grows with)."""
        return sum(self._layer_sizes)

    def max_ino(self) -> int:
        """The highest inode number any layer stores (layers are sorted by ino)."""
        try:
            with self._open() as root:
                return max(
                    (
                        m.inodes[n - 1].ino
                        for m, n in zip(root.metadatas, self._layer_sizes, strict=True)
                        if n
                    ),
                    default=0,
                )
        except Exception as e:
            raise MetadataError(f"corrupt rootfs: {_short(e)}") from None

    def layer(self, layer: int, *, lazy: bool = False) -> Iterator[Inode]:
        """Every inode of one layer, in stored order (``lazy`` as for :meth:`find`)."""
        try:
            with self._open() as root:
                for i, node in enumerate(root.metadatas[layer].inodes):
                    yield _decode_inode(node, (self, layer, i) if lazy else None)
        except MetadataError:
            raise
        except Exception as e:
            raise MetadataError(f"corrupt rootfs layer {layer}: {_short(e)}") from None

    def file_chunks(self, layer: int, index: int) -> list[FileChunk]:
        """The chunk list of the ``index``-th inode of ``layer`` (a file)."""
        try:
            with self._open() as root:
                node = root.metadatas[layer].inodes[index]
                return _decode_chunks(node.mode.file, node.ino)
        except MetadataError:
            raise
        except Exception as e:
            raise MetadataError(f"corrupt file inode in rootfs: {_short(e)}") from None

    def verity(self) -> dict[bytes, bytes]:
        try:
            with self._open() as root:
                return {bytes(v.digest): bytes(v.verity) for v in root.fsVerityData}
        except Exception as e:
            raise MetadataError(f"corrupt fsVerityData in rootfs: {_short(e)}") from None

    def decode(self) -> Rootfs:
        """Everything, eagerly (for tests, and small images)."""
        return Rootfs(
            [list(self.layer(i)) for i in range(self.layer_count)],
            self.verity(),
        )


def _short(e: Exception) -> str:
    """The reason alone: a KjException's description, without the source location in
    front of it or the lines of stack addresses after it."""
    description = getattr(e, "description", None)
    text = description if isinstance(description, str) and description else str(e)
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("stack:")]
    return lines[-1] if lines else type(e).__name__


# What the fields a reader uses may hold (the schema's types allow more): what a
# kernel, tar or a file offset can represent. A value outside is a MetadataError
# naming the inode, never an OverflowError or ValueError deep inside extract or a mount.
MAX_DEVICE_NUMBER = (1 << 32) - 1  # dev_t's major and minor are 32 bits each
MAX_FILE_SIZE = (1 << 63) - 1  # off_t
MAX_PERMISSIONS = 0o7777


def _preferred(inodes: Any, at: int, count: int) -> int:
    """Of the run of inodes sharing ``inodes[at]``'s number, the one to read: the first
    that is not a whiteout, else the first (reference_compat.WHITEOUT_YIELDS)."""
    ino = inodes[at].ino
    start, end = at, at + 1
    while start > 0 and inodes[start - 1].ino == ino:
        start -= 1
    while end < count and inodes[end].ino == ino:
        end += 1
    if end - start == 1:
        return at
    for j in range(start, end):
        if inodes[j].mode.which() != Kind.WHT.value:
            return j
    return start


def _decode_inode(node: Any, lazy: tuple[RootfsReader, int, int] | None = None) -> Inode:
    """``lazy``: (reader, layer, index) of ``node``, to decode its chunks on first use."""
    kind = Kind(str(node.mode.which()))
    inode = Inode(Ino(node.ino), kind, node.uid, node.gid, node.permissions)
    if inode.permissions > MAX_PERMISSIONS:
        raise MetadataError(f"inode {inode.ino}: permissions {inode.permissions:#o} out of range")
    mode = node.mode
    if kind is Kind.DIR:
        d = mode.dir
        inode.look_below = d.lookBelow
        inode.entries = [DirEntry(Ino(e.ino), bytes(e.name)) for e in d.entries]
    elif kind is Kind.FILE:
        if lazy is None:
            inode.chunks = _decode_chunks(mode.file, inode.ino)
        else:
            total = sum(c.len for c in mode.file)
            if total > MAX_FILE_SIZE:
                raise MetadataError(f"inode {inode.ino}: file size {total} out of range")
            inode.chunks = LazyChunks(*lazy, total)
    elif kind is Kind.CHR:
        inode.major, inode.minor = mode.chr.major, mode.chr.minor
    elif kind is Kind.BLK:
        inode.major, inode.minor = mode.blk.major, mode.blk.minor
    if inode.major > MAX_DEVICE_NUMBER or inode.minor > MAX_DEVICE_NUMBER:
        raise MetadataError(
            f"inode {inode.ino}: device number {inode.major}:{inode.minor} out of range"
        )
    if node._has("additional"):
        add = node.additional
        inode.xattrs = [(bytes(x.key), bytes(x.val)) for x in add.xattrs]
        for key, _ in inode.xattrs:
            if not key or b"\0" in key:
                raise MetadataError(f"inode {inode.ino}: invalid xattr name {key!r}")
        if add._has("symlinkTarget"):
            inode.symlink_target = bytes(add.symlinkTarget)
    if kind is Kind.LNK and not inode.symlink_target:
        raise MetadataError(f"inode {inode.ino}: a symlink without a target")
    if inode.symlink_target is not None and b"\0" in inode.symlink_target:
        raise MetadataError(f"inode {inode.ino}: a symlink target with a NUL byte")
    return inode


def _decode_chunks(chunks: Any, ino: int) -> list[FileChunk]:
    out = []
    total = 0
    for c in chunks:
        b = c.blob  # each attribute access builds a new reader: once per chunk
        digest = bytes(b.digest)
        if len(digest) != 32:
            raise MetadataError(f"inode {ino}: a chunk digest of {len(digest)} bytes, not 32")
        out.append(FileChunk(BlobRef(digest, b.offset, b.compressed), c.len))
        total += c.len
    if total > MAX_FILE_SIZE:
        raise MetadataError(f"inode {ino}: file size {total} out of range")
    return out


def sorted_layer(inodes: Sequence[Inode]) -> list[Inode]:
    return sorted(inodes, key=lambda i: i.ino)
