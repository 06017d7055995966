"""Property tests: the chunker over one stream, the seek-table codec, Cap'n Proto."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from puzzlefs.builder.stream import ChunkMapper, FileStream
from puzzlefs.chunking import ChunkParams, Cutter, chunk_stream
from puzzlefs.compression import (
    MAX_LEVEL,
    SeekableBlob,
    ZstdOptions,
    compress_chunk,
    compress_seekable,
)
from puzzlefs.errors import MetadataError
from puzzlefs.format import (
    BlobRef,
    DirEntry,
    FileChunk,
    Ino,
    Inode,
    Kind,
    Rootfs,
    RootfsReader,
    encode_rootfs,
)
from puzzlefs.reader._cache import LRU

SMALL = ChunkParams(64, 256, 1024)


@st.composite
def _data(draw: st.DrawFn) -> bytes:
    # Mix random and repetitive runs: both cut differently.
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=3000),
                st.builds(
                    lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(0, 800)
                ),
            ),
            max_size=8,
        )
    )
    return b"".join(parts)


@given(_data())
@settings(max_examples=200, deadline=None)
def test_chunks_cover_the_stream_within_bounds(data: bytes) -> None:
    chunks = [bytes(c) for c in chunk_stream(io.BytesIO(data), SMALL)]
    assert b"".join(chunks) == data
    assert all(len(c) <= SMALL.max for c in chunks)
    assert all(len(c) >= SMALL.min for c in chunks[:-1])


@given(_data(), st.lists(st.integers(1, 4000), max_size=10))
@settings(max_examples=200, deadline=None)
def test_cutter_over_any_buffers_cuts_like_one_stream(data: bytes, reads: list[int]) -> None:
    # The build pipeline feeds the Cutter buffer by buffer, carrying the unfinished
    # tail over: whatever the buffer sizes, the cut points are the one stream's.
    expected = [len(c) for c in chunk_stream(io.BytesIO(data), SMALL)]
    cutter = Cutter(SMALL)
    lengths: list[int] = []
    carry, pos = b"", 0
    for n in [*reads, len(data)]:
        new, pos = data[pos : pos + n], pos + n
        final = pos >= len(data)
        buf = carry + new
        cut, covered = cutter.cut(memoryview(buf), final)
        assert sum(cut) == covered
        lengths += cut
        carry = buf[covered:]
        if final:
            break
    assert carry == b""
    assert lengths == expected


@given(st.lists(_data(), max_size=6))
@settings(max_examples=150, deadline=None)
def test_file_stream_maps_back_to_files(files: list[bytes]) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, content in enumerate(files):
            p = Path(d) / str(i)
            p.write_bytes(content)
            paths.append((Ino(i + 10), bytes(p)))
        stream = FileStream(paths)
        mapper = ChunkMapper(stream.spans)
        rebuilt: dict[int, bytearray] = {ino: bytearray() for ino, _ in paths}
        whole = b"".join(files)
        pos = 0
        for chunk in chunk_stream(stream, SMALL):
            data = bytes(chunk)
            assert data == whole[pos : pos + len(data)]
            pos += len(data)
            for ino, offset, length in mapper.map(len(data)):
                assert length > 0
                rebuilt[ino] += data[offset : offset + length]
        for (ino, _), content in zip(paths, files, strict=True):
            assert bytes(rebuilt[ino]) == content


@given(
    st.binary(max_size=40_000),
    st.sampled_from([512, 4096, 10_000]),
    st.integers(1, MAX_LEVEL),
)
@settings(max_examples=100, deadline=None)
def test_seekable_round_trip(data: bytes, frame: int, level: int) -> None:
    blob = SeekableBlob(compress_seekable(data, ZstdOptions(frame, level)))
    assert blob.size == len(data)
    assert blob.read_all() == data


@given(st.binary(min_size=1, max_size=20_000), st.data())
@settings(max_examples=100, deadline=None)
def test_seekable_random_reads(data: bytes, draw: st.DataObject) -> None:
    stored, compressed = compress_chunk(data)
    if not compressed:
        assert stored == data
        return
    blob = SeekableBlob(stored)
    offset = draw.draw(st.integers(0, len(data)))
    size = draw.draw(st.integers(0, len(data)))
    assert blob.read(offset, size) == data[offset : offset + size]


_READS = st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 9000)), max_size=12)


@given(st.binary(min_size=1, max_size=30_000), _READS)
@settings(max_examples=100, deadline=None)
def test_seekable_reads_through_a_frame_cache(data: bytes, reads: list[tuple[int, int]]) -> None:
    # A tiny LRU, so that frames are evicted too: every read still gives its bytes,
    # and a read keeps at most its first and last frames, each decompressed right.
    data = data * (1 + 30_000 // len(data))  # several 4 KiB frames
    blob = SeekableBlob(compress_seekable(data))
    cache: LRU[tuple[bytes, int], bytes] = LRU(3 * 4096, len)
    for offset, size in reads:
        before = set(cache._items)
        assert blob.read(offset, size, cache, b"k") == data[offset : offset + size]
        end = min(offset + size, len(data))
        if offset < end:
            edges = {(b"k", offset // 4096), (b"k", (end - 1) // 4096)}
            assert set(cache._items) - before <= edges
        for key in list(cache._items):
            i = key[1]
            assert cache.get(key) == data[i * 4096 : (i + 1) * 4096]


_names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n)
_u64 = st.integers(0, 2**64 - 1)
_u32 = st.integers(0, 2**32 - 1)
_no_nul = st.binary(min_size=1, max_size=100).filter(lambda b: b"\0" not in b)


@st.composite
def _inode(draw: st.DrawFn, ino: int) -> Inode:
    kind = draw(st.sampled_from(list(Kind)))
    inode = Inode(
        Ino(ino),
        kind,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 0o7777)),
    )
    if kind is Kind.DIR:
        inode.entries = [DirEntry(Ino(draw(_u64)), n) for n in draw(st.lists(_names, max_size=5))]
    elif kind is Kind.FILE:
        inode.chunks = [
            FileChunk(
                BlobRef(draw(st.binary(min_size=32, max_size=32)), draw(_u64), draw(st.booleans())),
                draw(st.integers(0, 2**61)),  # four of them stay within an off_t
            )
            for _ in range(draw(st.integers(0, 4)))
        ]
    elif kind in (Kind.CHR, Kind.BLK):
        inode.major, inode.minor = draw(_u32), draw(_u32)
    if kind is Kind.LNK:
        inode.symlink_target = draw(_no_nul)
    inode.xattrs = draw(st.lists(st.tuples(_no_nul, st.binary(max_size=50)), max_size=3))
    return inode


@st.composite
def _rootfs(draw: st.DrawFn) -> Rootfs:
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        inos = sorted(draw(st.sets(st.integers(1, 10_000), min_size=1, max_size=12)))
        layers.append([draw(_inode(i)) for i in inos])
    verity = draw(
        st.dictionaries(
            st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), max_size=5
        )
    )
    return Rootfs(layers, verity)


@given(_rootfs())
@settings(max_examples=150, deadline=None)
def test_capnp_round_trip(rootfs: Rootfs) -> None:
    data = encode_rootfs(rootfs)
    reader = RootfsReader(data)
    assert reader.decode() == rootfs
    assert encode_rootfs(reader.decode()) == data  # canonical: re-encoding is stable
    for layer_index, layer in enumerate(rootfs.layers):
        for inode in layer:
            assert reader.find(inode.ino, layer_index) == inode
            # What the mount decodes: sizes first, chunk lists only when read.
            lazy = reader.find(inode.ino, layer_index, lazy=True)
            assert lazy is not None and lazy.size == inode.size
            assert lazy == inode
        assert list(reader.layer(layer_index, lazy=True)) == layer


_OUT_OF_RANGE = {
    "device": lambda i: setattr(i, "kind", Kind.BLK) or setattr(i, "major", 2**32),
    "device-minor": lambda i: setattr(i, "kind", Kind.CHR) or setattr(i, "minor", 2**64 - 1),
    "nul-in-target": lambda i: setattr(i, "kind", Kind.LNK) or setattr(i, "symlink_target", b"a\0"),
    "empty-target": lambda i: setattr(i, "kind", Kind.LNK) or setattr(i, "symlink_target", b""),
    "nul-in-xattr": lambda i: setattr(i, "xattrs", [(b"user.a\0b", b"v")]),
    "empty-xattr": lambda i: setattr(i, "xattrs", [(b"", b"v")]),
    "permissions": lambda i: setattr(i, "permissions", 0o17777),
    "file-size": lambda i: (
        setattr(i, "kind", Kind.FILE)
        or setattr(i, "chunks", [FileChunk(BlobRef(bytes(32), 0, False), 2**62)] * 2)
    ),
    "digest-length": lambda i: (
        setattr(i, "kind", Kind.FILE)
        or setattr(i, "chunks", [FileChunk(BlobRef(bytes(31), 0, False), 1)])
    ),
}


@given(_rootfs(), st.sampled_from(sorted(_OUT_OF_RANGE)), st.data())
@settings(max_examples=100, deadline=None)
def test_fields_out_of_range_are_metadata_errors(
    rootfs: Rootfs, what: str, data: st.DataObject
) -> None:
    """What the schema can hold but no kernel, tar or file offset can: refused when
    the inode is decoded, as a MetadataError naming it (never an OverflowError or a
    ValueError inside extract or a mount)."""
    layer = data.draw(st.sampled_from(rootfs.layers))
    inode = data.draw(st.sampled_from(layer))
    _OUT_OF_RANGE[what](inode)
    reader = RootfsReader(encode_rootfs(rootfs))
    index = rootfs.layers.index(layer)
    with pytest.raises(MetadataError, match=f"inode {inode.ino}"):
        found = reader.find(inode.ino, index)
        assert found is not None
        list(found.chunks)
    with pytest.raises(MetadataError, match=f"inode {inode.ino}"):
        found = reader.find(inode.ino, index, lazy=True)
        assert found is not None
        list(found.chunks)
