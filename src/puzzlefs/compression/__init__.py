"""Chunk compression: raw, or the zstd seekable format of FORMAT.md §4.

A compressed chunk is a run of independent zstd frames, each holding up to one frame
size (4096 bytes by default) of the chunk, then a skippable frame with a seek table, so
a reader can decompress just the frames that cover the bytes it wants. The frame size
and the zstd level (:class:`ZstdOptions`) default to the reference's.

The options and limits come from ``_options``, which needs no codec; the codec's names
(``_seekable``, which loads zstd) are loaded the first time one is asked for, so that a
mount of a plain image never loads zstd at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from puzzlefs.compression._options import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_LEVEL,
    MAX_CHUNK_SIZE,
    MAX_FRAME_DECOMPRESSED,
    MAX_LEVEL,
    REFERENCE_ZSTD,
    ZstdOptions,
)

if TYPE_CHECKING:
    from puzzlefs.compression._seekable import (
        FrameCache,
        SeekableBlob,
        compress_chunk,
        compress_seekable,
        compress_seekable_checksummed,
        decompress_all,
    )

_CODEC = frozenset(
    {
        "FrameCache",
        "SeekableBlob",
        "compress_chunk",
        "compress_seekable",
        "compress_seekable_checksummed",
        "decompress_all",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CODEC:
        return getattr(importlib.import_module("puzzlefs.compression._seekable"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
