"""All regular files' contents as one stream, and the map back from chunks to files.

FastCDC runs over the concatenation of every non-empty regular file in inode order, so
chunks span file boundaries. The stream records where each file starts and ends as it
is read (sizes come from what was read, not from lstat, so a file that changes during
the build still gives a consistent image); :class:`ChunkMapper` then turns each chunk's
stream range into the FileChunk entries of the files it overlaps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from puzzlefs.builder.walk import Region
from puzzlefs.errors import BuildError
from puzzlefs.format import Ino


@dataclass(slots=True)
class Span:
    ino: Ino
    start: int
    end: int  # -1 until the file has been read to its end


class FileStream:
    """A readable stream over many files (``readinto`` only, for pyfastcdc)."""

    def __init__(
        self,
        files: Iterable[tuple[Ino, bytes | Region]],
        on_file: Callable[[int], None] | None = None,
    ) -> None:
        self._files = iter(files)
        self._current: int | None = None
        self._path = b""
        self._left: int | None = None  # bytes left in a Region
        self.offset = 0
        self.spans: list[Span] = []
        self._on_file = on_file

    def readinto(self, buffer: memoryview) -> int:
        while True:
            if self._current is None and not self._open_next():
                return 0
            assert self._current is not None
            view = buffer  # a Region's end limits this read only, not the next file's
            if self._left is not None and len(view) > self._left:
                view = view[: self._left]
            try:
                n = os.readv(self._current, [view]) if view else 0
            except OSError as e:
                raise BuildError(f"cannot read {os.fsdecode(self._path)}: {e.strerror}") from None
            if n:
                self.offset += n
                if self._left is not None:
                    self._left -= n
                return n
            if self._left:
                raise BuildError(f"{os.fsdecode(self._path)} is shorter than its tar header says")
            os.close(self._current)
            self._current = None
            self.spans[-1].end = self.offset
            if self._on_file:
                self._on_file(self.spans[-1].end - self.spans[-1].start)

    def _open_next(self) -> bool:
        for ino, source in self._files:
            path = source.path if isinstance(source, Region) else source
            flags = os.O_RDONLY | os.O_CLOEXEC
            if not isinstance(source, Region):
                flags |= os.O_NOFOLLOW
            try:
                fd = os.open(path, flags)
                self._left = None
                if isinstance(source, Region):
                    os.lseek(fd, source.offset, os.SEEK_SET)
                    self._left = source.length
            except OSError as e:
                raise BuildError(f"cannot open {os.fsdecode(path)}: {e.strerror}") from None
            self._current = fd
            self._path = path
            self.spans.append(Span(ino, self.offset, -1))
            return True
        return False

    def close(self) -> None:
        if self._current is not None:
            os.close(self._current)
            self._current = None


class ChunkMapper:
    """Consumes chunks in stream order; yields (ino, offset_in_chunk, length) pieces."""

    def __init__(self, spans: list[Span]) -> None:
        self._spans = spans  # grows as the stream reads ahead; never behind the chunks
        self._i = 0
        self._pos = 0

    def map(self, length: int) -> list[tuple[Ino, int, int]]:
        cstart, cend = self._pos, self._pos + length
        self._pos = cend
        pieces: list[tuple[Ino, int, int]] = []
        spans = self._spans
        while self._i < len(spans):
            s = spans[self._i]
            if s.start >= cend:
                break
            # A file still being read reaches at least to the end of this chunk (the
            # stream has read past it); only a finished file can end inside it.
            end = s.end if s.end >= 0 else cend
            lo, hi = max(s.start, cstart), min(end, cend)
            if hi > lo:
                pieces.append((s.ino, lo - cstart, hi - lo))
            if 0 <= s.end <= cend:
                self._i += 1
            else:
                break
        return pieces
