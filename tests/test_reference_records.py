"""Readers accept the reference's records where they differ from ours (images rewritten
here the way the reference writes them; tests/compat checks the same against the
reference itself), and nothing more: the same records anywhere else are refused."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from puzzlefs import build, extract, open_image
from puzzlefs.compression import SeekableBlob, compress_seekable_checksummed
from puzzlefs.digest import Digest
from puzzlefs.errors import VerityMismatch
from puzzlefs.format import Kind, RootfsReader, encode_rootfs
from puzzlefs.oci import (
    ANNOTATION_VERITY_ROOT,
    MEDIA_TYPE_ROOTFS,
    Descriptor,
    ImageLayout,
    Manifest,
)
from puzzlefs.reader.verify import verify
from puzzlefs.verity import fsverity_digest

TAG = "t"
# stored bytes, referenced compressed -> the fs-verity record to write instead
Record = Callable[[bytes, bool], bytes]


def _reference_record(stored: bytes, compressed: bool) -> bytes:
    """What the reference records: for a raw chunk, its compressed attempt's digest."""
    return fsverity_digest(stored if compressed else compress_seekable_checksummed(stored))


def _rewrite(oci: Path, record: Record, *, reference_sizes: bool = False) -> str:
    """Rewrite the tag's fsVerityData with ``record`` (and, with ``reference_sizes``,
    give compressed chunks' descriptors their uncompressed size, as the 0.2.0 reference
    does); returns the new manifest's fs-verity digest."""
    layout = ImageLayout(oci)
    _, _, manifest = layout.read_manifest(TAG)
    rootfs = RootfsReader(layout.blobs.get(manifest.rootfs.digest)).decode()
    compressed = {
        c.blob.digest: c.blob.compressed
        for layer in rootfs.layers
        for inode in layer
        if inode.kind is Kind.FILE
        for c in inode.chunks
    }
    stored = {d: layout.blobs.get(Digest.from_raw(d)) for d in rootfs.verity}
    rootfs.verity = {d: record(stored[d], compressed[d]) for d in rootfs.verity}
    rootfs_bytes = encode_rootfs(rootfs)
    rootfs_desc = Descriptor(
        MEDIA_TYPE_ROOTFS,
        layout.blobs.put(rootfs_bytes),
        len(rootfs_bytes),
        {ANNOTATION_VERITY_ROOT: fsverity_digest(rootfs_bytes).hex()},
    )
    layers = [rootfs_desc]
    for d in manifest.chunk_layers:
        size = d.size
        if reference_sizes and compressed[d.digest.raw]:
            size = SeekableBlob(stored[d.digest.raw]).size
        layers.append(Descriptor(d.media_type, d.digest, size, d.annotations))
    data = Manifest(manifest.config, layers, manifest.annotations).to_bytes()
    layout.set_tag(TAG, layout.blobs.put(data), len(data))
    return fsverity_digest(data).hex()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "random").write_bytes(random.Random(15).randbytes(600_000))  # raw chunks
    (root / "text").write_bytes(b"compressible text " * 20_000)  # compressed chunks
    return root


def _raw_chunks(oci: Path) -> int:
    image = open_image(oci, TAG)
    return len(
        {c.blob.digest for c in image.resolve_path("random").chunks if not c.blob.compressed}
    )


def test_reference_records_of_a_compressed_image_are_accepted(tree: Path, tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree, oci, TAG, compress=True)
    assert _raw_chunks(oci) > 0
    digest = _rewrite(oci, _reference_record, reference_sizes=True)
    image = open_image(oci, TAG, verity_digest=digest)
    for name in ("random", "text"):
        assert b"".join(image.read_all(image.resolve_path(name))) == (tree / name).read_bytes()
    extract(image, tmp_path / "out")
    assert (tmp_path / "out" / "random").read_bytes() == (tree / "random").read_bytes()
    for verity_digest in (None, digest):
        report = verify(oci, TAG, verity_digest=verity_digest)
        assert report.ok, report.problems


def test_the_same_records_in_an_uncompressed_image_are_refused(tree: Path, tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree, oci, TAG)
    digest = _rewrite(oci, lambda stored, _: fsverity_digest(compress_seekable_checksummed(stored)))
    image = open_image(oci, TAG, verity_digest=digest)
    with pytest.raises(VerityMismatch):
        b"".join(image.read_all(image.resolve_path("random")))
    problems = verify(oci, TAG, verity_digest=digest).problems or []
    assert problems and all("fs-verity digest is" in p.message for p in problems)


def test_a_compressed_chunk_must_measure_to_its_record(tree: Path, tmp_path: Path) -> None:
    # The rule is for raw chunks only: a compressed chunk recorded by its contents'
    # compressed attempt (a form it does not have) is refused.
    oci = tmp_path / "oci"
    build(tree, oci, TAG, compress=True)
    digest = _rewrite(
        oci,
        lambda stored, compressed: fsverity_digest(
            compress_seekable_checksummed(SeekableBlob(stored).read_all() if compressed else stored)
        ),
    )
    image = open_image(oci, TAG, verity_digest=digest)
    with pytest.raises(VerityMismatch):
        b"".join(image.read_all(image.resolve_path("text")))
    assert not verify(oci, TAG, verity_digest=digest).ok


def test_a_tampered_raw_chunk_is_still_refused(tree: Path, tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree, oci, TAG, compress=True)
    digest = _rewrite(oci, _reference_record)
    image = open_image(oci, TAG)
    raw = next(c.blob.digest for c in image.resolve_path("random").chunks if not c.blob.compressed)
    path = ImageLayout(oci).blobs.path(Digest.from_raw(raw))
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    image = open_image(oci, TAG, verity_digest=digest)
    with pytest.raises(VerityMismatch):
        b"".join(image.read_all(image.resolve_path("random")))
    assert not verify(oci, TAG, verity_digest=digest).ok


def test_chunk_sizes_other_than_the_uncompressed_one_are_refused(
    tree: Path, tmp_path: Path
) -> None:
    oci = tmp_path / "oci"
    build(tree, oci, TAG, compress=True)
    layout = ImageLayout(oci)
    _, _, manifest = layout.read_manifest(TAG)
    layers = [manifest.rootfs] + [
        Descriptor(d.media_type, d.digest, d.size + 1, d.annotations) for d in manifest.chunk_layers
    ]
    data = Manifest(manifest.config, layers, manifest.annotations).to_bytes()
    layout.set_tag(TAG, layout.blobs.put(data), len(data))
    problems = verify(oci, TAG).problems or []
    assert len([p for p in problems if p.role == "chunk"]) == len(manifest.chunk_layers)
