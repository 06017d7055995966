"""Records the reference writes that the format's own rules would refuse, and exactly
when a reader accepts them.

Each rule is one function that a reader calls only after the ordinary check failed,
so images written here are checked as strictly as ever; each accepts only a record
that is a deterministic function of the bytes being checked, so no other bytes can
pass.

- fs-verity of raw-stored chunks: in a ``-c`` image, the reference stores a chunk raw
  when compression does not make it smaller, but records in fsVerityData the fs-verity
  digest of the compressed attempt, not of the stored bytes (FORMAT.md §8).
- Sizes of compressed chunks: the 0.2.0 reference gives a ``+zstd`` chunk's manifest
  descriptor the uncompressed size, not the stored one.
- One number stored twice in one layer, once as a whiteout (:data:`WHITEOUT_YIELDS`):
  when a ``-b`` build deletes one link of a hard-link group and keeps the others, the
  reference writes a whiteout for the inode beside the inode itself, and keeps every
  directory as it was: which link was deleted is recorded nowhere. Readers then take
  the inode, not the whiteout, so every link stays (the deleted name comes back): the
  one reading that loses nothing the image holds, and the same for every reader.
"""

from __future__ import annotations

from collections.abc import Iterable

from puzzlefs.errors import ImageError
from puzzlefs.oci import MEDIA_TYPE_CHUNK_ZSTD
from puzzlefs.verity import fsverity_digest

__all__ = ["WHITEOUT_YIELDS", "compressed_chunk_size_ok", "is_zstd_image", "raw_chunk_verity_ok"]

WHITEOUT_YIELDS = True
"""Where one layer stores a number twice, a whiteout and an inode, the inode is read
(format.RootfsReader.find and the mount's tables follow this)."""


def is_zstd_image(media_types: Iterable[str]) -> bool:
    """Whether the media types of a manifest's chunk layers say the image was built
    with compression."""
    return set(media_types) == {MEDIA_TYPE_CHUNK_ZSTD}


def raw_chunk_verity_ok(
    recorded: bytes, stored: bytes, *, referenced_raw: bool, zstd_image: bool
) -> bool:
    """Whether ``recorded``, the fsVerityData entry of a chunk blob whose ``stored``
    bytes do not measure to it, is the reference's record of a chunk it stored raw.

    Only for a blob the rootfs references with ``compressed=false`` in an image whose
    chunk layers are ``+zstd``, and only when the record is the fs-verity digest of
    what the reference compressed from exactly these bytes (in the 0.2.0 crate's form
    or the later one) and that attempt was not smaller than the bytes, which is why
    they were stored raw. Compression is injective, so the record still names these
    bytes and no others.

    The attempt is recomputed with our libzstd. Data that does not compress gets raw
    zstd blocks, the same in every version; should a version difference change one
    of its frames, the record is not reproduced and the blob is refused: a false
    refusal, never a false acceptance.
    """
    if not (referenced_raw and zstd_image):
        return False
    from puzzlefs.compression import compress_seekable, compress_seekable_checksummed

    for compress in (compress_seekable_checksummed, compress_seekable):
        attempt = compress(stored)
        if len(attempt) >= len(stored) and fsverity_digest(attempt) == recorded:
            return True
    return False


def compressed_chunk_size_ok(
    descriptor_size: int, stored: bytes, *, referenced_compressed: bool, zstd_image: bool
) -> bool:
    """Whether a manifest's ``descriptor_size`` for a chunk blob of another size is
    the 0.2.0 reference's: the size of the chunk before compression. Only for a blob
    the rootfs references with ``compressed=true`` in a ``+zstd`` image, and only when
    the blob's seek table says it decompresses to exactly that size."""
    if not (referenced_compressed and zstd_image):
        return False
    from puzzlefs.compression import SeekableBlob

    try:
        return SeekableBlob(stored).size == descriptor_size
    except ImageError:
        return False
