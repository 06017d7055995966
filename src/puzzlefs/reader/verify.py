"""Whole-image checks: ``verify`` (every blob present, right size, right sha256, and
with a digest the whole fs-verity chain) and ``enable_fs_verity`` (turn on kernel
fs-verity for every blob and check each measurement against the chain).

``verify`` never stops at the first problem: it lists them all, so one run tells the
operator everything that is wrong with a store.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from puzzlefs._files import open_regular, read_fd
from puzzlefs.compression import MAX_CHUNK_SIZE, SeekableBlob
from puzzlefs.digest import Digest
from puzzlefs.errors import (
    BlobNotFound,
    ImageError,
    PuzzleFSError,
    UnsafeFile,
    VerityMismatch,
)
from puzzlefs.format import Kind, RootfsReader
from puzzlefs.oci import (
    ANNOTATION_VERITY_ROOT,
    MEDIA_TYPE_INDEX,
    Descriptor,
    ImageLayout,
    Manifest,
)
from puzzlefs.oci.layout import MAX_JSON_BLOB, MAX_ROOTFS_BLOB, split_parts
from puzzlefs.progress import Progress
from puzzlefs.reader._open import MAX_TIMES_BLOB
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
    # For a chunk: the image is -c (puzzlefs.reference_compat accepts some of the
    # reference's records by this and by how the rootfs references the chunk).
    zstd_image: bool = False


@dataclass
class _ChunkUse:
    """How the rootfs uses one chunk blob: as compressed or raw, up to which byte."""

    compressed: set[bool] = field(default_factory=set)
    end: int = 0  # the end of the furthest range a file reads (uncompressed bytes)


_LIMITS = {
    "manifest": MAX_JSON_BLOB,
    "config": MAX_JSON_BLOB,
    "rootfs": MAX_ROOTFS_BLOB,
    "times": MAX_TIMES_BLOB,
}


def _get(layout: ImageLayout, desc: Descriptor, role: str) -> bytes:
    return layout.blobs.get(desc.digest, size=desc.size, limit=_LIMITS.get(role, MAX_CHUNK_SIZE))


def image_blobs(
    layout: ImageLayout,
    tag: str,
    problems: list[Problem],
    verity_digest: str | None = None,
    uses: dict[Digest, _ChunkUse] | None = None,
) -> tuple[Descriptor, list[_Blob]]:
    """The manifest and every blob it leads to, with what each must measure.
    ``uses`` receives how the rootfs uses each chunk."""
    desc = layout.resolve(tag)
    blobs = [_Blob(desc.digest, "manifest", desc.size, verity_digest)]
    try:
        data = _get(layout, desc, "manifest")
        if desc.media_type == MEDIA_TYPE_INDEX:  # an image split into manifest parts
            parts = split_parts(data, f"image index of {tag!r}")
            blobs += [_Blob(p.digest, "manifest", p.size, None) for p in parts]
            _, _, manifest = layout.read_manifest(tag)
        else:
            manifest = Manifest.from_bytes(data, f"manifest of {tag!r}")
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
    used: dict[bytes, _ChunkUse] = {}
    try:
        reader = RootfsReader(_get(layout, rootfs_desc, "rootfs"))
        verity = reader.verity()
        for raw in verity:
            used.setdefault(raw, _ChunkUse())
        for layer in range(reader.layer_count):
            for inode in reader.layer(layer):
                if inode.kind is Kind.FILE:
                    for c in inode.chunks:
                        use = used.setdefault(c.blob.digest, _ChunkUse())
                        use.compressed.add(c.blob.compressed)
                        use.end = max(use.end, c.blob.offset + c.len)
    except PuzzleFSError as e:
        problems.append(Problem(rootfs_desc.digest.hex, "rootfs", str(e)))
        # The rootfs cannot say which chunks the image uses; the manifest still can.
        blobs += [_Blob(d.digest, "chunk", d.size, None) for d in manifest.chunk_layers]
        return desc, blobs
    chunk_layers = manifest.chunk_layers
    sizes = {d.digest: d.size for d in chunk_layers}
    zstd_image = is_zstd_image(d.media_type for d in chunk_layers)  # once, not per chunk
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
                zstd_image,
            )
        )
        if uses is not None:
            uses[digest] = used[raw]
    return desc, blobs


def verify(
    oci_dir: str | Path,
    tag: str,
    *,
    verity_digest: str | None = None,
    progress: Progress | None = None,
) -> Report:
    layout = ImageLayout(oci_dir)
    problems: list[Problem] = []
    report = Report(tag, problems=problems)
    uses: dict[Digest, _ChunkUse] = {}
    verity_hex = verity_digest.lower() if verity_digest else None
    _, blobs = image_blobs(layout, tag, problems, verity_hex, uses)
    if progress:
        progress.expect("blobs", len(blobs))
    for blob in blobs:
        if progress:
            progress.add("blobs")
        _check_blob(layout, blob, uses.get(blob.digest), verity_hex is not None, report)
    if progress:
        progress.done()
    return report


def _check_blob(
    layout: ImageLayout, blob: _Blob, use: _ChunkUse | None, chain: bool, report: Report
) -> None:
    """Presence, size, sha256 (and with ``chain`` the fs-verity digest) of one blob;
    for a chunk, also that the ranges files read lie inside it (and for a compressed
    one that its seek table is sound). Nothing is read before the size is known to be
    right: a FIFO, a device or a 3 GB sparse file in the store costs one fstat."""
    problems = report.problems
    assert problems is not None

    def problem(message: str) -> None:
        problems.append(Problem(blob.digest.hex, blob.role, message))

    try:
        fd, size = open_regular(layout.blobs.path(blob.digest), f"{blob.role} blob")
    except FileNotFoundError:
        problem("missing")
        return
    except UnsafeFile as e:
        problem(str(e).removeprefix(f"{blob.role} blob "))
        return
    except OSError as e:
        problem(f"unreadable: {e.strerror}")
        return
    try:
        limit = _LIMITS.get(blob.role, MAX_CHUNK_SIZE)
        if size > limit:
            problem(f"{size} bytes, more than a {blob.role} blob can be ({limit})")
            return
        data = b""
        if use is not None:  # a chunk: small enough to hold, and needed whole below
            data = read_fd(fd, size)
        if blob.size is not None and size != blob.size and not _reference_size(blob, use, data):
            problem(f"size {size}, expected {blob.size}")
            return
        sha = hashlib.sha256(data).hexdigest() if use is not None else _sha256_fd(fd)
        report.checked += 1
        report.bytes += size
        if sha != blob.digest.hex:
            problem(f"sha256 is {sha}")
            return
        if use is not None:
            _check_ranges(data, use, problem)
        if chain and blob.verity is not None:
            actual = (measure_verity(fd) or fsverity_digest_fd(fd)).hex()
            if actual != blob.verity.lower() and not _reference_raw_chunk(blob, use, data):
                problem(f"fs-verity digest is {actual}, expected {blob.verity.lower()}")
    finally:
        os.close(fd)


def _reference_size(blob: _Blob, use: _ChunkUse | None, data: bytes) -> bool:
    """A chunk size the 0.2.0 reference records (see puzzlefs.reference_compat)."""
    return (
        blob.size is not None
        and use is not None
        and use.compressed == {True}
        and compressed_chunk_size_ok(
            blob.size, data, referenced_compressed=True, zstd_image=blob.zstd_image
        )
    )


def _reference_raw_chunk(blob: _Blob, use: _ChunkUse | None, data: bytes) -> bool:
    """A raw chunk's fs-verity record as the reference writes it (reference_compat)."""
    return (
        blob.verity is not None
        and use is not None
        and use.compressed == {False}
        and raw_chunk_verity_ok(
            bytes.fromhex(blob.verity), data, referenced_raw=True, zstd_image=blob.zstd_image
        )
    )


def _check_ranges(data: bytes, use: _ChunkUse, problem: Callable[[str], None]) -> None:
    if len(use.compressed) > 1:
        problem("used both as a compressed and as a raw chunk")
    for compressed in sorted(use.compressed):
        if compressed:
            try:
                size = SeekableBlob(data).size
            except ImageError as e:
                problem(str(e))
                continue
        else:
            size = len(data)
        if use.end > size:
            problem(f"files read up to byte {use.end} of its {size} (uncompressed)")


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
    uses: dict[Digest, _ChunkUse] = {}
    _, blobs = image_blobs(layout, tag, problems, manifest_digest.lower(), uses)
    if problems:
        raise ImageError(f"{problems[0].role} {problems[0].blob}: {problems[0].message}")
    for blob in blobs:
        path = layout.blobs.path(blob.digest)
        try:
            fd, size = open_regular(path, f"{blob.role} blob {blob.digest.hex}")
        except FileNotFoundError:
            raise BlobNotFound(f"{blob.role} blob {blob.digest.hex} is missing") from None
        try:
            enable_verity(fd)
            measured = measure_verity(fd)
            if measured is None:
                raise ImageError(f"{blob.role} blob {blob.digest.hex}: fs-verity not enabled")
            expected = blob.verity or fsverity_digest_fd(fd).hex()
            use = uses.get(blob.digest)
            if measured.hex() != expected and not (
                use is not None
                and size <= MAX_CHUNK_SIZE
                and _reference_raw_chunk(blob, use, read_fd(fd, size))
            ):
                raise VerityMismatch(
                    f"{blob.role} blob {blob.digest.hex}", expected, measured.hex()
                )
        finally:
            os.close(fd)
    return len(blobs)
