"""What is mounted where: ``/proc/self/mountinfo``, read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FSTYPE", "SUBTYPE", "MountInfo", "canonical", "find_mount", "mounts"]

SUBTYPE = "puzzlefs"
FSTYPE = f"fuse.{SUBTYPE}"


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor", as /sys/class/bdi names it
    options: str = ""  # the superblock's options (overlay: lowerdir=..., upperdir=...)

    @property
    def is_puzzlefs(self) -> bool:
        if self.fstype == FSTYPE:
            return True
        # A puzzlefs mount whose subtype was overridden with -o: its source is still
        # OCI_DIR:TAG unless fsname= was overridden too.
        if not self.fstype.startswith("fuse"):
            return False
        oci_dir, sep, _ = self.source.rpartition(":")
        return bool(sep) and (Path(oci_dir) / "oci-layout").is_file()


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> Iterator[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
                yield MountInfo(
                    _unescape(fields[4]),
                    fields[sep + 1],
                    _unescape(fields[sep + 2]),
                    fields[2],
                    _unescape(fields[sep + 3]) if len(fields) > sep + 3 else "",
                )
            except (ValueError, IndexError):
                continue


def find_mount(path: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at exactly ``path``, or None."""
    target = canonical(path)
    found = None
    for m in mounts():
        if m.mountpoint == target:
            found = m  # later lines are mounted on top of earlier ones
    return found


def canonical(path: str | os.PathLike[str]) -> str:
    # Resolve symlinks in the parent only: the mountpoint itself may be a dead FUSE
    # mount that cannot be stat'ed.
    p = Path(os.path.abspath(path))
    return str(Path(os.path.realpath(p.parent)) / p.name) if p.name else str(p)
