"""File modification times: a puzzlefs extension to format v3, in a blob of its own.

Format v3 stores no times, and a reader reports 0 (the epoch). Tools that compare
times then misjudge every file: Python takes each ``.pyc`` for stale and compiles its
module again on every start of a container. So a build may add a times blob to the
image, as a manifest layer of its own media type (``MEDIA_TYPE_TIMES`` in
:mod:`puzzlefs.oci.layout`, with every media type). The rootfs stays byte for byte what
the reference writes; the reference, which finds the rootfs by media type, ignores the
extra layer; images without one read as before (times 0).

The blob, little-endian: the magic ``PZFSTIM1``, the record count (u64), then one
24-byte record per inode sorted by inode number, strictly ascending:
``ino u64, mtime seconds i64 (before 1970: negative), nanoseconds u32 (< 10**9), 0 u32``.
A delta build's blob covers every inode of its merged tree.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from puzzlefs.errors import MetadataError

__all__ = ["Times", "decode_times", "encode_times"]

MAGIC = b"PZFSTIM1"
_HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<QqII")
_BILLION = 1_000_000_000


def encode_times(times: Iterable[tuple[int, int]]) -> bytes:
    """``(ino, mtime in ns)`` pairs, in any order, to the blob."""
    records = sorted(times)
    out = bytearray(_HEADER.pack(MAGIC, len(records)))
    last = -1
    for ino, ns in records:
        if ino == last:
            raise ValueError(f"inode {ino} given two times")
        last = ino
        sec, nsec = divmod(ns, _BILLION)
        out += RECORD.pack(ino, sec, nsec, 0)
    return bytes(out)


class Times:
    """A decoded times blob: mtime (ns) by inode number, by bisection."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise MetadataError("times blob too short")
        magic, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise MetadataError("not a puzzlefs times blob")
        if len(data) != _HEADER.size + count * RECORD.size:
            raise MetadataError("times blob size does not match its count")
        self.data = data
        self.count = count
        self._inos = memoryview(data)[_HEADER.size :].cast("Q")[::3]

    def mtime_ns(self, ino: int) -> int:
        """The inode's mtime in nanoseconds (0 if the blob has none for it)."""
        lo, hi = 0, self.count
        inos = self._inos
        while lo < hi:
            mid = (lo + hi) // 2
            if inos[mid] < ino:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.count and inos[lo] == ino:
            _, sec, nsec, _ = RECORD.unpack_from(self.data, _HEADER.size + lo * RECORD.size)
            return int(sec * _BILLION + nsec)
        return 0

    @property
    def body_offset(self) -> int:
        return _HEADER.size


def decode_times(data: bytes) -> Times:
    """Check a times blob whole (ascending inodes, valid nanoseconds) and open it."""
    times = Times(data)
    prev = -1
    for i in range(times.count):
        ino, _, nsec, _ = RECORD.unpack_from(data, _HEADER.size + i * RECORD.size)
        if ino <= prev or nsec >= _BILLION:
            raise MetadataError("times blob: records out of order or nanoseconds out of range")
        prev = ino
    return times
