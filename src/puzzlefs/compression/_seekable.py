"""The zstd seekable format, byte-compatible with the reference writer.

The frames must be produced by a streaming compressor that is not told the input size:
zstd tunes its parameters to a known size, which would give other bytes than the
reference (and so other blob digests, and no de-duplication against its images).
"""

from __future__ import annotations

import bisect
import io
import struct
import threading
from itertools import accumulate, chain
from typing import Protocol

import zstandard

from puzzlefs.compression._options import (
    MAX_CHUNK_SIZE,
    MAX_FRAME_DECOMPRESSED,
    MAX_WINDOW_SIZE,
    REFERENCE_ZSTD,
    ZstdOptions,
)
from puzzlefs.errors import ImageError

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")  # number_of_frames, descriptor, magic
_SKIP_HEADER = struct.Struct("<II")  # magic, frame length
_CHECKSUM_FLAG = 0x80
_FLUSH_FRAME = zstandard.FLUSH_FRAME


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # A ZstdCompressor is not thread-safe; one per thread and level, reused across
    # frames (a fresh stream_writer() or compressobj() resets it, and gives the same
    # bytes as a new compressor).
    cctxs: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctxs", None)
    if cctxs is None:
        cctxs = _local.cctxs = {}
    c = cctxs.get(level)
    if c is None:
        c = cctxs[level] = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
        _local.dctx = d
    return d


def compress_seekable(data: bytes | memoryview, options: ZstdOptions = REFERENCE_ZSTD) -> bytes:
    """Compress ``data`` into the seekable format (always; see compress_chunk).

    Every frame goes through one stream writer: ``write`` (zstd only buffers the
    piece) then ``flush(FLUSH_FRAME)`` compresses it and ends the frame, so each frame
    starts as a stream of unknown size, byte for byte what a fresh ``compressobj()``
    gives, with fewer Python objects per 4 KiB frame and the frames gathered in one
    buffer instead of joined at the end.
    """
    mv = memoryview(data)
    frame_size = options.frame_size
    out = io.BytesIO()
    writer = _compressor(options.level).stream_writer(out, closefd=False)
    sizes: list[int] = []  # compressed, decompressed, per frame
    tell, end = out.tell, 0
    for start in range(0, len(mv), frame_size):
        piece = mv[start : start + frame_size]
        writer.write(piece)
        writer.flush(_FLUSH_FRAME)
        frame_end = tell()
        sizes += (frame_end - end, len(piece))
        end = frame_end
    nframes = len(sizes) // 2
    out.write(_SKIP_HEADER.pack(SKIPPABLE_MAGIC, nframes * 8 + _FOOTER.size))
    out.write(struct.pack(f"<{len(sizes)}I", *sizes))
    out.write(_FOOTER.pack(nframes, 0, SEEKABLE_MAGIC))
    return out.getvalue()


# What the 0.2.0 reference writes at the end of a stream that ends on a frame boundary:
# one more frame, empty, whose header (single segment) states its content size, 0.
_EMPTY_FRAME = bytes.fromhex("28b52ffd2000010000")


def _checksum32(piece: bytes | memoryview) -> int:
    """The low 32 bits of XXH64(piece, seed 0), the checksum of a legacy seek-table
    entry. zstd ends a frame written with a checksum with exactly those 32 bits (little
    endian), so libzstd computes it for us (a compression at level 1 of one frame)."""
    c: zstandard.ZstdCompressor | None = getattr(_local, "checksummer", None)
    if c is None:
        c = _local.checksummer = zstandard.ZstdCompressor(
            level=1, write_checksum=True, write_content_size=False
        )
    value: int = struct.unpack("<I", c.compress(piece)[-4:])[0]
    return value


def compress_seekable_checksummed(
    data: bytes | memoryview, options: ZstdOptions = REFERENCE_ZSTD
) -> bytes:
    """``data`` in the seekable format as the 0.2.0 reference crate writes it (its
    zstd-seekable 0.1.23 C writer): the frames of :func:`compress_seekable`, then, when
    ``data`` ends on a frame boundary, one empty frame, and a seek table of 12-byte
    entries (sizes and the checksum of each frame's content) with descriptor 0x80.

    That writer compresses with the libzstd it bundles (1.5.4): its frames are ours
    wherever that version and ours compress a frame alike, always for the raw blocks
    zstd writes for incompressible data. We never store this form; readers recompute
    it to check that reference's records (see :mod:`puzzlefs.reference_compat`)."""
    mv = memoryview(data)
    current = compress_seekable(mv, options)
    sizes = _parse_seek_table(memoryview(current))
    frames_end = sum(c for c, _ in sizes)
    entries: list[int] = []
    start = 0
    for compressed_size, size in sizes:
        entries += (compressed_size, size, _checksum32(mv[start : start + size]))
        start += size
    out = io.BytesIO()
    out.write(memoryview(current)[:frames_end])
    if len(mv) % options.frame_size == 0:
        out.write(_EMPTY_FRAME)
        entries += (len(_EMPTY_FRAME), 0, _checksum32(b""))
    nframes = len(entries) // 3
    out.write(_SKIP_HEADER.pack(SKIPPABLE_MAGIC, nframes * 12 + _FOOTER.size))
    out.write(struct.pack(f"<{len(entries)}I", *entries))
    out.write(_FOOTER.pack(nframes, _CHECKSUM_FLAG, SEEKABLE_MAGIC))
    return out.getvalue()


def compress_chunk(
    data: bytes | memoryview, options: ZstdOptions = REFERENCE_ZSTD
) -> tuple[bytes, bool]:
    """Return ``(stored_bytes, compressed)``: the seekable blob, or the raw chunk when
    compression does not make it smaller (as the reference does)."""
    blob = compress_seekable(data, options)
    if len(blob) < len(data):
        return blob, True
    return bytes(data), False


class FrameCache(Protocol):
    """Where a reader keeps decompressed frames: ``(blob key, frame index) -> bytes``,
    bounded by the reader (an LRU)."""

    def get(self, key: tuple[bytes, int]) -> bytes | None: ...

    def put(self, key: tuple[bytes, int], value: bytes) -> None: ...


class SeekableBlob:
    """Random access into one compressed chunk. Parses the seek table once; each read
    decompresses only the frames that cover the requested range."""

    __slots__ = ("_blob", "_comp_starts", "_decomp_starts", "_frames", "size")

    def __init__(self, blob: bytes | memoryview) -> None:
        self._blob = memoryview(blob)
        sizes = _parse_seek_table(self._blob)
        self._frames = sizes
        self._comp_starts = [0, *accumulate(c for c, _ in sizes)]
        self._decomp_starts = [0, *accumulate(d for _, d in sizes)]
        self.size = self._decomp_starts[-1]

    def read(
        self, offset: int, size: int, cache: FrameCache | None = None, key: bytes = b""
    ) -> bytes:
        """Bytes ``[offset, offset+size)`` of the decompressed chunk (short at its end).

        With a ``cache``, the first and last frames the range covers are looked up
        there under ``(key, index)`` and kept: they are the ones the next read of a
        sequential reader (whose requests rarely end on a frame boundary) or a small
        random read shares. Inner frames are decompressed without it: one lookup per
        frame would cost more than it saves."""
        end = min(offset + size, self.size)
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if offset >= end:
            return b""
        first = bisect.bisect_right(self._decomp_starts, offset) - 1
        last = bisect.bisect_left(self._decomp_starts, end) - 1
        if cache is None:
            parts = [self._frame(i) for i in range(first, last + 1)]
        else:
            parts = [
                self._cached_frame(i, cache, key) if i in (first, last) else self._frame(i)
                for i in range(first, last + 1)
            ]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        base = self._decomp_starts[first]
        return data[offset - base : end - base]

    def read_all(self) -> bytes:
        """The whole chunk, its frames decompressed in one call (outside the GIL), each
        checked against its seek table size as :meth:`read` checks it."""
        n = len(self._frames)
        if n == 0:
            return b""
        starts = self._comp_starts
        pairs = ((starts[i], starts[i + 1] - starts[i]) for i in range(n))
        segments = struct.pack(f"={2 * n}Q", *chain.from_iterable(pairs))
        sizes = struct.pack(f"={n}Q", *(d for _, d in self._frames))
        try:
            out = _decompressor().multi_decompress_to_buffer(
                zstandard.BufferWithSegments(self._blob, segments),
                decompressed_sizes=sizes,
                threads=0,
            )
        except zstandard.ZstdError as e:
            raise ImageError(f"corrupt zstd frame in compressed chunk: {e}") from None
        return b"".join(out[i] for i in range(n))  # type: ignore[misc]  # segments are buffers

    def _cached_frame(self, i: int, cache: FrameCache, key: bytes) -> bytes:
        frame = cache.get((key, i))
        if frame is None:
            frame = self._frame(i)
            cache.put((key, i), frame)
        return frame

    def _frame(self, i: int) -> bytes:
        start, stop = self._comp_starts[i], self._comp_starts[i + 1]
        expected = self._frames[i][1]
        try:
            out = _decompressor().decompress(
                self._blob[start:stop], max_output_size=max(expected, 1)
            )
        except zstandard.ZstdError as e:
            raise ImageError(f"corrupt zstd frame {i} in compressed chunk: {e}") from None
        if len(out) != expected:
            raise ImageError(
                f"compressed chunk frame {i}: expected {expected} bytes, decompressed {len(out)}"
            )
        return out


def decompress_all(blob: bytes | memoryview) -> bytes:
    return SeekableBlob(blob).read_all()


def _parse_seek_table(blob: memoryview) -> list[tuple[int, int]]:
    """Return ``[(compressed_size, decompressed_size), ...]`` after checking that the
    table describes the blob exactly."""
    n = len(blob)
    if n < _FOOTER.size + _SKIP_HEADER.size:
        raise ImageError("compressed chunk too short for a seek table")
    nframes, descriptor, magic = _FOOTER.unpack_from(blob, n - _FOOTER.size)
    if magic != SEEKABLE_MAGIC:
        raise ImageError("compressed chunk has no zstd seek table")
    if descriptor & 0x7C:
        raise ImageError(f"unsupported seek table descriptor {descriptor:#x}")
    entry = 12 if descriptor & _CHECKSUM_FLAG else 8
    table_len = nframes * entry + _FOOTER.size
    skip_start = n - table_len - _SKIP_HEADER.size
    if skip_start < 0:
        raise ImageError("seek table longer than its compressed chunk")
    smagic, slen = _SKIP_HEADER.unpack_from(blob, skip_start)
    if smagic != SKIPPABLE_MAGIC or slen != table_len:
        raise ImageError("malformed seek table frame")
    fmt = struct.Struct("<II" if entry == 8 else "<III")
    sizes = [
        (vals[0], vals[1]) for vals in fmt.iter_unpack(blob[skip_start + 8 : n - _FOOTER.size])
    ]
    if sum(c for c, _ in sizes) != skip_start:
        raise ImageError("seek table does not match the compressed chunk's length")
    largest = max((d for _, d in sizes), default=0)
    if largest > MAX_FRAME_DECOMPRESSED:
        raise ImageError(
            f"seek table declares a frame of {largest} bytes, more than a chunk can be"
            f" ({MAX_CHUNK_SIZE})"
        )
    total = sum(d for _, d in sizes)
    if total > MAX_CHUNK_SIZE:
        raise ImageError(
            f"seek table declares a chunk of {total} bytes, more than a chunk can be"
            f" ({MAX_CHUNK_SIZE})"
        )
    return sizes
