"""What chunk compression is made of, without the codec: the options, their limits, and
the largest chunk (everything a reader of plain chunks needs from this package, so
that it never loads zstd: a mount of a plain image would otherwise wait about 15 ms
for it on a cold cache)."""

from __future__ import annotations

from dataclasses import dataclass

from puzzlefs.errors import OptionError

DEFAULT_FRAME_SIZE = 4096
DEFAULT_LEVEL = 3
MIN_FRAME_SIZE = 512
# zstd's highest level short of its "ultra" ones. Frames are written without their size,
# so a frame header asks the decoder for the level's whole window: up to 8 MiB here, the
# most the zstd format asks every decoder to support (ultra levels want up to 128 MiB).
MAX_LEVEL = 19
# The largest chunk there can be: FastCDC's largest maximum (the fastcdc crate's v2020
# MAXIMUM_MAX; ChunkParams allows no more). A seek table that declares more, in one frame
# or in all of them, is refused: a 34 KB blob must not make a reader allocate gigabytes.
# A stored chunk blob is never larger either (a compressed chunk is stored only when it
# is smaller than the raw one).
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_FRAME_DECOMPRESSED = MAX_CHUNK_SIZE
# The zstd window a decoder needs for level 19 (our MAX_LEVEL), the most the zstd format
# asks every decoder to support: a frame header asking for more is refused, not obeyed.
MAX_WINDOW_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ZstdOptions:
    """How chunks are compressed. The defaults are the reference's and give its bytes;
    any other choice stays readable by every reader (each frame is plain zstd, and the
    seek table says how large each one is)."""

    frame_size: int = DEFAULT_FRAME_SIZE  # uncompressed bytes per independent frame
    level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.frame_size <= MAX_FRAME_DECOMPRESSED:
            raise OptionError(
                f"the zstd frame size must be {MIN_FRAME_SIZE} bytes to"
                f" {MAX_FRAME_DECOMPRESSED >> 20}M, got {self.frame_size}"
            )
        if not 1 <= self.level <= MAX_LEVEL:
            raise OptionError(f"the zstd level must be 1 to {MAX_LEVEL}, got {self.level}")


REFERENCE_ZSTD = ZstdOptions()
