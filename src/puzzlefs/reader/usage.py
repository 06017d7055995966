"""``puzzlefs du``: what each tag costs, what tags share, and what the store saves
against the tarballs the same trees would make.

The tar size is computed from the metadata, as GNU tar writes the tree in the POSIX
(pax) format with xattrs, as the benchmark data set's tars are made: a 512-byte header
per entry, contents padded to 512 bytes, a pax header for names that do not fit ustar,
long link targets and xattrs, hard links as headers only, two zero blocks at the end,
all padded to the 10 KiB record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError
from puzzlefs.format import Kind
from puzzlefs.oci import ImageLayout
from puzzlefs.progress import Progress
from puzzlefs.reader._image import Image
from puzzlefs.reader.verify import Problem, image_blobs

__all__ = ["StoreUsage", "TagUsage", "usage"]

BLOCK = 512
RECORD = 20 * BLOCK


def _pad(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class TagUsage:
    tag: str
    files: int = 0
    logical: int = 0  # file bytes, each hard-linked inode once
    tar: int = 0
    stored: int = 0  # bytes of every blob the tag needs
    metadata: int = 0  # manifest + config + rootfs + times
    chunks: int = 0  # bytes of chunk blobs
    chunk_count: int = 0
    shared: int = 0  # stored bytes also needed by another listed tag
    adds: int = 0  # stored bytes no other listed tag needs: what removing it would free
    blobs: dict[Digest, int] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "files": self.files,
            "file_bytes": self.logical,
            "tar_bytes": self.tar,
            "stored_bytes": self.stored,
            "metadata_bytes": self.metadata,
            "chunk_bytes": self.chunks,
            "chunks": self.chunk_count,
            "shared_bytes": self.shared,
            "adds_bytes": self.adds,
        }


@dataclass
class StoreUsage:
    tags: list[TagUsage]
    unified: int  # bytes of the union of the tags' blobs
    unified_metadata: int
    skipped: list[str] = field(default_factory=list)  # tags of images not puzzlefs

    @property
    def tar_total(self) -> int:
        return sum(t.tar for t in self.tags)

    @property
    def saved(self) -> float:
        return 1 - self.unified / self.tar_total if self.tar_total else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "tags": [t.to_json() for t in self.tags],
            "stored_bytes": self.unified,
            "metadata_bytes": self.unified_metadata,
            "tar_bytes": self.tar_total,
            "saved": round(self.saved, 4),
            "skipped": list(self.skipped),
        }

    def table(self) -> str:
        n = len(self.tags) or 1
        stored_total = sum(t.stored for t in self.tags)

        def mb(x: float) -> str:
            return f"{x / 1e6:,.1f} MB"

        rows = [
            ("Type", "Total size", "Average tag size", "Unified size", "Saved"),
            (
                "Uncompressed tar",
                mb(self.tar_total),
                mb(self.tar_total / n),
                mb(self.tar_total),
                "0%",
            ),
            (
                "PuzzleFS",
                mb(stored_total),
                mb(stored_total / n),
                mb(self.unified),
                f"{self.saved:.0%}",
            ),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def _pax_record(key: bytes, value: bytes) -> int:
    """Length of one pax record, ``"%d %s=%s\n"``, whose length counts itself."""
    body = len(key) + len(value) + 3  # space, '=', newline
    n = body + len(str(body))
    return body + len(str(n))


def _fits_ustar(name: bytes) -> bool:
    if len(name) <= 100:
        return True
    # ustar splits a long name at a '/' into a 155-byte prefix and a 100-byte name
    return any(i <= 155 and len(name) - i - 1 <= 100 for i, c in enumerate(name) if c == ord("/"))


def _tar_size(image: Image, progress: Progress | None = None) -> tuple[int, int, int]:
    """(tar bytes, regular files, logical bytes) of the visible tree, as
    ``tar --format=posix --xattrs -C TREE -cf - .`` writes it."""
    total = 0
    files = 0
    logical = 0
    seen: set[int] = set()
    for path, inode in image.walk():
        if progress is not None:
            progress.add("entries")
        name = b"./" + path + (b"/" if inode.kind is Kind.DIR and path else b"")
        records = 0
        if not _fits_ustar(name):
            records += _pax_record(b"path", name)
        target = inode.symlink_target or b""
        if inode.kind is Kind.LNK and len(target) > 100:
            records += _pax_record(b"linkpath", target)
        for key, value in inode.xattrs:
            records += _pax_record(b"SCHILY.xattr." + key, value)
        total += BLOCK + (BLOCK + _pad(records) if records else 0)
        if inode.kind is Kind.FILE:
            if inode.ino in seen:
                continue  # a hard link: a header only
            seen.add(inode.ino)
            size = inode.size
            files += 1
            logical += size
            total += _pad(size)
    total += 2 * BLOCK
    return (total + RECORD - 1) // RECORD * RECORD, files, logical


def usage(
    oci_dir: str | Path, tags: list[str] | None = None, *, progress: Progress | None = None
) -> StoreUsage:
    """What each tag stores and shares. ``progress`` counts the tags done (of all) and
    the entries walked (only when it is shown: a call per entry)."""
    layout = ImageLayout(oci_dir)
    skipped: list[str] = []
    if tags:
        names = tags
    else:  # every tag: those of other images (tar layers, Docker's) are passed over
        names, skipped = layout.puzzlefs_tags()
    results = []
    if progress is not None:
        progress.expect("tags", len(names))
        progress.add("tags", 0)
    walked = progress if progress is not None and progress.enabled else None
    metadata: set[Digest] = set()
    for tag in names:
        problems: list[Problem] = []
        _, blobs = image_blobs(layout, tag, problems)
        if problems:
            raise ImageError(f"{tag}: {problems[0].role} {problems[0].blob}: {problems[0].message}")
        t = TagUsage(tag)
        for b in blobs:
            size = b.size if b.size is not None else layout.blobs.size(b.digest)
            t.blobs[b.digest] = size
            if b.role == "chunk":
                t.chunks += size
                t.chunk_count += 1
            else:
                t.metadata += size
                metadata.add(b.digest)
        t.stored = sum(t.blobs.values())
        t.tar, t.files, t.logical = _tar_size(Image(layout, tag), walked)
        results.append(t)
        if progress is not None:
            progress.add("tags")
    union: dict[Digest, int] = {}
    for t in results:
        union.update(t.blobs)
    for t in results:
        others = set().union(*(o.blobs for o in results if o is not t))
        t.shared = sum(size for d, size in t.blobs.items() if d in others)
        t.adds = t.stored - t.shared
    return StoreUsage(results, sum(union.values()), sum(union[d] for d in metadata), skipped)
