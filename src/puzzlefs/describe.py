"""What an image is (``inspect``, as ``skopeo inspect`` and ``unsquashfs -s`` say it),
what it holds (``ls``, as ``unsquashfs -l`` and ``tar -tv``), and what changed between
two images (``diff``). Everything comes from the metadata, through the image's index
(:mod:`puzzlefs.reader.index`): no file contents are read.
"""

from __future__ import annotations

import datetime
import hashlib
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from puzzlefs.errors import NotFound
from puzzlefs.oci import ImageLayout
from puzzlefs.reader._data import ChunkReader
from puzzlefs.reader._open import OpenedImage
from puzzlefs.reader._tables import Attr, Tables
from puzzlefs.reader.index import load_tables
from puzzlefs.verity import fsverity_digest

__all__ = ["Change", "Diff", "ImageFacts", "diff_images", "inspect_image", "list_paths"]

_KINDS = {
    stat.S_IFDIR: "directories",
    stat.S_IFREG: "files",
    stat.S_IFLNK: "symlinks",
    stat.S_IFCHR: "char devices",
    stat.S_IFBLK: "block devices",
    stat.S_IFIFO: "fifos",
    stat.S_IFSOCK: "sockets",
}


def _open(oci_dir: str | Path, tag: str) -> tuple[OpenedImage, Tables]:
    image = OpenedImage(ImageLayout(oci_dir), tag)
    return image, load_tables(image)


def _walk(tables: Tables, start: int, prefix: bytes = b"") -> Iterator[tuple[bytes, Attr]]:
    """Every path below ``start`` (itself first), each directory's entries in name order."""
    stack = [(prefix, start)]
    while stack:
        path, row = stack.pop()
        attr = tables.attr(row)
        yield path, attr
        if attr.kind == stat.S_IFDIR:
            children = [
                (path + b"/" + name if path else name, child)
                for _, child, name in tables.entries(attr)
            ]
            stack.extend(reversed(children))


@dataclass(frozen=True)
class ImageFacts:
    """What ``inspect`` shows of one tag."""

    tag: str
    manifest_digest: str
    manifest_size: int
    fs_verity_digest: str  # what mount --digest takes
    artifact_type: str | None
    annotations: dict[str, str]
    rootfs_digest: str
    rootfs_size: int
    metadata_layers: int
    times_digest: str | None
    chunk_count: int
    chunk_bytes: int  # stored
    compression: str
    chunk_sizes: str
    inodes: int
    kinds: dict[str, int]
    file_bytes: int
    problems: list[str]

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "format_version": 3}


def inspect_image(oci_dir: str | Path, tag: str) -> ImageFacts:
    """The facts of one tag."""
    image, tables = _open(oci_dir, tag)
    m = image.manifest
    manifest_bytes = image.layout.blobs.get(image.manifest_descriptor.digest)
    chunk_sizes = {d.digest: d.size for d in m.chunk_layers}
    kinds: dict[str, int] = {}
    data = 0
    seen_files: set[int] = set()
    for _, attr in _walk(tables, tables.root_row):
        name = _KINDS.get(attr.kind, "other")
        kinds[name] = kinds.get(name, 0) + 1
        if attr.kind == stat.S_IFREG and attr.ino not in seen_files:
            seen_files.add(attr.ino)
            data += attr.size
    zstd = any(d.media_type.endswith("+zstd") for d in m.chunk_layers)
    return ImageFacts(
        tag=tag,
        manifest_digest=str(image.manifest_descriptor.digest),
        manifest_size=image.manifest_descriptor.size,
        fs_verity_digest=fsverity_digest(manifest_bytes).hex(),
        artifact_type=_artifact_type(manifest_bytes),
        annotations=dict(m.annotations),
        rootfs_digest=str(image.rootfs_descriptor.digest),
        rootfs_size=image.rootfs_descriptor.size,
        metadata_layers=_layer_count(image),
        times_digest=None if m.times is None else str(m.times.digest),
        chunk_count=len(chunk_sizes),
        chunk_bytes=sum(chunk_sizes.values()),
        compression="zstd" if zstd else "none",
        chunk_sizes=m.annotations.get("io.puzzlefs.chunk-sizes", "16384:65536:262144"),
        inodes=tables.count,
        kinds=kinds,
        file_bytes=data,
        problems=list(tables.problems),
    )


def _artifact_type(manifest_bytes: bytes) -> str | None:
    import json

    obj = json.loads(manifest_bytes)
    value = obj.get("artifactType") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _layer_count(image: OpenedImage) -> int:
    """Metadata layers in the rootfs (1 for a flat image, more for a chain of deltas)."""
    from puzzlefs.format import MANIFEST_VERSION
    from puzzlefs.format._bulk import decode_rootfs

    return len(decode_rootfs(image.rootfs_bytes(), expected_version=MANIFEST_VERSION).layers)


def _time_text(attr: Attr) -> str:
    when = datetime.datetime.fromtimestamp(attr.mtime, datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M")


def list_paths(
    oci_dir: str | Path, tag: str, path: str = "", *, long: bool = False
) -> Iterator[str]:
    """``./path`` for every path at and below ``path``; with ``long``, ``tar -tv``'s
    columns: mode, owner/group, size (or major,minor), mtime (UTC), name, link target."""
    _, tables = _open(oci_dir, tag)
    row = tables.root_row
    prefix = b""
    for part in path.encode("utf-8", "surrogateescape").split(b"/"):
        if not part:
            continue
        attr = tables.attr(row)
        found = tables.lookup(attr, part) if attr.kind == stat.S_IFDIR else None
        if found is None:
            raise NotFound(f"{path!r} is not in {oci_dir}:{tag}")
        row = found
        prefix = prefix + b"/" + part if prefix else part
    for rel, attr in _walk(tables, row, prefix):
        name = "./" + rel.decode("utf-8", "surrogateescape") if rel else "."
        if attr.kind == stat.S_IFDIR and rel:
            name += "/"
        if not long:
            yield name
            continue
        dev = attr.kind in (stat.S_IFCHR, stat.S_IFBLK)
        size = f"{attr.a},{attr.b}" if dev else str(attr.size)
        owner = f"{attr.uid}/{attr.gid}"
        line = f"{stat.filemode(attr.mode)} {owner} {size:>10} {_time_text(attr)} {name}"
        if attr.kind == stat.S_IFLNK:
            line += " -> " + tables.symlink_target(attr).decode("utf-8", "surrogateescape")
        yield line


@dataclass(frozen=True)
class Change:
    path: str
    what: list[str]  # "type", "mode", "owner", "content", "size", "target", ...


@dataclass
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    new_bytes: int = 0  # stored bytes of blobs the second image needs and the first not
    new_chunks: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": [{"path": c.path, "what": c.what} for c in self.changed],
            "new_bytes": self.new_bytes,
            "new_chunks": self.new_chunks,
        }


def _snapshot(tables: Tables) -> dict[bytes, tuple[object, ...]]:
    out: dict[bytes, tuple[object, ...]] = {}
    for path, a in _walk(tables, tables.root_row):
        content: object = None
        if a.kind == stat.S_IFREG:
            content = tuple((tables.blob(blob)[0], boff) for _, boff, blob, _ in tables.chunks(a))
        elif a.kind == stat.S_IFLNK:
            content = tables.symlink_target(a)
        elif a.kind in (stat.S_IFCHR, stat.S_IFBLK):
            content = (a.a, a.b)
        out[path] = (
            stat.S_IFMT(a.mode),
            stat.S_IMODE(a.mode),
            (a.uid, a.gid),
            a.size,
            content,
            tuple(tables.xattrs(a)),
            (a.mtime, a.mtime_nsec),
        )
    return out


_WHAT = ("type", "mode", "owner", "size", "content", "xattrs", "mtime")
_CONTENT = _WHAT.index("content")


def _references(tables: Tables, a: Attr) -> tuple[tuple[bytes, int, int], ...]:
    pieces = tables.chunks(a)
    ends = [p[0] for p in pieces[1:]] + [a.size]
    return tuple(
        (tables.blob(blob)[0], boff, end - foff)
        for (foff, boff, blob, _), end in zip(pieces, ends, strict=True)
    )


def _content_digest(tables: Tables, data: ChunkReader, attr: Attr) -> bytes:
    """The sha256 of a file's bytes, read (and checked) chunk by chunk."""
    h = hashlib.sha256()
    pieces = tables.chunks(attr)
    ends = [p[0] for p in pieces[1:]] + [attr.size]
    for (foff, boff, blob, comp), end in zip(pieces, ends, strict=True):
        digest, _ = tables.blob(blob)
        h.update(data.read(digest, comp, boff, end - foff, boff + end - foff))
    return h.digest()


def _reader(image: OpenedImage) -> ChunkReader:
    return ChunkReader(image.layout, lambda d: None, verify_verity=False)


def _row(tables: Tables, path: bytes) -> int:
    row = tables.root_row
    for part in path.split(b"/") if path else []:
        found = tables.lookup(tables.attr(row), part)
        assert found is not None
        row = found
    return row


def diff_images(a: tuple[str | Path, str], b: tuple[str | Path, str]) -> Diff:
    """What ``b`` adds, removes and changes against ``a`` (paths, sorted), and the
    stored bytes it needs beyond ``a``'s."""
    image_a, tables_a = _open(*a)
    image_b, tables_b = _open(*b)
    old, new = _snapshot(tables_a), _snapshot(tables_b)
    result = Diff()

    def show(p: bytes) -> str:
        return "./" + p.decode("utf-8", "surrogateescape") if p else "."

    for p in sorted(new.keys() - old.keys()):
        result.added.append(show(p))
    for p in sorted(old.keys() - new.keys()):
        result.removed.append(show(p))
    data_a, data_b = _reader(image_a), _reader(image_b)
    for p in sorted(new.keys() & old.keys()):
        what = [w for w, x, y in zip(_WHAT, old[p], new[p], strict=True) if x != y]
        if "content" in what and old[p][0] == new[p][0] == stat.S_IFREG and "size" not in what:
            attr_a = tables_a.attr(_row(tables_a, p))
            attr_b = tables_b.attr(_row(tables_b, p))
            if _content_digest(tables_a, data_a, attr_a) == _content_digest(
                tables_b, data_b, attr_b
            ):
                what.remove("content")  # the same bytes in other chunks
        if what:
            result.changed.append(Change(show(p), what))
    blobs_a = {d.digest for d in image_a.manifest.layers} | {image_a.manifest.config.digest}
    for d in image_b.manifest.layers:
        if d.digest not in blobs_a:
            result.new_bytes += d.size
            result.new_chunks += d.media_type.startswith("application/vnd.puzzlefs.image.filedata")
    return result
