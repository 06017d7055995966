"""Chunk compression: raw, or the zstd seekable format of FORMAT.md §4.

A compressed chunk is a run of independent zstd frames, each holding up to one frame
size (4096 bytes by default) of the chunk, then a skippable frame with a seek table, so
a reader can decompress just the frames that cover the bytes it wants. The frame size
and the zstd level (:class:`ZstdOptions`) default to the reference's.
"""

from puzzlefs.compression._seekable import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    MAX_CHUNK_SIZE,
    MAX_FRAME_DECOMPRESSED,
    MAX_LEVEL,
    REFERENCE_ZSTD,
    FrameCache,
    SeekableBlob,
    ZstdOptions,
    compress_chunk,
    compress_seekable,
    compress_seekable_checksummed,
    decompress_all,
)

__all__ = [
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_LEVEL",
    "MAX_CHUNK_SIZE",
    "MAX_FRAME_DECOMPRESSED",
    "MAX_LEVEL",
    "REFERENCE_ZSTD",
    "FrameCache",
    "SeekableBlob",
    "ZstdOptions",
    "compress_chunk",
    "compress_seekable",
    "compress_seekable_checksummed",
    "decompress_all",
]
