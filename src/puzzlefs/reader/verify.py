"""Whole-image checks: ``verify`` (every blob present, right size, right sha256, and
with a digest the whole fs-verity chain) and ``enable_fs_verity`` (turn on kernel
fs-verity for every blob and check each measurement against the chain).

``verify`` never stops at the first problem: it lists them all, so one run tells the
operator everything that is wrong with a store.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError, PuzzleFSError, VerityMismatch
from puzzlefs.format import Kind, RootfsReader
from puzzlefs.oci import ANNOTATION_VERITY_ROOT, MEDIA_TYPE_INDEX, Descriptor, ImageLayout
from puzzlefs.oci.layout import split_parts
from puzzlefs.reference_compat import compressed_chunk_size_ok, is_zstd_image, raw_chunk_verity_ok
from puzzlefs.verity import enable_verity, fsverity_digest_fd, measure_verity

__all__ = ["Problem", "Report", "enable_fs_verity", "image_blobs", "verify"]


@dataclass(frozen=True)
class Problem:
    blob: str  # sha256 hex, or "" for the image as a whole
    role: str  # manifest, config, rootfs, chunk, image
    message: str


@dataclass
class Report:
    tag: str
    checked: int = 0
    bytes: int = 0
    problems: list[Problem] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "ok": self.ok,
            "blobs_checked": self.checked,
            "bytes_checked": self.bytes,
            "problems": [asdict(p) for p in self.problems or []],
        }


@dataclass(frozen=True)
class _Blob:
    digest: Digest
    role: str
    size: int | None  # known from a descriptor
    verity: str | None  # expected fs-verity hex, where the chain gives one
    # For a chunk: whether the rootfs references it compressed, and the image is -c
    # (puzzlefs.reference_compat accepts some of the reference's records by these).
    compressed: bool | None = None
    zstd_image: bool = False


def image_blobs(
    layout: ImageLayout, tag: str, problems: list[Problem], verity_digest: str | None = None
) -> tuple[Descriptor, list[_Blob]]:
    """The manifest and every blob it leads to, with what each must measure."""
    desc = layout.resolve(tag)
    blobs = [_Blob(desc.digest, "manifest", desc.size, verity_digest)]
    try:
        if desc.media_type == MEDIA_TYPE_INDEX:  # an image split into manifest parts
            parts = split_parts(layout.blobs.get(desc.digest), f"image index of {tag!r}")
            blobs += [_Blob(p.digest, "manifest", p.size, None) for p in parts]
        _, _, manifest = layout.read_manifest(tag)
        rootfs_desc = manifest.rootfs
    except PuzzleFSError as e:
        problems.append(Problem(desc.digest.hex, "manifest", str(e)))
        return desc, blobs
    blobs.append(_Blob(manifest.config.digest, "config", manifest.config.size, None))
    rootfs_verity = rootfs_desc.annotations.get(ANNOTATION_VERITY_ROOT)
    if verity_digest is not None and not rootfs_verity:
        problems.append(Problem(rootfs_desc.digest.hex, "rootfs", "no fs-verity annotation"))
    blobs.append(_Blob(rootfs_desc.digest, "rootfs", rootfs_desc.size, rootfs_verity))
    try:
        times = manifest.times
    except PuzzleFSError as e:
        problems.append(Problem(desc.digest.hex, "manifest", str(e)))
        times = None
    if times is not None:  # covered by the manifest's digest (and so by the chain)
        blobs.append(_Blob(times.digest, "times", times.size, None))
    try:
        reader = RootfsReader(layout.blobs.get(rootfs_desc.digest))
        verity = reader.verity()
        used: set[bytes] = set(verity)
        compressed: dict[bytes, bool] = {}
        for layer in range(reader.layer_count):
            for inode in reader.layer(layer):
                if inode.kind is Kind.FILE:
                    used.update(c.blob.digest for c in inode.chunks)
                    compressed.update((c.blob.digest, c.blob.compressed) for c in inode.chunks)
    except PuzzleFSError as e:
        problems.append(Problem(rootfs_desc.digest.hex, "rootfs", str(e)))
        # The rootfs cannot say which chunks the image uses; the manifest still can.
        blobs += [_Blob(d.digest, "chunk", d.size, None) for d in manifest.chunk_layers]
        return desc, blobs
    sizes = {d.digest: d.size for d in manifest.chunk_layers}
    for raw in sorted(used):
        try:
            digest = Digest.from_raw(raw)
        except PuzzleFSError as e:
            problems.append(Problem(raw.hex(), "chunk", str(e)))
            continue
        if digest not in sizes:
            problems.append(Problem(digest.hex, "chunk", "not listed in the manifest"))
        expected = verity.get(raw)
        if expected is None and verity_digest is not None:
            problems.append(Problem(digest.hex, "chunk", "no fsVerityData entry"))
        blobs.append(
            _Blob(
                digest,
                "chunk",
                sizes.get(digest),
                expected.hex() if expected else None,
                compressed.get(raw),
                is_zstd_image(manifest.chunk_layers),
            )
        )
    return desc, blobs


def verify(oci_dir: str | Path, tag: str, *, verity_digest: str | None = None) -> Report:
    layout = ImageLayout(oci_dir)
    problems: list[Problem] = []
    report = Report(tag, problems=problems)
    _, blobs = image_blobs(layout, tag, problems, verity_digest.lower() if verity_digest else None)
    for blob in blobs:
        path = layout.blobs.path(blob.digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            problems.append(Problem(blob.digest.hex, blob.role, "missing"))
            continue
        except OSError as e:
            problems.append(Problem(blob.digest.hex, blob.role, f"unreadable: {e.strerror}"))
            continue
        try:
            size = os.fstat(fd).st_size
            if blob.size is not None and size != blob.size and not _reference_size(blob, fd):
                problems.append(
                    Problem(blob.digest.hex, blob.role, f"size {size}, expected {blob.size}")
                )
            sha = _sha256_fd(fd)
            report.checked += 1
            report.bytes += size
            if sha != blob.digest.hex:
                problems.append(Problem(blob.digest.hex, blob.role, f"sha256 is {sha}"))
            if verity_digest is not None and blob.verity is not None:
                actual = (measure_verity(fd) or fsverity_digest_fd(fd)).hex()
                if actual != blob.verity.lower() and not _reference_raw_chunk(blob, fd):
                    problems.append(
                        Problem(
                            blob.digest.hex,
                            blob.role,
                            f"fs-verity digest is {actual}, expected {blob.verity.lower()}",
                        )
                    )
        finally:
            os.close(fd)
    return report


def _reference_size(blob: _Blob, fd: int) -> bool:
    """A chunk size the 0.2.0 reference records (see puzzlefs.reference_compat)."""
    return (
        blob.size is not None
        and blob.compressed is True
        and compressed_chunk_size_ok(
            blob.size, _read_fd(fd), referenced_compressed=True, zstd_image=blob.zstd_image
        )
    )


def _reference_raw_chunk(blob: _Blob, fd: int) -> bool:
    """A raw chunk's fs-verity record as the reference writes it (reference_compat)."""
    return (
        blob.verity is not None
        and blob.compressed is False
        and raw_chunk_verity_ok(
            bytes.fromhex(blob.verity),
            _read_fd(fd),
            referenced_raw=True,
            zstd_image=blob.zstd_image,
        )
    )


def _read_fd(fd: int) -> bytes:
    parts, offset = [], 0
    while data := os.pread(fd, 1 << 20, offset):
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while True:
        data = os.pread(fd, 1 << 20, offset)
        if not data:
            return h.hexdigest()
        h.update(data)
        offset += len(data)


def enable_fs_verity(oci_dir: str | Path, tag: str, manifest_digest: str) -> int:
    """Enable fs-verity on every blob of the image and check each measurement against
    the chain that starts at ``manifest_digest``. Returns the number of blobs."""
    layout = ImageLayout(oci_dir)
    problems: list[Problem] = []
    _, blobs = image_blobs(layout, tag, problems, manifest_digest.lower())
    if problems:
        raise ImageError(f"{problems[0].role} {problems[0].blob}: {problems[0].message}")
    for blob in blobs:
        path = layout.blobs.path(blob.digest)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            enable_verity(fd)
            measured = measure_verity(fd)
            if measured is None:
                raise ImageError(f"{blob.role} blob {blob.digest.hex}: fs-verity not enabled")
            expected = blob.verity or fsverity_digest_fd(fd).hex()
            if measured.hex() != expected and not _reference_raw_chunk(blob, fd):
                raise VerityMismatch(
                    f"{blob.role} blob {blob.digest.hex}", expected, measured.hex()
                )
        finally:
            os.close(fd)
    return len(blobs)
