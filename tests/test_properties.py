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


# -- manifests: the whole-list check and the one-by-one parse agree ------------------

_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_DIGEST_TEXT = st.one_of(
    _HEX64.map(lambda h: "sha256:" + h),  # valid
    _HEX64.map(lambda h: "sha256:" + h.upper()),
    _HEX64.map(lambda h: "sha512:" + h),
    _HEX64.map(lambda h: "sha256:" + h[:-2] + " " + h[-1]),  # fromhex would skip the space
    _HEX64.map(lambda h: "sha256:" + h[:30] + "sha256:" + h[37:]),
    _HEX64.map(lambda h: "sha256:" + h[:63]),
    st.text(max_size=80),
    st.integers(),
    st.none(),
)
_JSON_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.text(max_size=5))
_MEDIA_TYPES = st.sampled_from(
    [
        "application/vnd.puzzlefs.image.filedata.v1",
        "application/vnd.puzzlefs.image.filedata.v1+zstd",
        "application/vnd.puzzlefs.image.rootfs.v1",
        "b",
    ]
)
_GOOD_LAYER = st.fixed_dictionaries(  # what a writer writes: the whole-list check's case
    {
        "mediaType": _MEDIA_TYPES,
        "digest": _HEX64.map(lambda h: "sha256:" + h),
        "size": st.integers(0, 2**40),
    },
    optional={
        "annotations": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
        "platform": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        "data": st.text(max_size=4),
    },
)
_ANY_LAYER = st.one_of(
    st.fixed_dictionaries(
        {
            "mediaType": st.one_of(_MEDIA_TYPES, _JSON_VALUE),
            "digest": _DIGEST_TEXT,
            "size": st.one_of(st.integers(0, 2**40), _JSON_VALUE),
        },
        optional={
            "annotations": st.one_of(
                st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), _JSON_VALUE))
            ),
            "platform": st.one_of(
                st.dictionaries(st.text(max_size=3), st.text(max_size=3)), _JSON_VALUE
            ),
            "data": _JSON_VALUE,
            "urls": st.lists(st.text(max_size=3), max_size=2),
        },
    ),
    _JSON_VALUE,
    st.lists(st.integers(), max_size=2),
)
_LAYERS = st.one_of(
    st.lists(_GOOD_LAYER, max_size=6),
    st.lists(st.one_of(_GOOD_LAYER, _GOOD_LAYER, _GOOD_LAYER, _ANY_LAYER), max_size=6),
)


@given(st.lists(_DIGEST_TEXT, max_size=6))
@settings(max_examples=400, deadline=None)
def test_all_valid_digests_is_parse_of_each(texts: list[object]) -> None:
    from puzzlefs.digest import Digest
    from puzzlefs.errors import InvalidDigest

    def parses(t: object) -> bool:
        try:
            Digest.parse(t)  # type: ignore[arg-type]
        except (InvalidDigest, AttributeError, TypeError):
            return False
        return True

    assert Digest.all_valid(texts) == all(parses(t) for t in texts)
    if Digest.all_valid(texts):
        assert [Digest.raw_of(t) for t in texts] == [Digest.parse(t).raw for t in texts]  # type: ignore[arg-type]


@given(_LAYERS)
@settings(max_examples=400, deadline=None)
def test_manifest_layers_checked_whole_or_one_by_one_alike(layers: list[object]) -> None:
    """Manifest.from_bytes takes the whole-list check's word only where every layer
    parses alone; the layers it makes later equal the ones parsed one by one, and a
    refusal is the one-by-one parse's (naming the layer)."""
    import json

    from puzzlefs.errors import ImageError
    from puzzlefs.oci import EMPTY_CONFIG, Descriptor, Manifest

    doc = {"schemaVersion": 2, "config": EMPTY_CONFIG.to_json(), "layers": layers}
    try:
        expected = [Descriptor.from_json(d, f"manifest layer {i}") for i, d in enumerate(layers)]
    except ImageError as e:
        with pytest.raises(ImageError) as raised:
            Manifest.from_bytes(json.dumps(doc).encode())
        assert str(raised.value) == str(e)
        return
    m = Manifest.from_bytes(json.dumps(doc).encode())
    chunk_blobs = m.chunk_blobs()  # before the layers are made
    rootfs = [d for d in expected if d.media_type == "application/vnd.puzzlefs.image.rootfs.v1"]
    if len(rootfs) == 1:
        assert m.rootfs == rootfs[0]
    assert m.layers == expected
    assert chunk_blobs == m.chunk_blobs()
    assert m == Manifest(EMPTY_CONFIG, expected)
