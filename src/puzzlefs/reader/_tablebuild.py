"""Building the index file of :mod:`puzzlefs.reader._tables` from a decoded rootfs, with
numpy: the layers merged (the newest layer's inode wins; whiteouts delete), every
field checked, the tree walked from the root once, link counts counted.

Imported only to build an index: serving one needs no numpy.
"""

from __future__ import annotations

import numpy as np

from puzzlefs.errors import MetadataError
from puzzlefs.format._bulk import DecodedLayer, DecodedRootfs
from puzzlefs.reader._tables import (
    BLOB,
    CHUNK,
    ENTRY,
    FILE_TYPES,
    HEADER,
    INODE,
    MAGIC,
    MAX_NAME,
    MAX_SIZE,
    MAX_TARGET,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    VERSION,
    XATTR,
    Built,
    _checksum,
)

I64 = np.int64
U64 = np.uint64
_U32_LIMIT = 1 << 32


INODE_DTYPE = np.dtype(
    [
        ("ino", "<u8"),
        ("size", "<u8"),
        ("mode", "<u4"),
        ("nlink", "<u4"),
        ("uid", "<u4"),
        ("gid", "<u4"),
        ("a", "<u4"),
        ("b", "<u4"),
        ("xa", "<u4"),
        ("xn", "<u4"),
        ("mtime", "<i8"),
        ("mtime_nsec", "<u4"),
        ("pad", "<u4"),
    ]
)
TIME_DTYPE = np.dtype([("ino", "<u8"), ("sec", "<i8"), ("nsec", "<u4"), ("pad", "<u4")])
ENTRY_DTYPE = np.dtype([("row", "<u4"), ("off", "<u4"), ("len", "<u4"), ("pad", "<u4")])
CHUNK_DTYPE = np.dtype([("file", "<u8"), ("blob_off", "<u8"), ("blob", "<u4"), ("comp", "<u4")])
XATTR_DTYPE = np.dtype([("koff", "<u4"), ("klen", "<u4"), ("voff", "<u4"), ("vlen", "<u4")])
assert INODE_DTYPE.itemsize == INODE.size and ENTRY_DTYPE.itemsize == ENTRY.size
assert CHUNK_DTYPE.itemsize == CHUNK.size and XATTR_DTYPE.itemsize == XATTR.size


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, count: int, what: str) -> None:
        if count:
            self.lines.append(f"{count} {what}")


def _owned(
    layers: list[DecodedLayer], final_of: list[np.ndarray], owner: str, *fields: str
) -> tuple[np.ndarray, ...]:
    """Rows of a per-layer table (entries, chunks, xattrs) whose owner inode is the one
    its number resolves to: (the owner's merged index, then each field), concatenated
    over the layers, each layer's rows in stored order."""
    columns: list[list[np.ndarray]] = [[] for _ in range(len(fields) + 1)]
    for i, lay in enumerate(layers):
        merged = final_of[i][getattr(lay, owner)]
        keep = merged >= 0
        columns[0].append(merged[keep])
        for col, name in zip(columns[1:], fields, strict=True):
            col.append(getattr(lay, name)[keep])
    return tuple(np.concatenate(col) for col in columns)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenation of ``range(s, s + c)`` for each pair, and each value's pair."""
    counts = counts.astype(I64)
    owner = np.repeat(np.arange(len(counts), dtype=I64), counts)
    if not len(owner):
        return owner, owner
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return starts.astype(I64)[owner] + np.arange(len(owner), dtype=I64) - first[owner], owner


def _gather(
    msg: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The byte ranges, concatenated, and where each one starts in the result."""
    idx, _ = _ranges(offsets, lengths)
    out = msg[idx] if len(idx) else np.zeros(0, dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths.astype(I64))[:-1]]) if len(lengths) else lengths
    return out, starts.astype(I64)


def _has_byte(
    msg: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, values: tuple[int, ...]
) -> np.ndarray:
    """For each byte range: does it contain any of ``values``?"""
    idx, owner = _ranges(offsets, lengths)
    bad = np.zeros(len(offsets), dtype=bool)
    if len(idx):
        hit = np.isin(msg[idx], values)
        bad[owner[hit]] = True
    return bad


def _digests(words: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """32-byte values at byte ``offsets`` (each word-aligned: Cap'n Proto data starts
    on a word) as one ``V32`` each."""
    first = offsets.astype(I64) // 8
    if not len(first):
        return np.zeros(0, dtype="V32")
    cols = words[first[:, None] + np.arange(4, dtype=I64)]
    return np.ascontiguousarray(cols).view("V32").ravel()


def _names_key(msg: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Names as fixed-width byte strings, which numpy orders as their bytes are ordered
    (names hold no NUL, so the padding sorts a prefix first)."""
    width = int(lengths.max()) if len(lengths) else 1
    out = np.zeros((len(offsets), max(width, 1)), dtype=np.uint8)
    idx, owner = _ranges(offsets, lengths)
    if len(idx):
        first = np.concatenate([[0], np.cumsum(lengths.astype(I64))[:-1]])
        col = np.arange(len(idx), dtype=I64) - first[owner]
        out[owner, col] = msg[idx]
    return out.view(f"S{max(width, 1)}").ravel()


def build(decoded: DecodedRootfs, source: bytes, times: bytes | None) -> Built:
    msg = np.frombuffer(decoded.data, dtype=np.uint8)
    code = {name: c for c, name in decoded.kinds.items()}
    problems = _Problems()
    layers = decoded.layers

    # 1. The inode each number resolves to: the newest layer's.
    ino = np.concatenate([lay.ino for lay in layers])
    layer_of = np.concatenate([np.full(len(lay.ino), i, dtype=I64) for i, lay in enumerate(layers)])
    row_in = np.concatenate([np.arange(len(lay.ino), dtype=I64) for lay in layers])
    # A number stored twice in one layer: its inode before its whiteout
    # (reference_compat.WHITEOUT_YIELDS), else the first stored.
    all_kinds = np.concatenate([lay.kind for lay in layers])
    yields = all_kinds == code["wht"]
    order = np.lexsort((row_in, yields, layer_of, ino))
    sorted_ino = ino[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ino[1:] != sorted_ino[:-1]
    sorted_layer = layer_of[order]
    twice = ~first[1:] & (sorted_layer[1:] == sorted_layer[:-1])
    problems.note(
        int(twice.sum()), "inode numbers stored twice in one layer (the first not a whiteout read)"
    )
    win = order[first]
    n = len(win)
    w_ino = ino[win]
    w_layer = layer_of[win]
    w_row = row_in[win]

    def pick(name: str) -> np.ndarray:
        return np.concatenate([getattr(lay, name) for lay in layers])[win]

    kind = pick("kind")
    uid, gid, perm = pick("uid"), pick("gid"), pick("permissions")
    major, minor = pick("major"), pick("minor")
    toff, tlen, tpresent = pick("target_offset"), pick("target_length"), pick("target_present")

    # Where each layer's rows went (-1: shadowed by a newer layer).
    final_of = [np.full(len(lay.ino), -1, dtype=I64) for lay in layers]
    for i in range(len(layers)):
        mine = w_layer == i
        final_of[i][w_row[mine]] = np.nonzero(mine)[0]

    # 2. Fields Linux can represent, or the inode is hidden.
    ok = np.ones(n, dtype=bool)
    deleted = kind == code["wht"]
    ok &= ~deleted
    unknown = (kind == -1) | (kind == code["unknown"])
    problems.note(int(unknown.sum()), "inodes of an unknown kind hidden")
    ok &= ~unknown
    zero = w_ino == 0
    problems.note(int(zero.sum()), "inodes numbered 0 hidden")
    ok &= ~zero
    dev = (kind == code["chr"]) | (kind == code["blk"])
    bad_dev = dev & ((major >= U64(1 << 12)) | (minor >= U64(1 << 20)))
    problems.note(int(bad_dev.sum()), "devices with numbers beyond 12:20 bits hidden")
    ok &= ~bad_dev
    lnk = kind == code["lnk"]
    bad_lnk = lnk & (~tpresent | (tlen == 0) | (tlen > MAX_TARGET))
    nul_target = np.zeros(n, dtype=bool)
    nul_target[lnk] = _has_byte(msg, toff[lnk], tlen[lnk], (0,))
    bad_lnk |= nul_target
    problems.note(
        int(bad_lnk.sum()), "symlinks with an empty, overlong or NUL-bearing target hidden"
    )
    ok &= ~bad_lnk

    # 3. File chunks, in file order, and file sizes.
    chunk_owner, chunk_len, chunk_boff, chunk_comp, chunk_dig = _owned(
        layers,
        final_of,
        "chunk_owner",
        "chunk_len",
        "chunk_blob_offset",
        "chunk_compressed",
        "chunk_digest_offset",
    )
    corder = np.argsort(chunk_owner, kind="stable")  # each file's pieces stay in order
    chunk_owner, chunk_len, chunk_boff, chunk_comp, chunk_dig = (
        a[corder] for a in (chunk_owner, chunk_len, chunk_boff, chunk_comp, chunk_dig)
    )
    is_file = kind == code["file"]
    approx = np.bincount(chunk_owner, weights=chunk_len.astype(np.float64), minlength=n)
    huge_piece = np.zeros(n, dtype=bool)
    huge_piece[chunk_owner[chunk_len > U64(MAX_SIZE)]] = True
    too_big = is_file & (huge_piece | (approx > float(MAX_SIZE - (1 << 12))))
    problems.note(int(too_big.sum()), "files larger than 2**63-1 bytes hidden")
    ok &= ~too_big

    # 4. Directory entries: valid names, existing targets, one per name.
    ent_dir, ent_ino, ent_off, ent_len = _owned(
        layers, final_of, "entry_owner", "entry_ino", "entry_name_offset", "entry_name_length"
    )
    good = (ent_len >= 1) & (ent_len <= MAX_NAME)
    dot = (ent_len <= 2) & (ent_len >= 1)
    if dot.any():
        first_dot = msg[np.where(dot, ent_off, 0)] == ord(".")
        last_dot = msg[np.where(dot, ent_off + ent_len - 1, 0)] == ord(".")
        good &= ~(dot & first_dot & last_dot)
    good[good] &= ~_has_byte(msg, ent_off[good], ent_len[good], (0, ord("/")))
    problems.note(int((~good).sum()), "entries with invalid names hidden")
    pos = np.searchsorted(w_ino, ent_ino)
    exists = pos < n
    exists[exists] = w_ino[pos[exists]] == ent_ino[exists]
    dangling = good & ~exists
    problems.note(int(dangling.sum()), "entries naming inodes stored in no layer hidden")
    child = np.where(exists, pos, -1)
    live = good & exists
    live[live] &= ok[child[live]]  # deleted (whiteout) and bad inodes: not listed
    ent_dir, child, ent_off, ent_len = ent_dir[live], child[live], ent_off[live], ent_len[live]
    keys = _names_key(msg, ent_off, ent_len)
    eorder = np.lexsort((np.arange(len(keys)), keys, ent_dir))
    ent_dir, child, ent_off, ent_len, keys = (
        a[eorder] for a in (ent_dir, child, ent_off, ent_len, keys)
    )
    dup = np.zeros(len(keys), dtype=bool)
    if len(keys) > 1:
        dup[1:] = (ent_dir[1:] == ent_dir[:-1]) & (keys[1:] == keys[:-1])
    problems.note(int(dup.sum()), "entries repeating a name in their directory hidden")
    ent_dir, child, ent_off, ent_len = (a[~dup] for a in (ent_dir, child, ent_off, ent_len))
    is_dir = kind == code["dir"]
    dir_start = np.searchsorted(ent_dir, np.arange(n), side="left")
    dir_count = np.searchsorted(ent_dir, np.arange(n), side="right") - dir_start

    # 5. Walk from the root: each directory once, by its first entry reached.
    root_pos = int(np.searchsorted(w_ino, 1))
    if root_pos >= n or w_ino[root_pos] != 1 or not ok[root_pos] or not is_dir[root_pos]:
        raise MetadataError("the image has no root directory (inode 1)")
    reached = np.zeros(n, dtype=bool)
    reached[root_pos] = True
    visible = np.zeros(len(child), dtype=bool)
    frontier = np.array([root_pos], dtype=I64)
    while len(frontier):
        eidx, _ = _ranges(dir_start[frontier], dir_count[frontier])
        ch = child[eidx]
        sub = is_dir[ch]
        visible[eidx[~sub]] = True
        cand, cch = eidx[sub], ch[sub]
        fresh = ~reached[cch]
        cand, cch = cand[fresh], cch[fresh]
        uniq, at = np.unique(cch, return_index=True)
        visible[cand[at]] = True
        reached[uniq] = True
        frontier = uniq
    hidden_dirs = int((~visible & is_dir[child] & np.isin(ent_dir, np.nonzero(reached)[0])).sum())
    problems.note(hidden_dirs, "entries making a second path to a directory (or a loop) hidden")
    ent_dir, child, ent_off, ent_len = (a[visible] for a in (ent_dir, child, ent_off, ent_len))

    # 6. The inodes a reader can reach, renumbered as rows; link counts.
    keep = np.zeros(n, dtype=bool)
    keep[root_pos] = True
    keep[child] = True
    row = np.cumsum(keep) - 1
    nlink = np.bincount(child, minlength=n).astype(I64)
    subdirs = np.bincount(ent_dir[is_dir[child]], minlength=n).astype(I64)
    nlink = np.where(is_dir, 2 + subdirs, nlink)
    rows = np.nonzero(keep)[0]
    count = len(rows)
    ent_dir_row = row[ent_dir]
    ent_child_row = row[child]
    first_entry = np.searchsorted(ent_dir_row, np.arange(count), side="left")
    entry_count = np.searchsorted(ent_dir_row, np.arange(count), side="right") - first_entry

    # chunks of the kept files
    kept_chunk = keep[chunk_owner] & is_file[chunk_owner]
    chunk_owner, chunk_len, chunk_boff, chunk_comp, chunk_dig = (
        a[kept_chunk] for a in (chunk_owner, chunk_len, chunk_boff, chunk_comp, chunk_dig)
    )
    crow = row[chunk_owner]
    first_chunk = np.searchsorted(crow, np.arange(count), side="left")
    chunk_count = np.searchsorted(crow, np.arange(count), side="right") - first_chunk
    cumulative = np.cumsum(chunk_len, dtype=U64)
    start_of = np.concatenate([[U64(0)], cumulative[:-1]]) if len(cumulative) else cumulative
    file_offset = start_of - (start_of[first_chunk[crow]] if len(crow) else start_of)
    sizes = np.zeros(count, dtype=U64)
    if len(crow):
        np.add.at(sizes, crow, chunk_len)
    words = np.frombuffer(decoded.data, dtype="<u8", count=len(decoded.data) // 8)
    digests = _digests(words, chunk_dig)
    blob_digests, blob_of_chunk = np.unique(digests, return_inverse=True)
    blob_verity = np.zeros(len(blob_digests), dtype="V32")
    if len(decoded.verity_digest_offset) and len(blob_digests):
        v_digest = _digests(words, decoded.verity_digest_offset)
        v_verity = _digests(words, decoded.verity_offset)
        vorder = np.argsort(v_digest, kind="stable")
        v_digest, v_verity = v_digest[vorder], v_verity[vorder]
        at = np.minimum(np.searchsorted(v_digest, blob_digests), len(v_digest) - 1)
        hit = v_digest[at] == blob_digests
        blob_verity[hit] = v_verity[at[hit]]

    # xattrs of the kept inodes, bad ones dropped
    xo, xko, xkl, xvo, xvl = _owned(
        layers,
        final_of,
        "xattr_owner",
        "xattr_key_offset",
        "xattr_key_length",
        "xattr_val_offset",
        "xattr_val_length",
    )
    sel = keep[xo]
    xo, xko, xkl, xvo, xvl = (a[sel] for a in (xo, xko, xkl, xvo, xvl))
    xgood = (xkl >= 1) & (xkl <= MAX_XATTR_NAME) & (xvl <= MAX_XATTR_VALUE)
    xgood[xgood] &= ~_has_byte(msg, xko[xgood], xkl[xgood], (0,))
    problems.note(int((~xgood).sum()), "xattrs with an invalid key or an oversized value dropped")
    xo, xko, xkl, xvo, xvl = (a[xgood] for a in (xo, xko, xkl, xvo, xvl))
    xorder = np.argsort(xo, kind="stable")
    xo, xko, xkl, xvo, xvl = (a[xorder] for a in (xo, xko, xkl, xvo, xvl))
    xrow = row[xo]
    first_xattr = np.searchsorted(xrow, np.arange(count), side="left")
    xattr_count = np.searchsorted(xrow, np.arange(count), side="right") - first_xattr

    # 7. Strings: names, then symlink targets, then xattr keys and values.
    k_kind = kind[rows]
    k_lnk = k_kind == code["lnk"]
    pieces_off = np.concatenate([ent_off, toff[rows][k_lnk], xko, xvo])
    pieces_len = np.concatenate([ent_len, tlen[rows][k_lnk], xkl, xvl])
    strings, at = _gather(msg, pieces_off, pieces_len)
    if len(strings) >= _U32_LIMIT or len(ent_off) >= _U32_LIMIT or len(chunk_len) >= _U32_LIMIT:
        raise MetadataError("the image is too large for the index")
    ne, nl, nx = len(ent_off), int(k_lnk.sum()), len(xko)
    name_at = at[:ne]
    target_at = at[ne : ne + nl]
    key_at = at[ne + nl : ne + nl + nx]
    val_at = at[ne + nl + nx :]

    # 8. The records.
    inodes = np.zeros(count, dtype=INODE_DTYPE)
    inodes["ino"] = w_ino[rows]
    fmt = np.zeros(n, dtype=np.uint32)
    for name, bits in FILE_TYPES.items():
        fmt[kind == code[name]] = bits
    inodes["mode"] = fmt[rows] | (perm[rows].astype(np.uint32) & 0o7777)
    inodes["nlink"] = np.minimum(nlink[rows], _U32_LIMIT - 1)
    inodes["uid"] = uid[rows]
    inodes["gid"] = gid[rows]
    k_dir = k_kind == code["dir"]
    k_file = k_kind == code["file"]
    k_dev = (k_kind == code["chr"]) | (k_kind == code["blk"])
    inodes["size"] = np.where(k_file, sizes, 0)
    inodes["size"][k_lnk] = tlen[rows][k_lnk]
    a = np.zeros(count, dtype=np.uint32)
    b = np.zeros(count, dtype=np.uint32)
    a[k_dir], b[k_dir] = first_entry[k_dir], entry_count[k_dir]
    a[k_file], b[k_file] = first_chunk[k_file], chunk_count[k_file]
    a[k_lnk], b[k_lnk] = target_at, tlen[rows][k_lnk]
    a[k_dev], b[k_dev] = major[rows][k_dev], minor[rows][k_dev]
    inodes["a"], inodes["b"] = a, b
    inodes["xa"], inodes["xn"] = first_xattr, xattr_count
    if times is not None:
        _set_times(inodes, times)

    entries = np.zeros(ne, dtype=ENTRY_DTYPE)
    entries["row"] = ent_child_row
    entries["off"] = name_at
    entries["len"] = ent_len
    chunks = np.zeros(len(chunk_len), dtype=CHUNK_DTYPE)
    chunks["file"] = file_offset
    chunks["blob_off"] = chunk_boff
    chunks["blob"] = blob_of_chunk
    chunks["comp"] = chunk_comp
    blobs = np.zeros(len(blob_digests), dtype=[("d", "V32"), ("v", "V32")])
    blobs["d"], blobs["v"] = blob_digests, blob_verity
    xattrs = np.zeros(nx, dtype=XATTR_DTYPE)
    xattrs["koff"], xattrs["klen"], xattrs["voff"], xattrs["vlen"] = key_at, xkl, val_at, xvl
    assert blobs.dtype.itemsize == BLOB.size

    notes = "\n".join(problems.lines).encode()
    data = _assemble(source, inodes, entries, chunks, blobs, xattrs, strings, notes)
    return Built(data, problems.lines)


def _set_times(inodes: np.ndarray, blob: bytes) -> None:
    """Each inode's mtime from the image's times blob (puzzlefs.format.times)."""
    from puzzlefs.format.times import Times

    t = Times(blob)  # checks the header and the size
    records = np.frombuffer(blob, dtype=TIME_DTYPE, offset=t.body_offset, count=t.count)
    ino = records["ino"]
    if len(ino) > 1 and not (ino[1:] > ino[:-1]).all():
        raise MetadataError("times blob: records out of order")
    if (records["nsec"] >= 1_000_000_000).any():
        raise MetadataError("times blob: nanoseconds out of range")
    if not len(ino):
        return
    at = np.minimum(np.searchsorted(ino, inodes["ino"]), len(ino) - 1)
    hit = ino[at] == inodes["ino"]
    inodes["mtime"][hit] = records["sec"][at[hit]]
    inodes["mtime_nsec"][hit] = records["nsec"][at[hit]]


def _assemble(
    source: bytes,
    inodes: np.ndarray,
    entries: np.ndarray,
    chunks: np.ndarray,
    blobs: np.ndarray,
    xattrs: np.ndarray,
    strings: np.ndarray,
    notes: bytes,
) -> bytes:
    parts = [
        inodes.tobytes(),
        entries.tobytes(),
        chunks.tobytes(),
        blobs.tobytes(),
        xattrs.tobytes(),
    ]
    offsets = []
    pos = HEADER.size
    body = bytearray()
    for p in parts:
        offsets.append(pos)
        body += p
        pos += len(p)
        pad = -pos % 8
        body += bytes(pad)
        pos += pad
    strings_at = pos
    body += strings.tobytes()
    body += notes
    end = HEADER.size + len(body)
    header = bytearray(
        HEADER.pack(
            MAGIC,
            VERSION,
            0,
            len(inodes),
            len(entries),
            len(chunks),
            len(blobs),
            len(xattrs),
            len(strings) + len(notes),
            *offsets,
            strings_at,
            len(notes),
            end,
            source,
            bytes(32),
        )
    )
    header[-32:] = _checksum(bytes(header) + bytes(body))
    return bytes(header) + bytes(body)
