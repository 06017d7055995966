"""Opening one tag of a layout: the manifest and the rootfs, checked against the
fs-verity chain when a digest is given, before anything else looks at them."""

from __future__ import annotations

import hashlib
import os

from puzzlefs._files import check_size, open_regular
from puzzlefs.errors import BlobNotFound, DigestMismatch, ImageError, UnsafeFile, VerityMismatch
from puzzlefs.oci import ANNOTATION_VERITY_ROOT, Descriptor, ImageLayout
from puzzlefs.oci.layout import MAX_ROOTFS_BLOB
from puzzlefs.verity import fsverity_digest, fsverity_digest_fd

__all__ = ["OpenedImage"]

MAX_TIMES_BLOB = 1 << 32  # 24 bytes an inode: far more inodes than any rootfs holds


class OpenedImage:
    """A tag's manifest (verified), and its rootfs blob on demand (verified).

    ``verity_digest`` (hex): the fs-verity digest of the manifest, as ``build`` printed
    it. With it, the manifest and the rootfs are checked against the fs-verity chain;
    without it, against their sha256 (the blob store checks that on every read).
    """

    def __init__(self, layout: ImageLayout, tag: str, *, verity_digest: str | None = None):
        self.layout = layout
        self.tag = tag
        self.manifest_descriptor, manifest_bytes, self.manifest = layout.read_manifest(tag)
        self.verify_verity = verity_digest is not None
        if verity_digest is not None:
            actual = fsverity_digest(manifest_bytes).hex()
            if actual != verity_digest.lower():
                raise VerityMismatch(f"manifest of {tag!r}", verity_digest.lower(), actual)
        self.rootfs_descriptor: Descriptor = self.manifest.rootfs
        self._rootfs: bytes | None = None

    def rootfs_bytes(self) -> bytes:
        """The rootfs blob, checked (once) against its size, sha256 and, with a
        digest, the fs-verity digest the manifest records for it."""
        if self._rootfs is None:
            desc = self.rootfs_descriptor
            try:  # the size is checked before the blob is read
                data = self.layout.blobs.get(desc.digest, size=desc.size, limit=MAX_ROOTFS_BLOB)
            except BlobNotFound:
                raise BlobNotFound(f"rootfs blob {desc.digest.hex} is missing") from None
            except (DigestMismatch, UnsafeFile):
                raise
            except ImageError as e:
                raise ImageError(f"rootfs: {e}") from None
            if self.verify_verity:
                expected = self._rootfs_verity()
                actual = fsverity_digest(data).hex()
                if actual != expected:
                    raise VerityMismatch(f"rootfs blob {desc.digest.hex}", expected, actual)
            self._rootfs = data
        return self._rootfs

    def check_rootfs(self) -> None:
        """What :meth:`rootfs_bytes` checks, streamed from the file: for a reader that
        needs the rootfs intact but not its bytes (a mount whose index exists)."""
        desc = self.rootfs_descriptor
        what = f"rootfs blob {desc.digest.hex}"
        try:  # the same checks as every blob read (rootfs_bytes), on the descriptor
            fd, size = open_regular(self.layout.blobs.path(desc.digest), what)
        except FileNotFoundError:
            raise BlobNotFound(f"{what} is missing") from None
        except OSError as e:
            raise ImageError(f"{what}: {e.strerror}") from None
        try:
            check_size(what, size, desc.size, MAX_ROOTFS_BLOB)
            with os.fdopen(os.dup(fd), "rb") as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
            if actual != desc.digest.hex:
                raise DigestMismatch(what, desc.digest.hex, actual)
            if self.verify_verity:
                expected = self._rootfs_verity()
                got = fsverity_digest_fd(fd).hex()
                if got != expected:
                    raise VerityMismatch(what, expected, got)
        finally:
            os.close(fd)

    def _rootfs_verity(self) -> str:
        expected = self.rootfs_descriptor.annotations.get(ANNOTATION_VERITY_ROOT)
        if not expected:
            raise ImageError("manifest has no fs-verity digest for the rootfs")
        return expected.lower()

    def times_bytes(self) -> bytes | None:
        """The times blob (checked against its descriptor), or None if the image has
        none (its times are then 0)."""
        desc = self.manifest.times
        if desc is None:
            return None
        try:
            return self.layout.blobs.get(desc.digest, size=desc.size, limit=MAX_TIMES_BLOB)
        except BlobNotFound:
            raise BlobNotFound(f"times blob {desc.digest.hex} is missing") from None

    def stored_chunk_bytes(self) -> int:
        """What the image's chunk blobs take in the store (for statfs)."""
        return sum({raw: size for raw, size, _ in self.manifest.chunk_blobs()}.values())

    @property
    def chunk_stream(self) -> list[bytes]:
        """The chunk blobs in the manifest's (stream) order, for readahead."""
        return [raw for raw, _, _ in self.manifest.chunk_blobs()]

    @property
    def zstd_image(self) -> bool:
        """Whether the manifest's chunk layers say the image was built with compression."""
        from puzzlefs.reference_compat import is_zstd_image  # zstandard: not for a mount's start

        return is_zstd_image(t for _, _, t in self.manifest.chunk_blobs())
