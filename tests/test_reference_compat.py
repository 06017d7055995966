"""The rules that accept the reference's own records (puzzlefs.reference_compat), and
nothing else: each rule fires only for the blob, the image and the record it names."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fuzz.layout import CaseLayout, copy_layout
from fuzz.seeds import build_seeds

from puzzlefs import extract, open_image
from puzzlefs.compression import compress_seekable, compress_seekable_checksummed
from puzzlefs.format import MANIFEST_VERSION, Inode, Kind
from puzzlefs.format._bulk import decode_rootfs
from puzzlefs.oci import MEDIA_TYPE_CHUNK, MEDIA_TYPE_CHUNK_ZSTD
from puzzlefs.reader._tables import Tables, build_tables
from puzzlefs.reference_compat import (
    compressed_chunk_size_ok,
    is_zstd_image,
    raw_chunk_verity_ok,
)
from puzzlefs.verity import fsverity_digest

RAW = random.Random(15).randbytes(70000)  # incompressible: the reference stores it raw
TEXT = b"compressible " * 6000


def test_zstd_image_means_every_chunk_layer_is_zstd() -> None:
    assert is_zstd_image([MEDIA_TYPE_CHUNK_ZSTD] * 2)
    assert not is_zstd_image([MEDIA_TYPE_CHUNK])
    assert not is_zstd_image([MEDIA_TYPE_CHUNK_ZSTD, MEDIA_TYPE_CHUNK])
    assert not is_zstd_image([])


@pytest.mark.parametrize("form", [compress_seekable_checksummed, compress_seekable])
def test_accepts_the_record_of_the_compressed_attempt(form: object) -> None:
    recorded = fsverity_digest(form(RAW))  # type: ignore[operator]
    assert raw_chunk_verity_ok(recorded, RAW, referenced_raw=True, zstd_image=True)


def test_only_for_raw_references_in_zstd_images() -> None:
    recorded = fsverity_digest(compress_seekable_checksummed(RAW))
    assert not raw_chunk_verity_ok(recorded, RAW, referenced_raw=False, zstd_image=True)
    assert not raw_chunk_verity_ok(recorded, RAW, referenced_raw=True, zstd_image=False)


def test_refuses_every_other_record_and_other_bytes() -> None:
    recorded = fsverity_digest(compress_seekable_checksummed(RAW))
    tampered = RAW[:-1] + bytes([RAW[-1] ^ 1])
    assert not raw_chunk_verity_ok(recorded, tampered, referenced_raw=True, zstd_image=True)
    assert not raw_chunk_verity_ok(recorded, RAW[:-1], referenced_raw=True, zstd_image=True)
    for other in (fsverity_digest(RAW), bytes(32), fsverity_digest(compress_seekable(tampered))):
        assert not raw_chunk_verity_ok(other, RAW, referenced_raw=True, zstd_image=True)


def test_refuses_a_raw_chunk_that_compression_would_have_shrunk() -> None:
    # The reference stores raw only what compression did not make smaller.
    recorded = fsverity_digest(compress_seekable_checksummed(TEXT))
    assert not raw_chunk_verity_ok(recorded, TEXT, referenced_raw=True, zstd_image=True)


def test_size_rule_accepts_the_uncompressed_size_only() -> None:
    stored = compress_seekable_checksummed(TEXT)
    ok = {"referenced_compressed": True, "zstd_image": True}
    assert compressed_chunk_size_ok(len(TEXT), stored, **ok)
    assert not compressed_chunk_size_ok(len(TEXT) + 1, stored, **ok)
    assert not compressed_chunk_size_ok(
        len(TEXT), stored, referenced_compressed=False, zstd_image=True
    )
    assert not compressed_chunk_size_ok(
        len(TEXT), stored, referenced_compressed=True, zstd_image=False
    )
    assert not compressed_chunk_size_ok(len(RAW), RAW, **ok)  # no seek table: not a zstd blob


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_a_whiteout_beside_its_inode_yields_in_every_reader(
    tmp_path: Path, whiteout_first: bool
) -> None:
    """One layer holding a number twice, a whiteout and a file (what the reference
    writes when a delta deletes one link of a hard-link group): extract, the tables a
    mount serves from, and lookups all read the file, whichever is stored first."""
    seeds = build_seeds(tmp_path / "seeds")
    copy_layout(seeds["plain"].oci, tmp_path / "oci")
    case = CaseLayout(tmp_path / "oci", "t")
    rootfs = case.rootfs()
    layer = rootfs.layers[0]
    small = next(i for i in layer if i.kind is Kind.FILE and i.size)
    at = layer.index(small)
    layer.insert(at if whiteout_first else at + 1, Inode(small.ino, Kind.WHT))
    case.set_rootfs_obj(rootfs)

    image = open_image(case.path, "t")
    assert image.find(small.ino) is not None
    out = tmp_path / "out"
    extract(image, out)
    data = case.read(case.rootfs_hex())
    built = build_tables(decode_rootfs(data, expected_version=MANIFEST_VERSION), bytes(32), None)
    tables = Tables(built.data)
    row = tables.row_of(small.ino)
    assert row is not None and tables.attr(row).size == small.size
    assert "stored twice in one layer" in " ".join(built.problems)
    names = [p for p, i in image.walk() if i.ino == small.ino]
    assert names and all((out / p.decode()).is_file() for p in names)
