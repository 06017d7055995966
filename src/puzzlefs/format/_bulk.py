"""The rootfs decoded in bulk: every inode of every layer at once, into numpy arrays.

pycapnp decodes one field at a time through Python objects: a 300,000-inode rootfs
takes seconds. Here the Cap'n Proto wire format (segments of 64-bit words, struct and
list pointers, far pointers between segments) is read with vectorised numpy operations
over all pointers of one kind at a time, so the same rootfs decodes in a fraction of
a second. The field layout comes from the schema itself (pycapnp's compiled view of
``puzzlefs.capnp``), never from numbers written here.

Hostile input is bounded as Cap'n Proto's traversal limit bounds it: every pointer
must land inside its segment; lists must be of the element size the schema implies;
and the elements and bytes all lists claim together may not exceed what the message
holds (a legitimate writer never shares objects between pointers), so no message makes
the decoder allocate more than a small multiple of its own size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from puzzlefs.errors import MetadataError, UnsupportedVersion

__all__ = ["DecodedLayer", "DecodedRootfs", "decode_rootfs"]

U64 = np.uint64
I64 = np.int64

# pointer kinds
_STRUCT, _LIST, _FAR = 0, 1, 2
# list element sizes
_BYTE, _COMPOSITE = 2, 7


class _Layout:
    """Where each field the decoder reads sits: from the schema, once."""

    def __init__(self) -> None:
        from puzzlefs.format import _schema  # pycapnp's view of puzzlefs.capnp

        def fields(struct: Any) -> dict[str, Any]:
            return {f.name: f for f in struct.schema.node.struct.fields}

        def data(struct: Any, name: str, bits: int) -> int:
            f = fields(struct)[name]
            return int(f.slot.offset) * bits  # bit offset in the data section

        def ptr(struct: Any, name: str) -> int:
            return int(fields(struct)[name].slot.offset)

        s = _schema
        self.rootfs_metadatas = ptr(s.Rootfs, "metadatas")
        self.rootfs_verity = ptr(s.Rootfs, "fsVerityData")
        self.rootfs_version = data(s.Rootfs, "manifestVersion", 64)
        self.vector_inodes = ptr(s.InodeVector, "inodes")
        self.inode_ino = data(s.Inode, "ino", 64)
        self.inode_uid = data(s.Inode, "uid", 32)
        self.inode_gid = data(s.Inode, "gid", 32)
        self.inode_permissions = data(s.Inode, "permissions", 16)
        self.inode_additional = ptr(s.Inode, "additional")
        mode = s.Inode.new_message().mode.schema.node.struct
        self.mode_discriminant = int(mode.discriminantOffset) * 16
        variants = {f.name: f for f in mode.fields}
        self.kinds = {int(f.discriminantValue): name for name, f in variants.items()}
        self.kind_code = {name: code for code, name in self.kinds.items()}
        # every pointer variant of the union shares one pointer slot
        slots = {int(f.slot.offset) for f in mode.fields if f.slot.type.which() != "void"}
        if len(slots) != 1:
            raise ImportError("unexpected layout of Inode.mode")
        self.mode_pointer = slots.pop()
        self.dir_entries = ptr(s.Dir, "entries")
        self.dir_look_below = data(s.Dir, "lookBelow", 1)
        self.entry_ino = data(s.DirEntry, "ino", 64)
        self.entry_name = ptr(s.DirEntry, "name")
        self.chunk_blob = ptr(s.FileChunk, "blob")
        self.chunk_len = data(s.FileChunk, "len", 64)
        self.blob_digest = ptr(s.BlobRef, "digest")
        self.blob_offset = data(s.BlobRef, "offset", 64)
        self.blob_compressed = data(s.BlobRef, "compressed", 1)
        self.dev_major = data(s.Chr, "major", 64)
        self.dev_minor = data(s.Chr, "minor", 64)
        if (self.dev_major, self.dev_minor) != (data(s.Blk, "major", 64), data(s.Blk, "minor", 64)):
            raise ImportError("Chr and Blk differ in layout")
        self.add_xattrs = ptr(s.InodeAdditional, "xattrs")
        self.add_target = ptr(s.InodeAdditional, "symlinkTarget")
        self.xattr_key = ptr(s.Xattr, "key")
        self.xattr_val = ptr(s.Xattr, "val")
        self.verity_digest = ptr(s.VerityData, "digest")
        self.verity_verity = ptr(s.VerityData, "verity")


_layout: _Layout | None = None


def _the_layout() -> _Layout:
    global _layout
    if _layout is None:
        _layout = _Layout()
    return _layout


# -- the message ------------------------------------------------------------------------


class _Message:
    """Segments of one message as one array of words, with their bounds."""

    def __init__(self, data: bytes) -> None:
        n = len(data)
        if n < 8:
            raise MetadataError("rootfs is too short for a Cap'n Proto message")
        count = int.from_bytes(data[:4], "little") + 1
        table = (4 + 4 * count + 7) // 8 * 8
        if count > 1024 or table > n:
            raise MetadataError(f"rootfs claims {count} segments")
        sizes = np.frombuffer(data, "<u4", count, 4).astype(I64)
        total = int(sizes.sum())
        if table + 8 * total > n:
            raise MetadataError("rootfs is shorter than its segment table says")
        self.data = data
        self.table = table  # byte offset of word 0
        self.words = np.frombuffer(data, "<u8", total, table)
        self.bytes = np.frombuffer(data, np.uint8)
        self.seg_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(I64)
        self.seg_end = self.seg_start + sizes
        self.nseg = count
        self.total = total
        # What all lists together may claim (see the module docstring).
        self.element_budget = 2 * total + 1024
        self.byte_budget = n
        if total == 0:
            raise MetadataError("rootfs message is empty")

    def segment_of(self, pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.seg_start, pos, side="right") - 1

    def resolve(self, pos: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For pointers at word positions ``pos``: (target word, the word holding the
        pointer's kind and sizes, segment of the target). Null pointers give target
        -1. Far pointers are followed to their landing pads."""
        pos = pos.astype(I64)
        w = self.words[pos]
        seg = self.segment_of(pos)
        info = w.copy()
        kind = (w & U64(3)).astype(I64)
        target = pos + 1 + _signed30(w)
        far = kind == _FAR
        if far.any():
            fw = w[far]
            double = ((fw >> U64(2)) & U64(1)).astype(bool)
            pad_seg = (fw >> U64(32)).astype(I64)
            if (pad_seg >= self.nseg).any():
                raise MetadataError(f"{what}: far pointer to a missing segment")
            pad = self.seg_start[pad_seg] + ((fw >> U64(3)) & U64(0x1FFFFFFF)).astype(I64)
            if (pad + 1 + double >= self.seg_end[pad_seg] + 1).any():
                raise MetadataError(f"{what}: far pointer outside its segment")
            pw = self.words[pad]
            t = pad + 1 + _signed30(pw)
            s = pad_seg.copy()
            i = pw.copy()
            if double.any():
                dw = pw[double]
                if ((dw & U64(7)) != U64(_FAR)).any():
                    raise MetadataError(f"{what}: malformed double-far landing pad")
                cseg = (dw >> U64(32)).astype(I64)
                if (cseg >= self.nseg).any():
                    raise MetadataError(f"{what}: far pointer to a missing segment")
                t[double] = self.seg_start[cseg] + ((dw >> U64(3)) & U64(0x1FFFFFFF)).astype(I64)
                s[double] = cseg
                i[double] = self.words[pad[double] + 1]
            if ((i & U64(3)) >= U64(_FAR)).any():
                raise MetadataError(f"{what}: far pointer to a far pointer")
            target[far] = t
            seg[far] = s
            info[far] = i
        if (kind == 3).any():
            raise MetadataError(f"{what}: capability pointer in a rootfs")
        target[w == 0] = -1
        return target, info, seg

    def structs(self, pos: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Struct pointers: (start word, data words, pointer count); start -1 if null."""
        target, info, seg = self.resolve(pos, what)
        null = target < 0
        if ((info[~null] & U64(3)) != U64(_STRUCT)).any():
            raise MetadataError(f"{what}: expected a struct")
        dsize = ((info >> U64(32)) & U64(0xFFFF)).astype(I64)
        psize = (info >> U64(48)).astype(I64)
        self._inside(target[~null], (dsize + psize)[~null], seg[~null], what)
        dsize[null] = 0
        psize[null] = 0
        return target, dsize, psize

    def lists(
        self, pos: np.ndarray, what: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Composite (struct) lists: (first element word, count, data words, pointer
        count); a null pointer is an empty list."""
        target, info, seg = self.resolve(pos, what)
        null = target < 0
        live = ~null
        if ((info[live] & U64(3)) != U64(_LIST)).any():
            raise MetadataError(f"{what}: expected a list")
        esize = ((info >> U64(32)) & U64(7)).astype(I64)
        words = (info >> U64(35)).astype(I64)
        if (esize[live] != _COMPOSITE).any():
            raise MetadataError(f"{what}: expected a list of structs")
        self._inside(target[live], words[live] + 1, seg[live], what)
        tag = np.zeros(len(pos), dtype=U64)
        tag[live] = self.words[target[live]]
        if ((tag[live] & U64(3)) != U64(_STRUCT)).any():
            raise MetadataError(f"{what}: malformed list tag")
        count = ((tag >> U64(2)) & U64(0x3FFFFFFF)).astype(I64)
        dsize = ((tag >> U64(32)) & U64(0xFFFF)).astype(I64)
        psize = (tag >> U64(48)).astype(I64)
        if (count * (dsize + psize) > words).any():
            raise MetadataError(f"{what}: list longer than its words")
        count[null] = 0
        self._spend(int(count.sum()), what)
        return target + 1, count, dsize, psize

    def blobs(self, pos: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Data (byte list) pointers: (byte offset into the message, length, present)."""
        target, info, seg = self.resolve(pos, what)
        present = target >= 0
        if ((info[present] & U64(3)) != U64(_LIST)).any():
            raise MetadataError(f"{what}: expected bytes")
        esize = ((info >> U64(32)) & U64(7)).astype(I64)
        length = (info >> U64(35)).astype(I64)
        length[~present] = 0
        if (esize[present] != _BYTE).any():
            raise MetadataError(f"{what}: expected a list of bytes")
        self._inside(target[present], (length[present] + 7) // 8, seg[present], what)
        total = int(length.sum())
        if total > self.byte_budget:
            raise MetadataError(f"{what}: the lists claim more bytes than the message holds")
        self.byte_budget -= total
        offset = self.table + 8 * np.where(present, target, 0)
        return offset, length, present

    def data_word(self, start: np.ndarray, dsize: np.ndarray, bit: int, width: int) -> np.ndarray:
        """A field of ``width`` bits at ``bit`` in each struct's data section; 0 (the
        default) where the struct is null or too short to hold it."""
        word = bit // 64  # Cap'n Proto never lets a field straddle two words
        has = (start >= 0) & (dsize > word)
        out = np.zeros(len(start), dtype=U64)
        if has.any():
            raw = self.words[start[has] + word]
            shift = U64(bit % 64)
            mask = U64((1 << width) - 1) if width < 64 else U64(0xFFFFFFFFFFFFFFFF)
            out[has] = (raw >> shift) & mask
        return out

    def pointer_slot(
        self, start: np.ndarray, dsize: np.ndarray, psize: np.ndarray, index: int
    ) -> np.ndarray:
        """Word positions of pointer ``index`` of each struct; -1 where absent."""
        has = (start >= 0) & (psize > index)
        return np.where(has, start + dsize + index, -1)

    def _inside(self, start: np.ndarray, size: np.ndarray, seg: np.ndarray, what: str) -> None:
        if len(start) and (
            (start < self.seg_start[seg]).any() or (start + size > self.seg_end[seg]).any()
        ):
            raise MetadataError(f"{what}: pointer outside its segment")

    def _spend(self, elements: int, what: str) -> None:
        if elements > self.element_budget:
            raise MetadataError(f"{what}: the lists claim more elements than the message holds")
        self.element_budget -= elements


def _signed30(w: np.ndarray) -> np.ndarray:
    off = ((w >> U64(2)) & U64(0x3FFFFFFF)).astype(I64)
    return np.where(off >= 1 << 29, off - (1 << 30), off)


def _elements(
    first: np.ndarray, count: np.ndarray, stride: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every element of many lists: (its word position, the index of its list)."""
    owner = np.repeat(np.arange(len(count), dtype=I64), count)
    if not len(owner):
        return owner, owner
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    index = np.arange(len(owner), dtype=I64) - np.repeat(starts, count)
    return first[owner] + index * stride[owner], owner


def _optional(msg: _Message, pos: np.ndarray, kind: str, what: str) -> tuple[np.ndarray, ...]:
    """Resolve the pointers at ``pos`` that exist (pos >= 0); absent ones are null."""
    n = len(pos)
    live = pos >= 0
    if kind == "struct":
        start = np.full(n, -1, dtype=I64)
        dsize = np.zeros(n, dtype=I64)
        psize = np.zeros(n, dtype=I64)
        if live.any():
            start[live], dsize[live], psize[live] = msg.structs(pos[live], what)
        return start, dsize, psize
    if kind == "list":
        first = np.zeros(n, dtype=I64)
        count = np.zeros(n, dtype=I64)
        dsize = np.zeros(n, dtype=I64)
        psize = np.zeros(n, dtype=I64)
        if live.any():
            first[live], count[live], dsize[live], psize[live] = msg.lists(pos[live], what)
        return first, count, dsize, psize
    offset = np.zeros(n, dtype=I64)
    length = np.zeros(n, dtype=I64)
    present = np.zeros(n, dtype=bool)
    if live.any():
        offset[live], length[live], present[live] = msg.blobs(pos[live], what)
    return offset, length, present


# -- the result -------------------------------------------------------------------------


@dataclass
class DecodedLayer:
    """One layer, in stored order. Byte fields are (offset, length) into the message."""

    ino: np.ndarray  # u64
    kind: np.ndarray  # discriminant codes (see DecodedRootfs.kinds)
    uid: np.ndarray
    gid: np.ndarray
    permissions: np.ndarray
    major: np.ndarray  # chr/blk
    minor: np.ndarray
    look_below: np.ndarray  # bool, dirs
    has_additional: np.ndarray  # bool
    target_offset: np.ndarray  # symlink target
    target_length: np.ndarray
    target_present: np.ndarray
    # directory entries
    entry_owner: np.ndarray  # index of the directory in this layer
    entry_ino: np.ndarray
    entry_name_offset: np.ndarray
    entry_name_length: np.ndarray
    # file chunks, in file order
    chunk_owner: np.ndarray
    chunk_len: np.ndarray
    chunk_blob_offset: np.ndarray
    chunk_compressed: np.ndarray
    chunk_digest_offset: np.ndarray  # 32 bytes each (checked)
    # xattrs
    xattr_owner: np.ndarray
    xattr_key_offset: np.ndarray
    xattr_key_length: np.ndarray
    xattr_val_offset: np.ndarray
    xattr_val_length: np.ndarray


@dataclass
class DecodedRootfs:
    data: bytes  # the message: every offset above points into it
    layers: list[DecodedLayer]
    verity_digest_offset: np.ndarray  # 32 bytes each
    verity_offset: np.ndarray  # 32 bytes each
    kinds: dict[int, str]  # discriminant -> union member name (Kind values)

    def slice(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def decode_rootfs(data: bytes, *, expected_version: int) -> DecodedRootfs:
    """Decode a whole rootfs blob. Raises MetadataError (or UnsupportedVersion)."""
    lay = _the_layout()
    msg = _Message(data)
    root = np.array([msg.seg_start[0]], dtype=I64)
    rstart, rdsize, rpsize = msg.structs(root, "rootfs root")
    if rstart[0] < 0:
        raise MetadataError("rootfs has no root struct")
    version = int(msg.data_word(rstart, rdsize, lay.rootfs_version, 64)[0])
    if version != expected_version:
        raise UnsupportedVersion(
            f"unsupported image version: got {version}, expected {expected_version}"
        )
    mfirst, mcount, mdsize, mpsize = _optional(
        msg, msg.pointer_slot(rstart, rdsize, rpsize, lay.rootfs_metadatas), "list", "metadatas"
    )
    if int(mcount[0]) == 0:
        raise MetadataError("rootfs has no metadata layers")
    vectors = int(mfirst[0]) + np.arange(int(mcount[0]), dtype=I64) * int(mdsize[0] + mpsize[0])
    vd = np.full(len(vectors), int(mdsize[0]))
    vp = np.full(len(vectors), int(mpsize[0]))
    layers = [
        _decode_layer(msg, lay, np.array([v]), vd[:1], vp[:1], n) for n, v in enumerate(vectors)
    ]
    vfirst, vcount, vdsize, vpsize = _optional(
        msg, msg.pointer_slot(rstart, rdsize, rpsize, lay.rootfs_verity), "list", "fsVerityData"
    )
    pos, _ = _elements(vfirst, vcount, vdsize + vpsize)
    d = np.full(len(pos), int(vdsize[0]))
    p = np.full(len(pos), int(vpsize[0]))
    doff, dlen, _ = _optional(
        msg, msg.pointer_slot(pos, d, p, lay.verity_digest), "data", "fsVerityData digest"
    )
    voff, vlen, _ = _optional(
        msg, msg.pointer_slot(pos, d, p, lay.verity_verity), "data", "fsVerityData verity"
    )
    if (dlen != 32).any() or (vlen != 32).any():
        raise MetadataError("fsVerityData entry is not two 32-byte digests")
    return DecodedRootfs(data, layers, doff, voff, dict(lay.kinds))


def _decode_layer(
    msg: _Message, lay: _Layout, vec: np.ndarray, vd: np.ndarray, vp: np.ndarray, n: int
) -> DecodedLayer:
    what = f"layer {n}"
    first, count, dsize, psize = _optional(
        msg, msg.pointer_slot(vec, vd, vp, lay.vector_inodes), "list", f"{what} inodes"
    )
    pos, _ = _elements(first, count, dsize + psize)
    k = len(pos)
    ds = np.full(k, int(dsize[0]) if len(dsize) else 0, dtype=I64)
    ps = np.full(k, int(psize[0]) if len(psize) else 0, dtype=I64)
    ino = msg.data_word(pos, ds, lay.inode_ino, 64)
    kind = msg.data_word(pos, ds, lay.mode_discriminant, 16).astype(np.int64)
    uid = msg.data_word(pos, ds, lay.inode_uid, 32)
    gid = msg.data_word(pos, ds, lay.inode_gid, 32)
    perm = msg.data_word(pos, ds, lay.inode_permissions, 16)
    # A union member this schema does not know: the inode is bad, not the layer.
    kind[~np.isin(kind, list(lay.kinds))] = -1
    mode_ptr = msg.pointer_slot(pos, ds, ps, lay.mode_pointer)
    code = lay.kind_code
    is_dir = kind == code["dir"]
    is_file = kind == code["file"]
    is_dev = (kind == code["chr"]) | (kind == code["blk"])

    # devices
    major = np.zeros(k, dtype=U64)
    minor = np.zeros(k, dtype=U64)
    dstart, ddsize, _ = _optional(msg, np.where(is_dev, mode_ptr, -1), "struct", f"{what} device")
    major[is_dev] = msg.data_word(dstart, ddsize, lay.dev_major, 64)[is_dev]
    minor[is_dev] = msg.data_word(dstart, ddsize, lay.dev_minor, 64)[is_dev]

    # directories
    sstart, sdsize, spsize = _optional(msg, np.where(is_dir, mode_ptr, -1), "struct", f"{what} dir")
    look_below = msg.data_word(sstart, sdsize, lay.dir_look_below, 1).astype(bool)
    efirst, ecount, edsize, epsize = _optional(
        msg, msg.pointer_slot(sstart, sdsize, spsize, lay.dir_entries), "list", f"{what} entries"
    )
    epos, eowner = _elements(efirst, ecount, edsize + epsize)
    eds = edsize[eowner]
    eps = epsize[eowner]
    entry_ino = msg.data_word(epos, eds, lay.entry_ino, 64)
    noff, nlen, _ = _optional(
        msg, msg.pointer_slot(epos, eds, eps, lay.entry_name), "data", f"{what} entry name"
    )

    # files
    ffirst, fcount, fdsize, fpsize = _optional(
        msg, np.where(is_file, mode_ptr, -1), "list", f"{what} file"
    )
    cpos, cowner = _elements(ffirst, fcount, fdsize + fpsize)
    cds = fdsize[cowner]
    cps = fpsize[cowner]
    clen = msg.data_word(cpos, cds, lay.chunk_len, 64)
    bstart, bdsize, bpsize = _optional(
        msg, msg.pointer_slot(cpos, cds, cps, lay.chunk_blob), "struct", f"{what} blob"
    )
    if len(bstart) and (bstart < 0).any():
        raise MetadataError(f"{what}: file chunk without a blob")
    boffset = msg.data_word(bstart, bdsize, lay.blob_offset, 64)
    bcomp = msg.data_word(bstart, bdsize, lay.blob_compressed, 1).astype(bool)
    goff, glen, _ = _optional(
        msg, msg.pointer_slot(bstart, bdsize, bpsize, lay.blob_digest), "data", f"{what} digest"
    )
    if (glen != 32).any():
        raise MetadataError(f"{what}: a chunk digest is not 32 bytes")

    # additional: xattrs and symlink targets
    astart, adsize, apsize = _optional(
        msg, msg.pointer_slot(pos, ds, ps, lay.inode_additional), "struct", f"{what} additional"
    )
    toff, tlen, tpresent = _optional(
        msg,
        msg.pointer_slot(astart, adsize, apsize, lay.add_target),
        "data",
        f"{what} symlink target",
    )
    xfirst, xcount, xdsize, xpsize = _optional(
        msg, msg.pointer_slot(astart, adsize, apsize, lay.add_xattrs), "list", f"{what} xattrs"
    )
    xpos, xowner = _elements(xfirst, xcount, xdsize + xpsize)
    xds = xdsize[xowner]
    xps = xpsize[xowner]
    koff, klen, _ = _optional(
        msg, msg.pointer_slot(xpos, xds, xps, lay.xattr_key), "data", f"{what} xattr key"
    )
    voff, vlen, _ = _optional(
        msg, msg.pointer_slot(xpos, xds, xps, lay.xattr_val), "data", f"{what} xattr value"
    )

    return DecodedLayer(
        ino=ino,
        kind=kind,
        uid=uid,
        gid=gid,
        permissions=perm,
        major=major,
        minor=minor,
        look_below=look_below,
        has_additional=astart >= 0,
        target_offset=toff,
        target_length=tlen,
        target_present=tpresent,
        entry_owner=eowner,
        entry_ino=entry_ino,
        entry_name_offset=noff,
        entry_name_length=nlen,
        chunk_owner=cowner,
        chunk_len=clen,
        chunk_blob_offset=boffset,
        chunk_compressed=bcomp,
        chunk_digest_offset=goff,
        xattr_owner=xowner,
        xattr_key_offset=koff,
        xattr_key_length=klen,
        xattr_val_offset=voff,
        xattr_val_length=vlen,
    )
