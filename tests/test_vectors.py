"""The reference implementation's own values: our bytes must be its bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pyfastcdc
import pytest
from treeutil import describe

from puzzlefs import build, extract, open_image
from puzzlefs.chunking import ChunkParams, chunk_stream
from puzzlefs.compression import SeekableBlob, compress_chunk, compress_seekable_checksummed
from puzzlefs.digest import Digest
from puzzlefs.oci import DiskBlobStore, ImageLayout, MemoryBlobStore


def _cases(vectors: Path) -> list[dict[str, object]]:
    return json.loads((vectors / "fastcdc-v2020.json").read_text())["cases"]  # type: ignore[no-any-return]


def test_fastcdc_cut_points(vectors: Path) -> None:
    data = (vectors / "SekienAkashita.jpg").read_bytes()
    for case in _cases(vectors):
        params = ChunkParams(case["min"], case["avg"], case["max"], case["normalization"])  # type: ignore[arg-type]
        lengths = [len(c) for c in chunk_stream(io.BytesIO(data), params)]
        assert lengths == [length for _, length in case["chunks"]], case  # type: ignore[attr-defined]
        if "md5" in case:
            md5s = [
                hashlib.md5(bytes(c)).hexdigest() for c in chunk_stream(io.BytesIO(data), params)
            ]
            assert md5s == case["md5"]


def test_fastcdc_gear_hashes(vectors: Path) -> None:
    """The compiled library's gear table is the reference's (the hashes prove it)."""
    data = (vectors / "SekienAkashita.jpg").read_bytes()
    for case in _cases(vectors):
        cdc = pyfastcdc.FastCDC(
            case["avg"],
            min_size=case["min"],
            max_size=case["max"],
            normalized_chunking=case["normalization"],
        )
        got = [[c.gear_hash, c.length] for c in cdc.cut_stream(io.BytesIO(data))]
        assert got == case["chunks"]


def test_compressed_blob_is_byte_identical(vectors: Path) -> None:
    blobs = json.loads((vectors / "blobs.json").read_text())
    data = (vectors / "SekienAkashita.jpg").read_bytes()
    expected = blobs["compressed"]["seekable"]
    stored, compressed = compress_chunk(data)
    assert compressed
    assert len(stored) == expected["size"]
    assert hashlib.sha256(stored).hexdigest() == expected["sha256"]
    assert stored == (vectors / expected["file"]).read_bytes()


def test_checksummed_form_is_the_old_reference_blob(vectors: Path) -> None:
    """The 0.2.0 crate's writer (12-byte seek-table entries with checksums), byte for
    byte: what readers recompute to accept that reference's records of raw chunks."""
    blobs = json.loads((vectors / "blobs.json").read_text())
    data = (vectors / "SekienAkashita.jpg").read_bytes()
    expected = blobs["compressed"]["seekable-legacy-checksummed"]
    assert compress_seekable_checksummed(data) == (vectors / expected["file"]).read_bytes()


@pytest.mark.parametrize("size", [4096, 8192, 262144])
def test_checksummed_form_ends_a_frame_aligned_chunk_with_an_empty_frame(size: int) -> None:
    # As the 0.2.0 reference does (tests/compat checks it against the reference itself).
    data = bytes(range(256)) * (size // 256)
    blob = compress_seekable_checksummed(data)
    nframes = int.from_bytes(blob[-9:-5], "little")
    assert nframes == size // 4096 + 1
    assert blob[-5] == 0x80
    last = blob[-9 - 12 : -9]
    assert last[4:8] == bytes(4)  # the empty frame decompresses to nothing
    assert last[8:12] == (0x51D8E999).to_bytes(4, "little")  # low 32 bits of XXH64(b"")
    assert SeekableBlob(blob).read_all() == data


@pytest.mark.parametrize("variant", ["seekable", "seekable-legacy-checksummed"])
def test_compressed_blobs_decompress(vectors: Path, variant: str) -> None:
    blobs = json.loads((vectors / "blobs.json").read_text())
    data = (vectors / "SekienAkashita.jpg").read_bytes()
    blob = SeekableBlob((vectors / blobs["compressed"][variant]["file"]).read_bytes())
    assert blob.size == len(data)
    assert blob.read_all() == data
    for offset, size in [(0, 1), (4095, 2), (8192, 4096), (100000, 20000), (109465, 10)]:
        assert blob.read(offset, size) == data[offset : offset + size]


def test_build_with_compression_writes_the_reference_blob(vectors: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "SekienAkashita.jpg").write_bytes((vectors / "SekienAkashita.jpg").read_bytes())
    build(src, tmp_path / "oci", "t", compress=True)
    assert (
        tmp_path
        / "oci/blobs/sha256/d568d1505905ee36e66ef6f94f544a50f52c6a63574048da0cf351b8235ff42b"
    ).is_file()
    image = open_image(tmp_path / "oci", "t")
    assert (
        b"".join(image.read_all(image.resolve_path("SekienAkashita.jpg")))
        == (vectors / "SekienAkashita.jpg").read_bytes()
    )


def test_put_blob_digest(vectors: Path, tmp_path: Path) -> None:
    vec = json.loads((vectors / "blobs.json").read_text())["put_blob"]
    for store in (MemoryBlobStore(), DiskBlobStore(tmp_path / "blobs")):
        digest = store.put(vec["text"].encode())
        assert digest == Digest(vec["sha256"])
        assert store.get(digest) == vec["text"].encode()


def _reference(vectors: Path) -> dict[str, object]:
    return json.loads((vectors / "reference-image.json").read_text())  # type: ignore[no-any-return]


def test_reference_image_extracts_to_its_tree(vectors: Path, tmp_path: Path) -> None:
    ref = _reference(vectors)
    image = open_image(vectors / "reference-image", str(ref["tag"]))
    out = tmp_path / "out"
    extract(image, out)
    got = describe(out)
    for entry in ref["tree"]:  # type: ignore[attr-defined]
        rel = os.fsencode(entry["path"] or ".")
        info = got.pop(rel)
        assert info["mode"] == int(entry["mode"], 8)
        if os.geteuid() == 0:
            assert (info["uid"], info["gid"]) == (entry["uid"], entry["gid"])
        if entry["type"] == "file":
            assert info["size"] == entry["size"]
            assert info["sha256"] == entry["sha256"]
    assert got == {}
    inos = {p.decode(): i.ino for p, i in image.walk()}
    assert inos == {e["path"]: e["ino"] for e in ref["tree"]}  # type: ignore[attr-defined]


def test_same_tree_gives_the_reference_rootfs_bytes(vectors: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to set the reference tree's owners")
    ref = _reference(vectors)
    ref_image = open_image(vectors / "reference-image", str(ref["tag"]))
    src = tmp_path / "src"
    extract(ref_image, src)
    build(src, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    rootfs = image.layout.blobs.get(image.rootfs_descriptor.digest)
    assert hashlib.sha256(rootfs).hexdigest() == ref["rootfs_sha256"]
    assert (
        image.rootfs_descriptor.annotations["io.puzzlefsoci.puzzlefs.puzzlefs_verity_root_hash"]
        == ref["rootfs_fsverity"]
    )


def test_reference_manifest_opens_by_media_type(vectors: Path) -> None:
    """The reference image lists its rootfs last; ours first. Both open."""
    layout = ImageLayout(vectors / "reference-image")
    _, data, manifest = layout.read_manifest("puzzlefs_example")
    assert hashlib.sha256(data).hexdigest() == _reference(vectors)["manifest_sha256"]
    assert manifest.layers[-1] is manifest.rootfs
