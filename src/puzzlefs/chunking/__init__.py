"""Content-defined chunking of one byte stream with FastCDC (v2020, as the reference).

The cut points fix which blobs exist, so they are frozen by golden tests against the
reference's own values; the work itself happens in pyfastcdc's compiled code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pyfastcdc

from puzzlefs.errors import UsageError

__all__ = ["parse_size", "DEFAULT_PARAMS", "ChunkParams", "Cutter", "Readable", "chunk_stream"]


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int: ...


@dataclass(frozen=True, slots=True)
class ChunkParams:
    """FastCDC sizes in bytes. Any values give a readable image; they only decide which
    blobs exist, so builds on a base reuse the base's values."""

    min: int = 16 * 1024
    avg: int = 64 * 1024
    max: int = 256 * 1024
    normalization: int = 1

    def __post_init__(self) -> None:
        if not (64 <= self.min <= self.avg <= self.max):
            raise UsageError(f"chunk sizes must satisfy 64 <= MIN <= AVG <= MAX: {self}")
        if self.avg & (self.avg - 1):
            raise UsageError(f"the average chunk size must be a power of two: {self.avg}")
        # The fastcdc crate's v2020 bounds (pyfastcdc has the same), in bytes.
        if not (
            self.min <= 1024 * 1024
            and 256 <= self.avg <= 4 * 1024 * 1024
            and 1024 <= self.max <= 16 * 1024 * 1024
        ):
            raise UsageError(
                f"chunk sizes out of range: {self} (MIN at most 1M, AVG 256 to 4M, MAX 1K to 16M)"
            )

    @classmethod
    def parse(cls, text: str) -> ChunkParams:
        """Parse ``MIN:AVG:MAX`` with optional K/M suffixes, e.g. ``16K:64K:256K``."""
        parts = text.split(":")
        if len(parts) != 3:
            raise UsageError(f"chunk sizes must be MIN:AVG:MAX, got {text!r}")
        return cls(*(parse_size(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.min}:{self.avg}:{self.max}"


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M``, ``10G``: a size in bytes."""
    m = re.fullmatch(r"(\d+)([KkMmGgTt]?)(?:i?B)?", text.strip())
    if not m:
        raise UsageError(f"not a size: {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * scale


DEFAULT_PARAMS = ChunkParams()


def _fastcdc(params: ChunkParams) -> pyfastcdc.FastCDC:
    return pyfastcdc.FastCDC(
        params.avg,
        min_size=params.min,
        max_size=params.max,
        normalized_chunking=params.normalization,  # type: ignore[arg-type]
    )


def chunk_stream(stream: Readable, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[memoryview]:
    """Yield the chunks of ``stream`` in order.

    Each memoryview is only valid until the next one is requested (pyfastcdc reuses its
    buffer): copy it if it must outlive the iteration step.
    """
    for chunk in _fastcdc(params).cut_stream(stream):
        yield chunk.data


class Cutter:
    """FastCDC over a stream that the caller reads into buffers of its own.

    Gives exactly the cut points of :func:`chunk_stream`: where a chunk ends depends
    only on the ``max`` bytes after its start, so a chunk that starts at least ``max``
    bytes before the end of the data read so far is final. The caller keeps the
    buffers, so chunks can be handed on as views, without the copy that
    :func:`chunk_stream`'s reused buffer forces.
    """

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self._cdc = _fastcdc(params)
        self._max = params.max

    def cut(self, data: memoryview, final: bool) -> tuple[list[int], int]:
        """The lengths of the chunks that ``data`` (the stream's next bytes) starts
        with, and how many bytes they cover. Unless ``final`` (``data`` ends the
        stream), the rest is the start of a chunk that needs more data: pass it again,
        followed by the next bytes."""
        lengths: list[int] = []
        last_start = len(data) - self._max  # the last start whose chunk is final
        start = 0
        chunks = self._cdc.cut_buf(data)
        # Stop before asking for a chunk that may not be final: it would be cut for
        # nothing, and again with the next data.
        while final or start <= last_start:
            chunk = next(chunks, None)
            if chunk is None:
                break
            lengths.append(chunk.length)
            start += chunk.length
        return lengths, start
